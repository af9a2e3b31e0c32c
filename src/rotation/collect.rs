//! Garbage collection of materialized Secrets, and what counts as a reference: every
//! injected pod, and every pod template (Deployments, StatefulSets, DaemonSets, ReplicaSets,
//! Jobs, CronJobs) as the webhook would plan it.

use super::{Controller, decide, needed_for};
use crate::{materialize::CachedSecret, mutate::Needed};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Secret};
use kube::{
    Api,
    api::{Patch, PatchParams},
    runtime::{events::EventType, reflector::ObjectRef},
};
use serde_json::json;
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};
use tracing::{info, warn};

type Key = (String, String);

/// Where an annotation that does not parse sits.
enum BadAnnotation {
    Secret(Arc<CachedSecret>),
    Namespace(String),
}

impl BadAnnotation {
    fn describe(&self) -> String {
        match self {
            BadAnnotation::Secret(s) => {
                format!("Secret {}/{}", s.namespace, s.name)
            }
            BadAnnotation::Namespace(ns) => format!("Namespace {ns}"),
        }
    }
}

/// What refers to kvinject's Secrets at one moment: injected pods, and pod templates as the
/// webhook would plan them (with what each Secret is made from, and which object uses it).
pub(super) struct References {
    pub pods: BTreeSet<Key>,
    pub templates: BTreeMap<Key, (Needed, String)>,
}

impl References {
    pub fn contains(&self, key: &Key) -> bool {
        self.pods.contains(key) || self.templates.contains_key(key)
    }
}

impl Controller {
    /// Every reference to kvinject's Secrets, from the caches now.
    pub(super) fn references(&self) -> References {
        References {
            pods: self.used_by_pods(None),
            templates: self.template_needs(None),
        }
    }

