//! What the rotation controller keeps of an injected pod: its name, namespace, uid, the
//! refresh interval it asks for and the names of the Secrets it uses. The controller
//! decides from nothing else (evictions list pods from the apiserver), and a whole `Pod`
//! costs about ten times as much in memory.

use crate::mutate::REFRESH_INTERVAL_ANNOTATION;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Lookup;
use std::borrow::Cow;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodUse {
    pub name: String,
    pub namespace: String,
    uid: Option<String>,
    resource_version: Option<String>,
    /// The pod's `kvinject.io/refresh-interval`, as written.
    pub refresh_interval: Option<Box<str>>,
    /// The Secrets it refers to (every place a pod can name one), each once.
    pub secrets: Box<[Box<str>]>,
    /// The ServiceAccount it runs as: whose grant a write into its Secrets needs.
    pub service_account: Box<str>,
    /// Succeeded or Failed: its containers never start again, so it reads nothing more.
    pub finished: bool,
}

impl From<Pod> for PodUse {
    fn from(pod: Pod) -> Self {
        let mut secrets: Vec<Box<str>> = crate::access::direct::secrets_named(&pod)
            .into_iter()
            .map(|n| Box::from(n.name))
            .collect();
        let service_account = Box::from(crate::access::grant::service_account_of(&pod));
        let finished = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        secrets.sort_unstable();
        secrets.dedup();
        let refresh_interval = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REFRESH_INTERVAL_ANNOTATION))
            .map(|v| Box::from(v.as_str()));
        let meta = pod.metadata;
        PodUse {
            name: meta.name.unwrap_or_default(),
            namespace: meta.namespace.unwrap_or_default(),
            uid: meta.uid,
            resource_version: meta.resource_version,
            refresh_interval,
            secrets: secrets.into_boxed_slice(),
            service_account,
            finished,
        }
    }
}

impl PodUse {
    /// Whether the pod uses the Secret `name` (in its own namespace).
    pub fn uses(&self, name: &str) -> bool {
        self.secrets.iter().any(|s| &**s == name)
    }
}

impl Lookup for PodUse {
    type DynamicType = ();

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.name))
    }
    fn namespace(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.namespace))
    }
    fn resource_version(&self) -> Option<Cow<'_, str>> {
        self.resource_version.as_deref().map(Cow::Borrowed)
    }
    fn uid(&self) -> Option<Cow<'_, str>> {
        self.uid.as_deref().map(Cow::Borrowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_the_secrets_and_the_interval_and_nothing_else() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                         "annotations": {"kvinject.io/refresh-interval": "30s", "other": "x"}},
            "spec": {
                "containers": [
                    {"name": "a", "image": "app:1", "env": [
                        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "value"}}},
                        {"name": "B", "value": "plain"}]},
                    {"name": "b", "env": [{"name": "C", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "value"}}}]}
                ],
                "imagePullSecrets": [{"name": "s1"}]
            }
        }))
        .unwrap();
        let u = PodUse::from(pod);
        assert_eq!((u.name.as_str(), u.namespace.as_str()), ("p", "ns"));
        assert_eq!(
            &*u.secrets,
            [Box::from("s1"), Box::from("s2")],
            "sorted, each once"
        );
        assert_eq!(u.refresh_interval.as_deref(), Some("30s"));
        assert!(u.uses("s1") && !u.uses("s3"));
        assert_eq!(u.uid().as_deref(), Some("u1"));
        assert_eq!(u.resource_version().as_deref(), Some("7"));
    }
}
