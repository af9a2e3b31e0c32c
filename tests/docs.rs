//! The book's configuration reference (docs/src/operators/reference.md) is generated from
//! the clap definitions (`kvinject::config::Cli`) and the chart's values.yaml (its comments
//! are the descriptions), so it cannot drift: this test fails when the file is stale.
//! `KVINJECT_BLESS=1 cargo test --test docs` writes it again.

use clap::CommandFactory;
use kvinject::config::Cli;
use std::{fmt::Write, path::Path};

const TARGET: &str = "docs/src/operators/reference.md";

/// One table cell: on one line, `|` escaped, and `<` and `>` outside code spans as
/// entities (help texts say `akv://<vault>/<secret>`, which HTML would take for tags).
fn cell(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::with_capacity(joined.len());
    let mut code = false;
    for c in joined.chars() {
        match c {
            '`' => {
                code = !code;
                out.push(c);
            }
            '|' => out.push_str("\\|"),
            '<' if !code => out.push_str("&lt;"),
            '>' if !code => out.push_str("&gt;"),
            _ => out.push(c),
        }
    }
    out
}

/// One table of a command's flags: flag, environment variable, default, description.
fn flags(out: &mut String, title: &str, cmd: &clap::Command) {
    writeln!(out, "### `{title}`\n").unwrap();
    if let Some(about) = cmd.get_about() {
        writeln!(out, "{}\n", cell(&about.to_string())).unwrap();
    }
    writeln!(
        out,
        "| flag | env | default | description |\n| --- | --- | --- | --- |"
    )
    .unwrap();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_hide_set() || id == "help" || id == "version" {
            continue;
        }
        let flag = match (arg.get_long(), arg.get_short()) {
            (Some(l), Some(s)) => format!("`-{s}`, `--{l}`"),
            (Some(l), None) => format!("`--{l}`"),
            (None, _) => format!("`<{}>`", id.to_uppercase()),
        };
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect();
        let default = if arg.is_required_set() {
            "(required)".to_owned()
        } else if defaults.is_empty() {
            String::new()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        let help = if values.is_empty() || arg.get_action().takes_values() && values.len() < 2 {
            cell(&help)
        } else {
            format!("{} (one of {})", cell(&help), values.join(", "))
        };
        writeln!(out, "| {flag} | {env} | {default} | {help} |").unwrap();
    }
    out.push('\n');
}

/// Which environment variable of `kvinject serve` each chart value sets, read from the
/// chart's Deployment template (`- name: ENV` followed by a `value:` naming `.Values.x`).
fn value_to_env(template: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = template.lines().collect();
    let mut map = vec![];
    for pair in lines.windows(2) {
        let Some(env) = pair[0].trim().strip_prefix("- name: ") else {
            continue;
        };
        if let Some(at) = pair[1].find(".Values.") {
            let key: String = pair[1][at + ".Values.".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '.')
                .collect();
            map.push((key, env.trim().to_owned()));
        }
    }
    map
}