    /// Marks, unmarks and deletes kvinject's Secrets by whether any injected pod or any
    /// workload template in their namespace refers to them. Secrets without kvinject's
    /// label and reference annotation are never touched.
    pub(super) async fn collect_garbage(&self, secrets: &[Arc<CachedSecret>], referenced: &References) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut graces: BTreeMap<String, Option<Duration>> = BTreeMap::new();
        // Annotations that do not parse: each gets one Warning Event per value.
        let mut bad: Vec<(BadAnnotation, String)> = Vec::new();
        for secret in secrets.iter().filter(|s| s.managed && needed_for(s).is_some()) {
            let (ns, name) = secret.key();
            let grace = *graces.entry(ns.clone()).or_insert_with(|| {
                let (grace, why) = decide::grace_for(
                    self.namespace_annotations(&ns)
                        .get(decide::GC_GRACE_ANNOTATION)
                        .map(String::as_str),
                    self.config.gc_grace,
                );
                bad.extend(why.map(|why| (BadAnnotation::Namespace(ns.clone()), why)));
                grace
            });
            let annotation = |key: &str| secret.annotation(key);
            let (retained, why) = decide::retained(annotation(decide::RETAIN_UNTIL_ANNOTATION), now);
            bad.extend(why.map(|why| (BadAnnotation::Secret(secret.clone()), why)));
            let Some(grace) = grace else {
                continue;
            };
            let mark = annotation(decide::UNREFERENCED_ANNOTATION);
            let used = retained || referenced.contains(&(ns.clone(), name.clone()));
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
            let result = match decide::collect(used, mark, now, grace) {
                decide::Collect::Keep => continue,
                decide::Collect::Unmark => {
                    let patch = json!({"metadata": {"annotations": {decide::UNREFERENCED_ANNOTATION: null}}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(|_| ())
                }
                decide::Collect::Mark => {
                    let patch = json!({"metadata": {"annotations": {decide::UNREFERENCED_ANNOTATION: now.to_string()}}});
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(|_| ())
                }
                decide::Collect::Delete => self.delete_as_read(secret).await.map(|deleted| {
                    if deleted {
                        info!(secret = %name, namespace = %ns, "collected: nothing has referred to it for the grace period");
                        self.metrics.secrets_collected.inc();
                    }
                }),
            };
            if let Err(e) = result {
                warn!(secret = %name, namespace = %ns, error = %e, "garbage collection step failed; retrying next pass");
            }
        }
        self.report_bad_annotations(bad).await;
    }

    /// One `BadAnnotation` Warning Event per object and value; a value fixed and broken
    /// again is reported again.
    async fn report_bad_annotations(&self, bad: Vec<(BadAnnotation, String)>) {
        let keyed: Vec<(String, BadAnnotation, String)> = bad
            .into_iter()
            .map(|(on, why)| (format!("{}\n{why}", on.describe()), on, why))
            .collect();
        let new: Vec<(BadAnnotation, String)> = match self.bad_annotations.lock() {
            Ok(mut reported) => {
                let now: BTreeSet<String> = keyed.iter().map(|(k, _, _)| k.clone()).collect();
                let new = keyed
                    .into_iter()
                    .filter(|(k, _, _)| !reported.contains(k))
                    .map(|(_, on, why)| (on, why))
                    .collect();
                *reported = now;
                new
            }
            Err(_) => return,
        };
        for (on, why) in new {
            warn!(object = %on.describe(), reason = %why, "an annotation kvinject reads does not parse");
            match on {
                BadAnnotation::Secret(secret) => {
                    self.secret_event(&secret, EventType::Warning, "BadAnnotation", why)
                        .await
                }
                BadAnnotation::Namespace(ns) => {
                    if let Some(namespace) = self.caches.namespaces.get(&ObjectRef::new(&ns)) {
                        self.event(namespace.as_ref(), EventType::Warning, "BadAnnotation", why)
                            .await
                    }
                }
            }
        }
    }

    /// The Secrets (`namespace`, `name`) that injected pods (in namespace `only`, or all)
    /// refer to.
    pub(super) fn used_by_pods(&self, only: Option<&str>) -> BTreeSet<(String, String)> {
        let mut used = BTreeSet::new();
        for p in self.caches.pods.state() {
            if only.is_some_and(|o| o != p.namespace) {
                continue;
            }
            used.extend(p.secrets.iter().map(|n| (p.namespace.clone(), n.to_string())));
        }
        used
    }

    /// The Secrets (`namespace`, `name`) that the pods of every pod template (in namespace
    /// `only`, or all) will use, as the webhook plans them: what each is made from, and
    /// which object (`Kind/name`) uses it. Templates of Deployments, StatefulSets,
    /// DaemonSets, ReplicaSets (bare, or a Deployment's old ones: a rollback needs them),
    /// Jobs and CronJobs count, whatever their replicas or suspension.
    pub(super) fn template_needs(&self, only: Option<&str>) -> BTreeMap<(String, String), (Needed, String)> {
        let mut out = BTreeMap::new();
        let mut add = |kind: &str, meta: &kube::api::ObjectMeta, template: Option<&PodTemplateSpec>| {
            let (Some(ns), Some(name), Some(template)) = (&meta.namespace, &meta.name, template) else {
                return;
            };
            if only.is_some_and(|o| o != ns) {
                return;
            }
            // A ServiceAccount whose identity cannot be told: its pods are denied, so its
            // template needs nothing (and is never a reason to read as kvinject).
            let Ok(identity) = self.template_identity(ns, template) else {
                return;
            };
            let annotations = self.namespace_annotations(ns);
            if let Some(plan) = decide::workload_plan(template, &self.inject, identity.as_ref(), &annotations)
            {
                for n in plan.needed {
                    out.insert((ns.clone(), n.secret_name.clone()), (n, format!("{kind}/{name}")));
                }
            }
        };
        for d in self.caches.deployments.state() {
            add("Deployment", &d.metadata, d.spec.as_ref().map(|s| &s.template));
        }
        for d in self.caches.statefulsets.state() {
            add("StatefulSet", &d.metadata, d.spec.as_ref().map(|s| &s.template));
        }
        for d in self.caches.daemonsets.state() {
            add("DaemonSet", &d.metadata, d.spec.as_ref().map(|s| &s.template));
        }
        for d in self.caches.replicasets.state() {
            add(
                "ReplicaSet",
                &d.metadata,
                d.spec.as_ref().and_then(|s| s.template.as_ref()),
            );
        }
        for d in self.caches.jobs.state() {
            add("Job", &d.metadata, d.spec.as_ref().map(|s| &s.template));
        }
        for d in self.caches.cronjobs.state() {
            let template = d
                .spec
                .as_ref()
                .and_then(|s| s.job_template.spec.as_ref())
                .map(|s| &s.template);
            add("CronJob", &d.metadata, template);
        }
        out
    }

    /// Deletes `secret` if it is still what was read (uid and resourceVersion): a Secret
    /// changed since is left for the next pass. False when it was already gone.
    pub(super) async fn delete_as_read(&self, secret: &CachedSecret) -> Result<bool, kube::Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &secret.namespace);
        let params = kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: Some(secret.resource_version.clone()).filter(|v| !v.is_empty()),
                uid: Some(secret.uid.clone()).filter(|u| !u.is_empty()),
            }),
            ..Default::default()
        };
        match api.delete(&secret.name, &params).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
