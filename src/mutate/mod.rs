//! What a pod becomes: a pure function from the pod to a JSON patch, with no I/O.

pub mod patch;

use k8s_openapi::api::core::v1::Pod;
use json_patch::Patch;

/// Label that marks a pod kvinject has admitted.
pub const INJECTED_LABEL: &str = "kvinject.io/injected";

/// The result of looking at one pod.
#[derive(Debug, Default, PartialEq)]
pub struct Mutation {
    /// `None` when the pod needs no change at all.
    pub patch: Option<Patch>,
    /// Admission warnings shown to the client that created the pod.
    pub warnings: Vec<String>,
}

/// Decides how `pod` is rewritten. Applying the patch twice changes nothing the second time.
pub fn mutate(pod: &Pod) -> Mutation {
    let mut ops = Vec::new();
    let labels = pod.metadata.labels.as_ref();
    if labels.and_then(|l| l.get(INJECTED_LABEL)).map(String::as_str) != Some("true") {
        patch::ensure_map(&mut ops, &["metadata", "labels"], labels.is_some());
        ops.push(patch::add(&["metadata", "labels", INJECTED_LABEL], "true".into()));
    }
    Mutation { patch: (!ops.is_empty()).then(|| Patch(ops)), warnings: Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn apply(p: &Pod, m: &Mutation) -> Pod {
        let mut doc = serde_json::to_value(p).unwrap();
        if let Some(patch) = &m.patch {
            json_patch::patch(&mut doc, patch).unwrap();
        }
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn labels_a_pod_without_labels_and_then_changes_nothing() {
        let p = pod(json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c"}]}}));
        let once = apply(&p, &mutate(&p));
        let want = pod(json!({"metadata": {"name": "a", "labels": {"kvinject.io/injected": "true"}}, "spec": {"containers": [{"name": "c"}]}}));
        assert_eq!(once, want);
        assert_eq!(mutate(&once), Mutation::default(), "a second admission must be a no-op");
    }

    #[test]
    fn keeps_existing_labels() {
        let p = pod(json!({"metadata": {"name": "a", "labels": {"app": "x"}}, "spec": {"containers": []}}));
        let got = apply(&p, &mutate(&p));
        let want = pod(json!({"metadata": {"name": "a", "labels": {"app": "x", "kvinject.io/injected": "true"}}, "spec": {"containers": []}}));
        assert_eq!(got, want);
    }
}
