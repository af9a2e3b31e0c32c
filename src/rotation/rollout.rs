//! Rolling the workloads that consume a rotated Secret: the decision per workload
//! (`decide::rollout_by_set`), paced restarts through the pod template, and evictions that
//! wait for Ready replacements and halt when they do not come.

use super::{Controller, decide, publish};
use decide::{Rollout, Strategy};
use k8s_openapi::{
    api::core::v1::{Pod, PodTemplateSpec},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        events::{EventType, Recorder},
        reflector,
    },
};
use serde_json::json;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    time::Duration,
};
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

/// What rolling needs of a workload kind (Deployment, StatefulSet, DaemonSet).
pub(super) trait Workload:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + k8s_openapi::serde::Serialize
    + Send
    + Sync
    + 'static
{
}

impl<K> Workload for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned
        + k8s_openapi::serde::Serialize
        + Send
        + Sync
        + 'static
{
}

impl Controller {
    /// Compares opted-in workloads (in `only` namespaces, or all) with the versions of the
    /// Secrets they consume, and records or rolls.
    pub(super) async fn reconcile_workloads(&self, only: Option<&BTreeSet<String>>) {
        if only.is_some_and(BTreeSet::is_empty) {
            return;
        }
        let keep = |ns: &str| only.is_none_or(|set| set.contains(ns));
        self.reconcile_kind(&self.caches.deployments, &keep, |d| {
            d.spec.as_ref().map(|s| (&s.template, &s.selector))
        })
        .await;
        self.reconcile_kind(&self.caches.statefulsets, &keep, |d| {
            d.spec.as_ref().map(|s| (&s.template, &s.selector))
        })
        .await;
        self.reconcile_kind(&self.caches.daemonsets, &keep, |d| {
            d.spec.as_ref().map(|s| (&s.template, &s.selector))
        })
        .await;
    }

    /// `reconcile_one` for each workload of one kind in the namespaces `keep` selects.
    async fn reconcile_kind<K>(
        &self,
        store: &reflector::Store<K>,
        keep: &(dyn Fn(&str) -> bool + Sync),
        spec: fn(&K) -> Option<(&PodTemplateSpec, &LabelSelector)>,
    ) where
        K: Workload,
    {
        for w in store
            .state()
            .iter()
            .filter(|w| keep(&w.namespace().unwrap_or_default()))
        {
            self.reconcile_one(w.as_ref(), spec(w)).await;
        }
    }

