//! Which namespaces kvinject acts for, pure: the same label selector and exclusions as the
//! webhook registration's `namespaceSelector`. The apiserver only sends those namespaces,
//! but anything that can reach the webhook port can POST an AdmissionReview naming any
//! namespace, so kvinject checks again from its own namespace cache.

use crate::access::grant::selector_matches;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scope {
    pub selector: LabelSelector,
    pub excluded: BTreeSet<String>,
}

impl Scope {
    /// `selector` in kubectl's syntax (`k=v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin
    /// (a,b)`, comma-separated, all must hold); `excluded` namespaces never count.
    pub fn new(selector: &str, excluded: impl IntoIterator<Item = String>) -> Result<Self, String> {
        Ok(Scope {
            selector: parse_selector(selector)?,
            excluded: excluded.into_iter().collect(),
        })
    }

    pub fn includes(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        !self.excluded.contains(namespace) && selector_matches(&self.selector, labels)
    }
}

/// Splits at commas outside parentheses.
fn requirements(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|r| !r.is_empty()).collect()
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

/// Parses a label selector string into its structured form.
pub fn parse_selector(s: &str) -> Result<LabelSelector, String> {
    let mut labels = BTreeMap::new();
    let mut expressions = Vec::new();
    let expr = |key: &str, operator: &str, values: Option<Vec<String>>| LabelSelectorRequirement {
        key: key.trim().to_owned(),
        operator: operator.to_owned(),
        values,
    };
    for r in requirements(s) {
        let set_op = [(" notin ", "NotIn"), (" in ", "In")]
            .into_iter()
            .find_map(|(word, op)| {
                let (k, rest) = r.split_once(word)?;
                Some((k, op, rest))
            });
        let req = if let Some((key, op, rest)) = set_op {
            let inner = rest.trim().strip_prefix('(').and_then(|x| x.strip_suffix(')'));
            let inner = inner.ok_or_else(|| format!("`{r}`: write `{} (a,b)`", op.to_lowercase()))?;
            let values: Vec<String> = inner
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
            if values.is_empty() {
                return Err(format!("`{r}` names no values"));
            }
            expr(key, op, Some(values))
        } else if let Some((k, v)) = r.split_once("!=") {
            expr(k, "NotIn", Some(vec![v.trim().to_owned()]))
        } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
            continue;
        } else if let Some(k) = r.strip_prefix('!') {
            expr(k, "DoesNotExist", None)
        } else {
            expr(r, "Exists", None)
        };
        if !valid_key(&req.key) {
            return Err(format!("`{r}`: `{}` is not a label key", req.key));
        }
        expressions.push(req);
    }
    if labels.keys().any(|k| !valid_key(k)) {
        return Err(format!("`{s}` has an empty or invalid label key"));
    }
    Ok(LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!expressions.is_empty()).then_some(expressions),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_parse_and_match_like_kubectl() {
        let cases = [
            (
                "kvinject.io/injection=enabled",
                &[("kvinject.io/injection", "enabled")][..],
                true,
            ),
            (
                "kvinject.io/injection=enabled",
                &[("kvinject.io/injection", "disabled")][..],
                false,
            ),
            (
                "kvinject.io/injection==enabled",
                &[("kvinject.io/injection", "enabled")][..],
                true,
            ),
            ("suite", &[("suite", "x")][..], true),
            ("suite", &[][..], false),
            ("!legacy", &[][..], true),
            ("!legacy", &[("legacy", "")][..], false),
            (
                "env in (prod, stage),team!=b",
                &[("env", "stage"), ("team", "a")][..],
                true,
            ),
            (
                "env in (prod, stage),team!=b",
                &[("env", "stage"), ("team", "b")][..],
                false,
            ),
            ("env notin (dev)", &[("env", "prod")][..], true),
            ("a=1, b", &[("a", "1")][..], false),
        ];
        for (selector, l, want) in cases {
            let scope = Scope::new(selector, []).unwrap();
            assert_eq!(scope.includes("ns", &labels(l)), want, "{selector} on {l:?}");
        }
    }

    #[test]
    fn excluded_namespaces_never_count() {
        let scope = Scope::new("suite", ["kube-system".to_owned(), "kvinject".to_owned()]).unwrap();
        assert!(!scope.includes("kube-system", &labels(&[("suite", "x")])));
        assert!(scope.includes("team-a", &labels(&[("suite", "x")])));
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        for (bad, want) in [
            ("env in prod", "write `in (a,b)`"),
            ("env in ()", "names no values"),
            ("=x", "invalid label key"),
            ("a b", "not a label key"),
        ] {
            let err = parse_selector(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
