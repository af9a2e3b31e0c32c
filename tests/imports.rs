//! The shape of the imports between kvinject's own modules (one node per file under src/):
//! no import circle; the pure core imports nothing but the core; and only the top (the
//! binary's wiring and the command-line shells) imports `config`. Read from the sources:
//! every `use crate::...` (braces expanded), every `crate::...` path in code, and every
//! `super::...` path, outside `#[cfg(test)]` modules.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// The pure core: deciding what a pod becomes, what a Secret holds, who may use what, and
/// when a Secret or workload is due. No I/O, and no import of anything outside this list.
const CORE: &[&str] = &[
    "access::direct",
    "access::grant",
    "access::policy",
    "duration",
    "identity",
    "materialize",
    "materialize::cached",
    "materialize::keys",
    "materialize::seal",
    "materialize::value",
    "mutate",
    "mutate::patch",
    "reference",
    "rotation::decide",
    "rotation::listing",
    "rotation::pods",
];

/// What may import `config`: the wiring at the top and the subcommands' shells.
const CONFIG_USERS: &[&str] = &["app", "access::cli", "certs::cli", "lint::cli"];

/// Every module of the crate by path (`rotation::sweep`), with its source outside tests.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap().to_owned();
            out.insert(parts.join("::"), code);
        }
    }
    out
}

/// The paths a `use` tree names: `{a::{b, c}, d}` is `a::b`, `a::c`, `d`.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(inner) = tree.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(prefix, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(prefix, &inner[start..], out);
        return;
    }
    if tree.is_empty() {
        return;
    }
    match tree.find("::{") {
        Some(at) => expand(&format!("{prefix}{}::", &tree[..at]), &tree[at + 2..], out),
        None => out.push(format!("{prefix}{}", tree.split(" as ").next().unwrap().trim())),
    }
}

/// The module a path lands in: its longest prefix that is a module.
fn resolve<'a>(mods: &'a BTreeMap<String, String>, path: &str) -> Option<&'a str> {
    let mut parts: Vec<&str> = path.split("::").collect();
    while !parts.is_empty() {
        if let Some((k, _)) = mods.get_key_value(&parts.join("::")) {
            return Some(k);
        }
        parts.pop();
    }
    None
}

fn path_after(text: &str, at: usize) -> String {
    text[at..]
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect::<String>()
        .trim_end_matches(':')
        .to_owned()
}

/// Each module's imports of the crate's other modules (not of its own ancestors).
fn imports(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, code) in mods {
        let mut paths = vec![];
        for (at, _) in code.match_indices("use crate::") {
            let rest = &code[at + "use crate::".len()..];
            let end = rest.find(';').unwrap();
            expand("", &rest[..end].replace(['\n', ' '], ""), &mut paths);
        }
        for (at, _) in code.match_indices("crate::") {
            paths.push(path_after(code, at + "crate::".len()));
        }
        let parent = m.rsplit_once("::").map_or("", |(p, _)| p);
        for (at, _) in code.match_indices("super::") {
            let p = path_after(code, at + "super::".len());
            paths.push(if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            });
        }
        let set = edges.entry(m.clone()).or_default();
        for p in paths {
            if let Some(t) = resolve(mods, &p)
                && t != m
                && !m.starts_with(&format!("{t}::"))
            {
                set.insert(t.to_owned());
            }
        }
    }
    edges
}

fn crate_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    imports(&modules(&src))
}

/// A circle of imports, if there is one (depth-first search; the path back to the start).
fn circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_owned(), 1);
        path.push(m.to_owned());
        for t in edges.get(m).into_iter().flatten() {
            match state.get(t.as_str()) {
                Some(1) => {
                    let from = path.iter().position(|p| p == t).unwrap();
                    let mut c = path[from..].to_vec();
                    c.push(t.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(t, edges, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(m.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if !state.contains_key(m)
            && let Some(c) = visit(m, edges, &mut state, &mut vec![])
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_module_imports_itself_through_others() {
    let edges = crate_imports();
    assert!(
        edges.len() > 40,
        "found {} modules: the reader is broken",
        edges.len()
    );
    assert!(
        edges["inject"].contains("mutate"),
        "the reader misses a known import"
    );
    if let Some(c) = circle(&edges) {
        panic!("an import circle: {}", c.join(" -> "));
    }
}

#[test]
fn the_pure_core_imports_only_the_core() {
    let edges = crate_imports();
    for m in CORE {
        let imported = edges.get(*m).unwrap_or_else(|| panic!("no module {m}"));
        let outside: Vec<_> = imported.iter().filter(|t| !CORE.contains(&t.as_str())).collect();
        assert!(
            outside.is_empty(),
            "{m} imports {outside:?}, outside the pure core"
        );
    }
}

#[test]
fn only_the_top_imports_config() {
    let edges = crate_imports();
    let users: Vec<_> = edges
        .iter()
        .filter(|(_, t)| t.contains("config"))
        .map(|(m, _)| m.as_str())
        .filter(|m| !CONFIG_USERS.contains(m))
        .collect();
    assert!(users.is_empty(), "{users:?} import config; it sits at the top");
}

#[test]
fn the_reader_finds_circles_and_nested_uses() {
    let mods: BTreeMap<String, String> = [
        ("a", "use crate::{b::{self, X}, c};"),
        ("b", "fn f() { crate::c::g() }"),
        ("c", "use super::a::Y;"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let edges = imports(&mods);
    assert_eq!(edges["a"], BTreeSet::from(["b".to_owned(), "c".to_owned()]));
    assert!(circle(&edges).is_some(), "a -> b -> c -> a");
}