    async fn reconcile_one<K>(&self, workload: &K, spec: Option<(&PodTemplateSpec, &LabelSelector)>)
    where
        K: Workload,
    {
        let Some((template, selector)) = spec else { return };
        let ns = workload.meta().namespace.clone().unwrap_or_default();
        // A ServiceAccount whose identity cannot be told: its pods are denied, nothing to follow.
        let Ok(identity) = self.template_identity(&ns, template) else {
            return;
        };
        let Some(plan) = decide::workload_plan(
            template,
            &self.inject,
            identity.as_ref(),
            &self.namespace_annotations(&ns),
        ) else {
            return;
        };
        let asks = workload
            .meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(decide::ROLLOUT_ANNOTATION))
            .map(String::as_str)
            == Some("true");
        let names = decide::rollout_secrets(&plan, asks);
        if names.is_empty() {
            return;
        }
        let mut versions = BTreeMap::new();
        let version_of = |name: &str| {
            let object = reflector::ObjectRef::<crate::materialize::CachedSecret>::new(name).within(&ns);
            let secret = self.caches.secrets.get(&object)?;
            decide::rollout_version(&secret)
        };
        for name in names {
            // Pods admitted before names hashed 64 bits use the Secret under its old name
            // until they are replaced: it is the one whose versions roll them.
            let legacy = || {
                let needed = plan.needed.iter().find(|n| n.secret_name == name)?;
                let legacy = needed.source.legacy_secret_name_as(needed.identity.as_ref());
                Some((version_of(&legacy)?, legacy))
            };
            // Not materialized yet: its pods have not been admitted; nothing to compare.
            let Some((version, name)) = version_of(&name).map(|v| (v, name.clone())).or_else(legacy) else {
                return;
            };
            versions.insert(name, version);
        }
        let current = decide::versions_hash(&versions);
        let current_names = decide::names_hash(&versions);
        let annotations = workload.meta().annotations.clone().unwrap_or_default();
        let ns_annotation = self
            .caches
            .namespaces
            .get(&reflector::ObjectRef::new(&ns))
            .and_then(|n| {
                n.metadata
                    .annotations
                    .as_ref()?
                    .get(decide::ROLLOUT_ANNOTATION)
                    .cloned()
            });
        let opted = decide::opted_in(
            annotations.get(decide::ROLLOUT_ANNOTATION).map(String::as_str),
            ns_annotation.as_deref(),
            self.config.rollout_by_default,
        );
        let decision = decide::rollout_by_set(
            annotations.get(decide::VERSIONS_ANNOTATION).map(String::as_str),
            annotations.get(decide::NAMES_ANNOTATION).map(String::as_str),
            &current,
            &current_names,
            opted,
            annotations.get(decide::STRATEGY_ANNOTATION).map(String::as_str),
        );
        // An evict rollout that halted for these versions waits for new ones, or for the
        // annotation's removal.
        if let Ok(Rollout::Roll { hash, .. }) = &decision
            && annotations.get(decide::HALTED_ANNOTATION) == Some(hash)
        {
            return;
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let name = workload.meta().name.clone().unwrap_or_default();
        let kind = K::kind(&());
        let params = PatchParams::default();
        let restart = matches!(
            decision,
            Ok(Rollout::Roll {
                strategy: Strategy::Restart,
                ..
            })
        );
        // Serializes the workload: only asked when a restart is decided.
        let on_delete = restart && on_delete(workload);
        // Restarts are paced: so many workloads a sweep, the others at the next one.
        if restart
            && !on_delete
            && self.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                >= self.config.max_concurrent_rollouts
        {
            debug!(%kind, %name, namespace = %ns, "as many restarts as allowed this sweep; the next sweep rolls it");
            self.defer(&ns);
            return;
        }
        let patch = match decision {
            Ok(Rollout::None) => return,
            Err(message) => {
                self.event(workload, EventType::Warning, "RolloutRefused", message)
                    .await;
                // Record so the same refusal is not repeated every sweep.
                json!({"metadata": {"annotations": {decide::VERSIONS_ANNOTATION: current, decide::NAMES_ANNOTATION: current_names}}})
            }
            Ok(Rollout::Record { hash }) => {
                json!({"metadata": {"annotations": {decide::VERSIONS_ANNOTATION: hash, decide::NAMES_ANNOTATION: current_names}}})
            }
            Ok(Rollout::Roll {
                hash,
                strategy: Strategy::Restart,
            }) if on_delete => {
                // The template would change, but no pod would restart: say so, and do not
                // claim a rollout.
                warn!(%kind, %name, namespace = %ns, "a Secret it uses has a new version, but its updateStrategy is OnDelete");
                self.event(
                    workload,
                    EventType::Warning,
                    "RolloutNotApplied",
                    "a Key Vault secret it uses has a new version, but its updateStrategy is OnDelete: restarting through the pod template restarts nothing. Delete its pods, or set kvinject.io/rollout-strategy: evict".into(),
                )
                .await;
                // Not recorded as rolled (its pods still run the old versions); noted as
                // halted for these versions, so the Event is not repeated every sweep.
                json!({"metadata": {"annotations": {decide::HALTED_ANNOTATION: hash}}})
            }
            Ok(Rollout::Roll {
                hash,
                strategy: Strategy::Restart,
            }) => {
                self.metrics.rollouts.inc();
                info!(%kind, %name, namespace = %ns, "rolling: a Secret it uses has a new version");
                self.event(
                    workload,
                    EventType::Normal,
                    "RolloutOnRotation",
                    format!("a Key Vault secret it uses has a new version; restarting (versions {hash})"),
                )
                .await;
                // Pod template and stored hash in one write: rolled once per version set.
                json!({"metadata": {"annotations": {decide::VERSIONS_ANNOTATION: hash, decide::NAMES_ANNOTATION: current_names, decide::HALTED_ANNOTATION: null}},
                       "spec": {"template": {"metadata": {"annotations": {decide::VERSIONS_ANNOTATION: hash}}}}})
            }
            Ok(Rollout::Roll {
                hash,
                strategy: Strategy::Evict,
            }) => {
                self.start_eviction(workload, selector, hash, current_names).await;
                return;
            }
        };
        if let Err(e) = api.patch(&name, &params, &Patch::Merge(&patch)).await {
            warn!(%kind, %name, namespace = %ns, error = %e, "could not patch the workload; retrying next reconcile");
        } else {
            debug!(%kind, %name, namespace = %ns, "workload reconciled");
        }
    }

    /// Reconciles `ns`'s workloads again at the next sweep (a rollout waited for its turn).
    fn defer(&self, ns: &str) {
        if let Ok(mut deferred) = self.deferred.lock() {
            deferred.insert(ns.to_owned());
        }
    }

