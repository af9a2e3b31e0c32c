//! `kvinject lint`: the references in manifests, checked before anything reaches a cluster
//! (GitOps CI). Pure: documents in, findings out, with the webhook's own planning, access
//! policy check and messages (shared code, not copies). `cli` reads files and prints.

pub mod cli;

use crate::{
    access::{
        grant::{self, Index, Subject},
        policy::AccessPolicy,
    },
    mutate::{self, InjectConfig},
    reference::Reference,
    scope::Scope,
};
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// One YAML document of an input, or why it could not be read.
#[derive(Clone, Debug)]
pub struct Document {
    pub file: String,
    /// 1-based position in its file.
    pub index: usize,
    pub content: Result<Value, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub file: String,
    pub document: usize,
    /// `Kind/namespace/name` of the object, empty for a document that did not parse.
    pub object: String,
    pub severity: Severity,
    pub message: String,
}

/// What the checks are held against.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Configured vault names; empty: any vault.
    pub vaults: BTreeSet<String>,
    /// Namespace of objects that name none (Helm and kustomize output often do not).
    pub default_namespace: String,
    /// The namespaces kvinject acts for (the registration's label).
    pub scope: Scope,
    /// AccessPolicy documents from `--policy` files, besides those among the inputs.
    pub extra_policies: Vec<Value>,
}

const WORKLOAD_KINDS: [&str; 6] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
];

/// The pod (metadata and spec) a document runs, for Pods and the workload kinds.
fn pod_of(doc: &Value) -> Option<Value> {
    let kind = doc["kind"].as_str()?;
    let template = match kind {
        "Pod" => return Some(doc.clone()),
        "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"],
        k if WORKLOAD_KINDS.contains(&k) => &doc["spec"]["template"],
        _ => return None,
    };
    Some(serde_json::json!({"metadata": template["metadata"], "spec": template["spec"]}))
}

