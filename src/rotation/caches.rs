//! The controller's watch caches: kvinject's Secrets (kept as their seal's verdict, never
//! their value), injected pods (as the Secrets they use), pod templates (cut to what can
//! use kvinject's Secrets) and namespaces; and the reflectors that fill them.

use super::pods;
use crate::{
    generation::Generation,
    materialize::{self, CachedSecret},
};
use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{Namespace, Pod, PodTemplateSpec, Secret},
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use std::fmt::Debug;
use tracing::warn;

/// Watch-backed caches the controller decides from.
#[derive(Clone)]
pub struct Caches {
    pub secrets: Store<CachedSecret>,
    /// Injected pods, as much of them as the controller decides from.
    pub pods: Store<pods::PodUse>,
    pub deployments: Store<Deployment>,
    pub statefulsets: Store<StatefulSet>,
    pub daemonsets: Store<DaemonSet>,
    /// Pod templates that only count as references (collection and recreation): bare and
    /// old ReplicaSets, Jobs and CronJobs. Stored without their status.
    pub replicasets: Store<ReplicaSet>,
    pub jobs: Store<Job>,
    pub cronjobs: Store<CronJob>,
    pub namespaces: Store<Namespace>,
}

impl Caches {
    /// Waits until every cache has listed once: acting on a partial view would, for one,
    /// make garbage collection think nothing refers to anything.
    pub async fn wait_ready(&self) {
        let _ = futures::join!(
            self.secrets.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.statefulsets.wait_until_ready(),
            self.daemonsets.wait_until_ready(),
            self.replicasets.wait_until_ready(),
            self.jobs.wait_until_ready(),
            self.cronjobs.wait_until_ready(),
            self.namespaces.wait_until_ready(),
        );
    }
}

/// What no cache of kvinject reads: managed fields (often the largest part of an object's
/// metadata) and the last-applied annotation; each object drops them before it is stored.
pub fn prune<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A watch-backed cache of every `K` matching `config`, and the future that keeps it.
/// Objects are stored pruned (`prune`).
pub fn reflect_with<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    reflect_modified(api, config, prune)
}

/// Like `reflect_with`, with `modify` applied to each object before it is stored.
pub(super) fn reflect_modified<K>(
    api: Api<K>,
    config: watcher::Config,
    modify: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let fut = drive(reflector::reflector(writer, watcher(api, config).modify(modify)));
    (store, fut)
}

/// Keeps a reflector's stream going, with backoff; failures are logged.
pub(super) fn drive<K: Send + 'static>(
    events: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
) -> BoxFuture<'static, ()> {
    Box::pin(events.default_backoff().for_each(|e| async move {
        if let Err(e) = e {
            warn!(error = %e, "watch failed; retrying");
        }
    }))
}

