//! `kvinject lint [PATH...]`: reads YAML files, folders (recursively, `*.yaml`, `*.yml`,
//! `*.json`) or stdin (`-`, or no path), and prints one line per finding. Exit status: 0
//! clean (warnings allowed), 1 when any finding is an error, 2 when an input cannot be read.

use super::{Document, Finding, Options, Severity, documents, lint};
use crate::{config::LintArgs, scope::Scope};
use anyhow::{Context, bail};
use std::{io::Read, path::Path};

fn read_tree(path: &Path, out: &mut Vec<Document>) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("reading folder {}", path.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for entry in entries {
            let yaml = entry
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            if entry.is_dir() || yaml {
                read_tree(&entry, out)?;
            }
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    out.extend(documents(&path.display().to_string(), &text));
    Ok(())
}

fn read_inputs(paths: &[String]) -> anyhow::Result<Vec<Document>> {
    let mut docs = Vec::new();
    let stdin_only = [String::from("-")];
    for path in if paths.is_empty() { &stdin_only[..] } else { paths } {
        if path == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            docs.extend(documents("<stdin>", &text));
        } else {
            read_tree(Path::new(path), &mut docs)?;
        }
    }
    Ok(docs)
}

/// Prints the findings; `Ok(true)` when none is an error.
pub async fn run(args: &LintArgs) -> anyhow::Result<bool> {
    let docs = read_inputs(&args.paths)?;
    let mut extra_policies = Vec::new();
    for path in &args.policies {
        for d in read_inputs(std::slice::from_ref(path))? {
            match d.content {
                Ok(v) => extra_policies.push(v),
                Err(why) => bail!("--policy {path}: document {}: {why}", d.index),
            }
        }
    }
    let options = Options {
        // `NAME` or `NAME=URL`, as `kvinject serve --vault` takes them.
        vaults: args
            .vaults
            .iter()
            .map(|v| v.split('=').next().unwrap_or_default().trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
        default_namespace: args.namespace.clone(),
        scope: Scope::new(&args.namespace_selector, [])
            .map_err(|e| anyhow::anyhow!("--namespace-selector: {e}"))?,
        extra_policies,
    };
    let mut findings = lint(&docs, &options);
    if args.check_vault {
        findings.extend(check_vault(args, &super::uses(&docs, &options)).await?);
    }
    print(&findings, args.output_json)?;
    Ok(!findings.iter().any(|f| f.severity == Severity::Error))
}

/// Reads each distinct secret once (without its field) and reports what Key Vault says of it
/// at every place it is used.
async fn check_vault(args: &LintArgs, uses: &[super::Use]) -> anyhow::Result<Vec<Finding>> {
    use crate::keyvault::{AzureConfig, source::KeyVault};
    if args.vaults.is_empty() {
        bail!("--check-vault needs the vaults: --vault NAME or NAME=URL");
    }
    let vaults = crate::config::parse_vaults(&args.vaults, &args.vault_dns_suffix)?;
    let azure = AzureConfig {
        credential: crate::config::credential(
            &args.azure,
            std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some(),
        )?,
        ca_bundle: args.azure.azure_ca_bundle.clone(),
        authority_host: args.azure.azure_authority_host.clone(),
        attempt_timeout: args.keyvault_timeout,
        max_retries: 1,
    };
    let connector = azure.connect().context("setting up Key Vault access")?;
    let source = KeyVault::new(&connector, &vaults, args.keyvault_timeout * 2)
        .context("setting up Key Vault clients")?;
    let mut answers = std::collections::BTreeMap::new();
    for u in uses {
        let secret = u.reference.secret();
        if !answers.contains_key(&secret) {
            let answer = crate::keyvault::source::SecretSource::fetch(source.as_ref(), &secret, None)
                .await
                .err();
            answers.insert(secret.clone(), answer);
        }
    }
    Ok(uses
        .iter()
        .filter_map(|u| {
            let why = answers.get(&u.reference.secret())?.as_ref()?;
            Some(Finding {
                file: u.file.clone(),
                document: u.document,
                object: u.object.clone(),
                severity: Severity::Error,
                message: format!("{}: {why}", u.places),
            })
        })
        .collect())
}

fn print(findings: &[Finding], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(findings)?);
        return Ok(());
    }
    for f in findings {
        let severity = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let object = if f.object.is_empty() {
            String::new()
        } else {
            format!(" {}:", f.object)
        };
        println!("{}:{}:{object} {severity}: {}", f.file, f.document, f.message);
    }
    Ok(())
}