fn is_policy(doc: &Value) -> bool {
    doc["kind"] == "AccessPolicy"
        && doc["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("kvinject.io/"))
}

/// Every vault named by a reference in the inputs (what `--vault` stands for when not given).
fn vaults_named(docs: &[&Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut walk = vec![];
    walk.extend(docs.iter().copied());
    while let Some(v) = walk.pop() {
        match v {
            Value::String(s) => {
                for part in s.split(',') {
                    if let Some(Ok(r)) = Reference::parse(part.trim()) {
                        out.insert(r.vault);
                    }
                }
            }
            Value::Array(items) => walk.extend(items),
            Value::Object(map) => walk.extend(map.values()),
            _ => {}
        }
    }
    out
}

/// Checks every kvinject reference in `documents`.
pub fn lint(documents: &[Document], options: &Options) -> Vec<Finding> {
    let mut findings = Vec::new();
    let parsed: Vec<(&Document, &Value)> = documents
        .iter()
        .filter_map(|d| d.content.as_ref().ok().map(|v| (d, v)))
        .collect();
    for d in documents {
        if let Err(why) = &d.content {
            findings.push(Finding {
                file: d.file.clone(),
                document: d.index,
                object: String::new(),
                severity: Severity::Error,
                message: why.clone(),
            });
        }
    }
    let policies: Vec<AccessPolicy> = parsed
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| is_policy(v))
        .chain(options.extra_policies.iter())
        .filter_map(|v| serde_json::from_value(v.clone()).ok())
        .collect();
    let index = (!policies.is_empty()).then(|| Index::new(&policies));
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = parsed
        .iter()
        .filter(|(_, v)| v["kind"] == "Namespace" && v["apiVersion"] == "v1")
        .filter_map(|(_, v)| {
            let name = v["metadata"]["name"].as_str()?.to_owned();
            let labels = serde_json::from_value(v["metadata"]["labels"].clone()).unwrap_or_default();
            Some((name, labels))
        })
        .collect();
    let vaults = if options.vaults.is_empty() {
        vaults_named(&parsed.iter().map(|(_, v)| *v).collect::<Vec<_>>())
    } else {
        options.vaults.clone()
    };
    let config = InjectConfig {
        vaults,
        ..Default::default()
    };

    for (d, doc) in &parsed {
        let Some(pod) = pod_of(doc) else { continue };
        let namespace = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or(&options.default_namespace)
            .to_owned();
        let object = format!(
            "{}/{namespace}/{}",
            doc["kind"].as_str().unwrap_or_default(),
            doc["metadata"]["name"].as_str().unwrap_or_default()
        );
        let mut finding = |severity, message: String| {
            findings.push(Finding {
                file: d.file.clone(),
                document: d.index,
                object: object.clone(),
                severity,
                message,
            })
        };
        let pod: Pod = match serde_json::from_value(pod) {
            Ok(p) => p,
            Err(e) => {
                finding(Severity::Error, format!("not a valid pod template: {e}"));
                continue;
            }
        };
        let plan = match mutate::plan(&pod, &config) {
            Ok(plan) => plan,
            Err(denial) => {
                finding(Severity::Error, denial.to_string());
                continue;
            }
        };
        for warning in &plan.warnings {
            finding(Severity::Warning, warning.clone());
        }
        if plan.needed.is_empty() {
            continue;
        }
        let labels = namespaces.get(&namespace);
        if let Some(labels) = labels
            && !options.scope.includes(&namespace, labels)
        {
            finding(
                Severity::Error,
                format!(
                    "namespace {namespace} is not opted in to kvinject: its pods' {} reference(s) would reach them as literal akv:// strings",
                    plan.needed.len()
                ),
            );
        }
        if let Some(index) = &index {
            let empty = BTreeMap::new();
            let subject = Subject {
                namespace: &namespace,
                labels: labels.unwrap_or(&empty),
                service_account: grant::service_account_of(&pod),
            };
            if let Err(denied) = grant::check_plan(index, &subject, &plan) {
                finding(Severity::Error, denied.to_string());
            }
        }
    }
    findings
}

/// Where a reference is used: the document, the object and the places in its pod.
#[derive(Clone, Debug)]
pub struct Use {
    pub file: String,
    pub document: usize,
    pub object: String,
    pub places: String,
    pub reference: Reference,
}

/// Every reference the inputs' pods would materialize (those that plan without a denial).
pub fn uses(documents: &[Document], options: &Options) -> Vec<Use> {
    let docs: Vec<&Value> = documents.iter().filter_map(|d| d.content.as_ref().ok()).collect();
    let vaults = if options.vaults.is_empty() {
        vaults_named(&docs)
    } else {
        options.vaults.clone()
    };
    let config = InjectConfig {
        vaults,
        ..Default::default()
    };
    let mut out = Vec::new();
    for d in documents {
        let Ok(doc) = &d.content else { continue };
        let Some(pod) = pod_of(doc).and_then(|p| serde_json::from_value::<Pod>(p).ok()) else {
            continue;
        };
        let Ok(plan) = mutate::plan(&pod, &config) else {
            continue;
        };
        let namespace = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or(&options.default_namespace);
        let object = format!(
            "{}/{namespace}/{}",
            doc["kind"].as_str().unwrap_or_default(),
            doc["metadata"]["name"].as_str().unwrap_or_default()
        );
        for needed in &plan.needed {
            out.push(Use {
                file: d.file.clone(),
                document: d.index,
                object: object.clone(),
                places: plan
                    .locations
                    .get(&needed.secret_name)
                    .map(|l| l.join(", "))
                    .unwrap_or_default(),
                reference: needed.source.reference().clone(),
            });
        }
    }
    out
}

/// Splits a YAML stream into documents, each parsed to JSON or with its syntax error.
pub fn documents(file: &str, text: &str) -> Vec<Document> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let content = match Value::deserialize(de) {
            Ok(Value::Null) => continue,
            Ok(v) => Ok(v),
            Err(e) => Err(format!("not YAML: {e}")),
        };
        let failed = content.is_err();
        out.push(Document {
            file: file.to_owned(),
            index: i + 1,
            content,
        });
        if failed {
            break; // the rest of a broken stream cannot be trusted
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<Document> {
        let path = format!("{}/tests/lint/{name}", env!("CARGO_MANIFEST_DIR"));
        documents(name, &std::fs::read_to_string(&path).unwrap())
    }

    fn options() -> Options {
        Options {
            vaults: ["main".to_owned()].into(),
            default_namespace: "default".into(),
            scope: Scope::new("kvinject.io/injection=enabled", ["kube-system".to_owned()]).unwrap(),
            extra_policies: vec![],
        }
    }

    #[test]
    fn a_gitops_repository_gets_one_finding_per_problem() {
        let mut docs = fixture("helm-output.yaml");
        docs.extend(fixture("kustomize-output.yaml"));
        docs.extend(fixture("broken.yaml"));
        let findings = lint(&docs, &options());
        let lines: Vec<String> = findings
            .iter()
            .map(|f| {
                format!(
                    "{}:{} {} {:?}: {}",
                    f.file, f.document, f.object, f.severity, f.message
                )
            })
            .collect();
        let want = [
            "helm-output.yaml:3 Deployment/shop/api Error: container `api` env `STRIPE_KEY`: akv://main/payments-stripe is not granted to ServiceAccount `api` in namespace `shop`: no AccessPolicy grants it for env",
            "helm-output.yaml:4 CronJob/shop/nightly Warning: container `job` env `NOTE` contains akv:// but is not a reference",
            "kustomize-output.yaml:1 Deployment/legacy/old Error: namespace legacy is not opted in to kvinject",
            "kustomize-output.yaml:1 Deployment/legacy/old Error: container `old` env `DB`: akv://main/shop-db is not granted to ServiceAccount `default` in namespace `legacy`",
            "kustomize-output.yaml:3 StatefulSet/shop/db Error: container `db` env `ROOT`: vault `prod` is not configured in kvinject (configured: main)",
            "broken.yaml:2  Error: not YAML",
        ];
        for w in want {
            assert!(
                lines.iter().any(|l| l.starts_with(w)),
                "missing {w:?} in\n{}",
                lines.join("\n")
            );
        }
        assert_eq!(
            lines.len(),
            want.len(),
            "no more findings than those:\n{}",
            lines.join("\n")
        );
    }
}