    /// The `evict` strategy: the workload's spec is left alone (GitOps tools see no drift);
    /// its pods are evicted one at a time through the Eviction API, which honours
    /// PodDisruptionBudgets, each after the previous one's replacement is Ready or a
    /// bounded wait ran out. The new versions are recorded when all are done, so a lease
    /// move or a crash mid-way runs the rollout again rather than losing it.
    async fn start_eviction<K>(&self, workload: &K, selector: &LabelSelector, hash: String, names: String)
    where
        K: Workload,
    {
        let ns = workload.meta().namespace.clone().unwrap_or_default();
        let name = workload.meta().name.clone().unwrap_or_default();
        let key = format!("{}/{ns}/{name}", K::kind(&()));
        let Some(selector) = selector_string(selector) else {
            self.event(
                workload,
                EventType::Warning,
                "RolloutRefused",
                "its selector cannot be used to find its pods; nothing was evicted".into(),
            )
            .await;
            return;
        };
        let max = self.config.max_concurrent_rollouts;
        let started = self.evicting.lock().map(|mut set| {
            if set.contains(&key) {
                Err(true) // already under way
            } else if set.len() >= max {
                Err(false)
            } else {
                set.insert(key.clone());
                Ok(())
            }
        });
        match started {
            Ok(Ok(())) => {}
            Ok(Err(true)) | Err(_) => return,
            Ok(Err(false)) => {
                debug!(workload = %key, max, "as many evictions as allowed are under way; waiting");
                self.defer(&ns);
                return;
            }
        }
        info!(workload = %key, "rolling by eviction: a Secret it uses has a new version");
        let (client, recorder, metrics, evicting) = (
            self.client.clone(),
            self.recorder.clone(),
            self.metrics.clone(),
            self.evicting.clone(),
        );
        let leading = self.leading.clone();
        let timeout = self.config.evict_ready_timeout;
        let regarding = workload.object_ref(&());
        let workloads: Api<K> = Api::namespaced(client.clone(), &ns);
        tokio::spawn(async move {
            let outcome = evict_pods(&client, &recorder, &regarding, &ns, &selector, timeout, leading).await;
            let patch = match &outcome {
                Evicted::Done => Some(json!({"metadata": {"annotations": {
                    decide::VERSIONS_ANNOTATION: hash,
                    decide::NAMES_ANNOTATION: names,
                    decide::HALTED_ANNOTATION: null,
                }}})),
                Evicted::Halted { pod } => {
                    warn!(workload = %key, %pod, "a replacement did not become Ready in time; evicting no further pod");
                    metrics.rollouts_halted.inc();
                    let note = format!(
                        "no replacement pod became Ready within {timeout:?} after evicting {pod}; no further pod is evicted for these versions. kvinject resumes at the next new version, or when the annotation {} is removed",
                        decide::HALTED_ANNOTATION
                    );
                    publish(&recorder, &regarding, EventType::Warning, "RolloutHalted", note).await;
                    Some(json!({"metadata": {"annotations": {decide::HALTED_ANNOTATION: hash}}}))
                }
                Evicted::Stopped => None,
            };
            if let Some(patch) = patch {
                match workloads
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        if outcome == Evicted::Done {
                            metrics.rollouts.inc();
                        }
                    }
                    Err(e) => warn!(workload = %key, error = %e, "could not record how the rollout ended"),
                }
            }
            if let Ok(mut set) = evicting.lock() {
                set.remove(&key);
            }
        });
    }
}

/// Whether a workload's pods change only when deleted (`updateStrategy: OnDelete`, which
/// StatefulSets and DaemonSets may have).
fn on_delete<K: k8s_openapi::serde::Serialize>(workload: &K) -> bool {
    serde_json::to_value(workload)
        .ok()
        .and_then(|v| {
            v.pointer("/spec/updateStrategy/type")?
                .as_str()
                .map(|t| t == "OnDelete")
        })
        .unwrap_or(false)
}

/// Ready by kubelet's report, and not on its way out: a pod being deleted keeps its Ready
/// condition until kubelet has stopped it, and is nobody's replacement.
fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// How many of `pods` are Ready replacements: pods that were not there when the rollout
/// listed them (by UID: a StatefulSet's replacement keeps its name), and Ready.
fn ready_replacements(pods: &[Pod], before: &BTreeSet<String>) -> usize {
    pods.iter()
        .filter(|p| !before.contains(p.uid().unwrap_or_default().as_str()) && is_ready(p))
        .count()
}

/// How an eviction rollout ended.
#[derive(Debug, PartialEq, Eq)]
enum Evicted {
    /// Every pod was evicted and replaced by a Ready one.
    Done,
    /// Stopped before the end (lost the Lease, an eviction failed): retried later.
    Stopped,
    /// A replacement did not become Ready in time after evicting `pod`: no further pod is
    /// evicted for these versions.
    Halted { pod: String },
}