/// The chart's values as rows: dotted key, default, the comment above it (or beside it),
/// and the flag it sets.
fn chart_values(out: &mut String, yaml: &str, template: &str, serve: &clap::Command) {
    let sets = value_to_env(template);
    let flag_of = |env: &str| {
        serve
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == env))
            .and_then(|a| a.get_long())
    };
    writeln!(
        out,
        "## Chart values (`deploy/helm/kvinject/values.yaml`)\n\n\
         Each value with its default and the comment the file gives it.\n\n\
         | value | default | description |\n| --- | --- | --- |"
    )
    .unwrap();
    let mut comment: Vec<String> = vec![];
    let mut path: Vec<(usize, String)> = vec![];
    for line in yaml.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() {
            comment.clear();
            continue;
        }
        if let Some(c) = trimmed.strip_prefix('#') {
            comment.push(c.trim().to_owned());
            continue;
        }
        if trimmed.starts_with("- ") || !trimmed.contains(':') {
            comment.clear();
            continue;
        }
        let (key, rest) = trimmed.split_once(':').unwrap();
        if key.contains(' ') || key.starts_with(['"', '\'', '{', '[']) {
            comment.clear();
            continue;
        }
        while path.last().is_some_and(|(i, _)| *i >= indent) {
            path.pop();
        }
        path.push((indent, key.to_owned()));
        let dotted: Vec<&str> = path.iter().map(|(_, k)| k.as_str()).collect();
        let (value, beside) = match rest.split_once(" # ") {
            Some((v, c)) => (v.trim(), Some(c.trim())),
            None => (rest.trim(), None),
        };
        let key = dotted.join(".");
        let mut text = comment.join(" ");
        if let Some(b) = beside {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(b);
        }
        for (_, env) in sets.iter().filter(|(k, _)| *k == key) {
            if !text.is_empty() {
                text.push(' ');
            }
            match flag_of(env) {
                Some(flag) => write!(text, "Sets `{env}` (`--{flag}`).").unwrap(),
                None => write!(text, "Sets `{env}`.").unwrap(),
            }
        }
        if value.is_empty() && text.is_empty() {
            // A map whose keys have their own rows.
            comment.clear();
            continue;
        }
        let default = if value.is_empty() {
            String::new()
        } else {
            format!("`{}`", value.replace('|', "\\|"))
        };
        writeln!(out, "| `{key}` | {default} | {} |", cell(&text)).unwrap();
        comment.clear();
    }
    out.push('\n');
}

fn generate(root: &Path) -> String {
    let cli = Cli::command();
    let mut out = String::from(
        "<!-- Generated by tests/docs.rs from the clap definitions (src/config.rs) and \
         deploy/helm/kvinject/values.yaml. Do not edit: `KVINJECT_BLESS=1 cargo test --test docs` \
         writes it again, and the test fails when it is stale. -->\n\n\
         ## Flags and environment variables\n\n\
         Every flag has an environment variable; the flag wins when both are set.\n\n",
    );
    let global: Vec<_> = cli.get_arguments().filter(|a| a.is_global_set()).collect();
    for g in &global {
        let env = g
            .get_env()
            .map(|e| format!(" (`{}`)", e.to_string_lossy()))
            .unwrap_or_default();
        writeln!(
            out,
            "Every command also takes `--{}`{env}: {}\n",
            g.get_long().unwrap(),
            cell(&g.get_help().map(|h| h.to_string()).unwrap_or_default())
        )
        .unwrap();
    }
    for sub in cli.get_subcommands() {
        let name = sub.get_name();
        if sub.get_subcommands().next().is_some() {
            for inner in sub.get_subcommands() {
                flags(&mut out, &format!("kvinject {name} {}", inner.get_name()), inner);
            }
        } else {
            flags(&mut out, &format!("kvinject {name}"), sub);
        }
    }
    let chart = root.join("deploy/helm/kvinject");
    let values = std::fs::read_to_string(chart.join("values.yaml")).unwrap();
    let template = std::fs::read_to_string(chart.join("templates/deployment.yaml")).unwrap();
    chart_values(
        &mut out,
        &values,
        &template,
        cli.find_subcommand("serve").unwrap(),
    );
    out
}

#[test]
fn the_configuration_reference_is_generated_from_the_flags_and_the_charts_values() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let want = generate(root);
    let path = root.join(TARGET);
    if std::env::var_os("KVINJECT_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{TARGET} is stale: run `KVINJECT_BLESS=1 cargo test --test docs` and commit it"
    );
}

#[test]
fn every_serve_flag_and_every_chart_value_is_in_the_reference() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = generate(root);
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve").unwrap();
    for arg in serve.get_arguments().filter(|a| !a.is_hide_set()) {
        if let Some(long) = arg.get_long().filter(|l| *l != "help") {
            assert!(text.contains(&format!("`--{long}`")), "--{long} is missing");
        }
    }
    for key in [
        "vaults",
        "azure.credential",
        "rotation.refreshInterval",
        "hostNetwork",
        "ports.webhook",
    ] {
        assert!(text.contains(&format!("| `{key}` |")), "{key} is missing");
    }
}