/// A watch event with its object turned into what the cache keeps.
pub(super) fn map_event<K, T>(event: watcher::Event<K>, f: impl Fn(K) -> T) -> watcher::Event<T> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(f(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(f(o)),
        watcher::Event::InitApply(o) => watcher::Event::InitApply(f(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// kvinject's own Secrets (by its label), each kept as a `CachedSecret`: its seal checked
/// with `keys` once per change, its value never held. When the keys that verify change
/// (`Keys::generation`, a key added or removed while serving), the watch starts again, so
/// every Secret is checked again under the new keys: a key added late makes its Secrets
/// genuine, one removed makes them foreign (`CachedSecret::verdict_with` covers the moment
/// in between). Returns the cache and the watch's events (as kept), which the caller drives.
pub fn reflect_secrets(
    client: &Client,
    keys: materialize::seal::Keys,
) -> (
    Store<CachedSecret>,
    impl futures::Stream<Item = watcher::Result<watcher::Event<CachedSecret>>> + Send + use<>,
) {
    let (store, writer) = reflector::store();
    let api = Api::<Secret>::all(client.clone());
    let events = futures::stream::repeat(()).flat_map(move |()| {
        let (generation, verify, current) = (keys.generation(), keys.clone(), keys.clone());
        let watch = watcher(
            api.clone(),
            watcher::Config::default().labels(materialize::SELECTOR),
        )
        .map(move |e| Some(e.map(|e| map_event(e, |s| CachedSecret::new(&verify, &s)))));
        // A tick a second, so a change of keys is seen while no Secret changes.
        let ticks = futures::stream::unfold((), |()| async {
            tokio::time::sleep(KEY_CHECK_EVERY).await;
            Some((None, ()))
        });
        futures::stream::select(watch, ticks)
            .take_while(move |_| std::future::ready(current.generation() == generation))
            .filter_map(std::future::ready)
    });
    (store, reflector::reflector(writer, events))
}

/// How often the Secret watch looks whether the signing keys changed.
const KEY_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `reflect_with` for every object of the API, counting each change in `changes` once the
/// cache holds it (the webhook decides from these caches: `generation`).
pub fn reflect<K>(api: Api<K>, changes: Generation) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    // The reflector has applied an event to the store when it hands it on.
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()).modify(prune))
        .inspect(move |event| {
            if event.is_ok() {
                changes.bump();
            }
        });
    (store, drive(events))
}

/// Starts the reflectors the controller needs (besides the Secret and Namespace stores it
/// shares with the webhook) and returns them with the future that drives them.
pub fn watch_workloads(
    client: &Client,
    secrets: Store<CachedSecret>,
    namespaces: Store<Namespace>,
) -> (Caches, impl Future<Output = ()> + Send + use<>) {
    // Injected pods, each kept as the Secrets it uses and the interval it asks for.
    let (pods, p) = {
        let (store, writer) = reflector::store();
        let api = Api::<Pod>::all(client.clone());
        let config = watcher::Config::default().labels(&format!("{}=true", crate::mutate::INJECTED_LABEL));
        let events = watcher(api, config).map(|e| e.map(|e| map_event(e, pods::PodUse::from)));
        (store, drive(reflector::reflector(writer, events)))
    };
    // Workloads: no status, and the pod template whole only where it can use kvinject's
    // Secrets.
    let (deployments, d) = reflect_templates(Api::<Deployment>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().map(|s| &mut s.template)
    });
    let (statefulsets, s) = reflect_templates(Api::<StatefulSet>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().map(|s| &mut s.template)
    });
    let (daemonsets, ds) = reflect_templates(Api::<DaemonSet>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().map(|s| &mut s.template)
    });
    let (replicasets, rs) = reflect_templates(Api::<ReplicaSet>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().and_then(|s| s.template.as_mut())
    });
    let (jobs, j) = reflect_templates(Api::<Job>::all(client.clone()), |o| {
        o.status = None;
        o.spec.as_mut().map(|s| &mut s.template)
    });
    let (cronjobs, cj) = reflect_templates(Api::<CronJob>::all(client.clone()), |o| {
        o.status = None;
        o.spec
            .as_mut()
            .and_then(|s| s.job_template.spec.as_mut())
            .map(|s| &mut s.template)
    });
    let caches = Caches {
        secrets,
        pods,
        deployments,
        statefulsets,
        daemonsets,
        replicasets,
        jobs,
        cronjobs,
        namespaces,
    };
    let drive = async move {
        futures::future::join_all([p, d, s, ds, rs, j, cj]).await;
    };
    (caches, drive)
}

/// A cache of a kind with a pod template (Deployments, StatefulSets, DaemonSets, and those
/// whose templates only keep Secrets from collection: ReplicaSets, Jobs, CronJobs). `strip`
/// drops an object's status and gives its pod template, which is cut to a skeleton (its
/// ServiceAccount, nothing else) when it mentions nothing of kvinject's (an `akv://`
/// reference or a `kvinject.io/` annotation: a conservative text search over its JSON).
/// Such a workload consumes no Secret of kvinject's but the registry credentials its
/// namespace may give every pod, which the skeleton still plans; so what is kept depends on
/// the template alone, never on what the namespace cache held when the watch saw it, and
/// most workloads of a cluster cost little more than their metadata.
pub(super) fn reflect_templates<K>(
    api: Api<K>,
    strip: fn(&mut K) -> Option<&mut PodTemplateSpec>,
) -> (Store<K>, BoxFuture<'static, ()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    reflect_modified(api, watcher::Config::default(), move |o: &mut K| {
        prune(o);
        let Some(template) = strip(o) else { return };
        let mentions_kvinject =
            serde_json::to_string(template).is_ok_and(|j| j.contains("akv://") || j.contains("kvinject.io/"));
        if !mentions_kvinject {
            *template = skeleton(template);
        }
    })
}

/// What planning a template that mentions nothing of kvinject's reads: the ServiceAccount
/// its pods run as (for the identity of a namespace's registry credentials).
pub(super) fn skeleton(template: &PodTemplateSpec) -> PodTemplateSpec {
    let service_account = template
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone());
    PodTemplateSpec {
        metadata: None,
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            service_account_name: service_account,
            ..Default::default()
        }),
    }
}