/// Evicts the pods matching `selector` one at a time. After each, waits until as many
/// Ready pods that were not there before (by UID: a StatefulSet's replacement keeps its
/// name) as pods evicted so far exist; when they do not come within `ready_timeout`, stops.
async fn evict_pods(
    client: &Client,
    recorder: &Recorder,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    ns: &str,
    selector: &str,
    ready_timeout: Duration,
    leading: Option<watch::Receiver<bool>>,
) -> Evicted {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list_params = kube::api::ListParams::default().labels(selector);
    // Oldest first: those started longest ago are the likeliest to run old values (after a
    // halt, the replacement made then is the newest).
    // Every pod there now, terminating ones too, is not a replacement.
    let mut before: BTreeSet<String> = BTreeSet::new();
    let initial: Vec<(String, String)> = match pods.list(&list_params).await {
        Ok(mut l) => {
            l.items.sort_by(|a, b| {
                (a.metadata.creation_timestamp.as_ref().map(|t| t.0), a.name_any())
                    .cmp(&(b.metadata.creation_timestamp.as_ref().map(|t| t.0), b.name_any()))
            });
            before.extend(l.items.iter().map(|p| p.uid().unwrap_or_default()));
            l.items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
                .collect()
        }
        Err(e) => {
            warn!(error = %e, "listing pods to evict");
            return Evicted::Stopped;
        }
    };
    let still_leading = || leading.as_ref().is_none_or(|l| *l.borrow());
    for (evicted, (pod, _)) in initial.iter().enumerate() {
        if !still_leading() {
            return Evicted::Stopped;
        }
        // A PodDisruptionBudget answers 429 while evicting would break it: wait and retry.
        let deadline = Instant::now() + ready_timeout.max(Duration::from_secs(30));
        loop {
            match pods.evict(pod, &kube::api::EvictParams::default()).await {
                Ok(_) => break,
                Err(kube::Error::Api(s)) if s.code == 404 => break,
                Err(kube::Error::Api(s)) if s.code == 429 && Instant::now() < deadline && still_leading() => {
                    tokio::time::sleep(Duration::from_secs(2)).await
                }
                Err(e) => {
                    publish(
                        recorder,
                        regarding,
                        EventType::Warning,
                        "EvictionFailed",
                        format!("evicting pod {pod}: {e}; the rollout will be retried"),
                    )
                    .await;
                    return Evicted::Stopped;
                }
            }
        }
        publish(
            recorder,
            regarding,
            EventType::Normal,
            "Evicted",
            format!("evicted pod {pod}: a Key Vault secret it uses has a new version"),
        )
        .await;
        let wanted = evicted + 1;
        let waited = tokio::time::timeout(ready_timeout, async {
            loop {
                if !still_leading() {
                    return false;
                }
                if let Ok(list) = pods.list(&list_params).await
                    && ready_replacements(&list.items, &before) >= wanted
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
        .await;
        match waited {
            Ok(true) => {}
            Ok(false) => return Evicted::Stopped,
            Err(_) => {
                return Evicted::Halted { pod: pod.clone() };
            }
        }
    }
    Evicted::Done
}

/// A label selector in the list API's string form; `None` for an operator it cannot express.
fn selector_string(selector: &LabelSelector) -> Option<String> {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            _ => return None,
        });
    }
    // An empty selector would select every pod in the namespace: refuse it.
    (!parts.is_empty()).then(|| parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_ready_pods_that_are_not_terminating_count_as_replacements() {
        let pod = |uid: &str, ready: bool, deleting: bool| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": uid, "uid": uid,
                             "deletionTimestamp": deleting.then_some("2026-12-07T00:00:00Z")},
                "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
            }))
            .unwrap()
        };
        let before: BTreeSet<String> = ["old", "leaving"].map(String::from).into();
        let pods = [
            pod("old", true, false),
            // Terminating from an earlier rollout, still reported Ready: listed before,
            // and on its way out either way.
            pod("leaving", true, true),
            pod("gone-soon", true, true),
            pod("starting", false, false),
            pod("new", true, false),
        ];
        assert_eq!(ready_replacements(&pods, &before), 1, "only `new`");
    }

    #[test]
    fn selectors() {
        let sel = |v: serde_json::Value| selector_string(&serde_json::from_value(v).unwrap());
        assert_eq!(
            sel(json!({"matchLabels": {"app": "web"}})),
            Some("app=web".into())
        );
        assert_eq!(
            sel(
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}, {"key": "x", "operator": "DoesNotExist"}]})
            ),
            Some("tier in (a,b),!x".into())
        );
        assert_eq!(sel(json!({})), None, "an empty selector would match every pod");
    }
}
