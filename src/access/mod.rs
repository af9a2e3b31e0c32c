//! Tenancy: which namespaces and ServiceAccounts may use which Key Vault secrets.
//!
//! Platform teams grant secrets with cluster-scoped AccessPolicy objects (`policy`). The
//! decision is pure (`grant`) and runs from a watch cache of the policies, at admission
//! and in the rotation controller; `cli` is `kvinject access check` and `kvinject crd`.

pub mod cli;
pub mod direct;
pub mod grant;
pub mod policy;

use crate::{generation::Generation, metrics::Metrics};
use futures::StreamExt;
use grant::Index;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use policy::AccessPolicy;
use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, RwLock},
};
use tracing::{info, warn};

/// `--access-policy`: whether references need an AccessPolicy.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A reference that no AccessPolicy grants is denied (default deny).
    Required,
    /// No check: every pod in an opted-in namespace may use every secret of every
    /// configured vault.
    Off,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Required => "required",
            Mode::Off => "off",
        }
    }
}

/// The current policies, compiled; replaced whole when any policy changes, so readers
/// never see half an update and never wait on a rebuild.
#[derive(Clone, Default)]
pub struct Policies(Arc<RwLock<Option<Arc<Index>>>>);

impl Policies {
    /// The policies in force; none (everything denied) before the first complete list.
    pub fn current(&self) -> Arc<Index> {
        self.loaded().unwrap_or_default()
    }

    /// `None` until the policies have been listed once: an empty index then would look like
    /// every grant revoked.
    pub fn loaded(&self) -> Option<Arc<Index>> {
        self.0.read().ok().and_then(|g| g.clone())
    }

    pub fn replace(&self, index: Index) {
        if let Ok(mut g) = self.0.write() {
            *g = Some(Arc::new(index));
        }
    }
}

/// Watches AccessPolicy objects: returns the handle, the store (for readiness) and the
/// future that keeps both current. The index is rebuilt once the initial list is complete
/// and then on each change, never per object of the initial list.
pub fn watch(
    client: &Client,
    metrics: &Metrics,
    changes: &Generation,
) -> (
    Policies,
    Store<AccessPolicy>,
    impl Future<Output = ()> + Send + use<>,
) {
    let (store, writer) = reflector::store();
    let policies = Policies::default();
    let drive = {
        let (store, policies, metrics, changes) =
            (store.clone(), policies.clone(), metrics.clone(), changes.clone());
        reflector::reflector(
            writer,
            watcher(
                Api::<AccessPolicy>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    let state = store.state();
                    let index = Index::new(state.iter().map(AsRef::as_ref));
                    metrics
                        .access_policies
                        .set(i64::try_from(index.len()).unwrap_or(i64::MAX));
                    info!(policies = index.len(), "access policies loaded");
                    policies.replace(index);
                    changes.bump();
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "watching AccessPolicy objects; retrying (is the CRD installed?)")
                }
            }
            futures::future::ready(())
        })
    };
    (policies, store, drive)
}

/// Namespace labels, from a watch cache.
#[derive(Clone)]
pub struct NamespaceLabels {
    store: Store<Namespace>,
    /// Asked when the cache does not know a namespace yet (it was just created).
    client: Option<Client>,
}

impl NamespaceLabels {
    pub fn new(store: Store<Namespace>, client: Option<Client>) -> Self {
        Self { store, client }
    }

    /// Whether the watch cache holds this namespace.
    pub fn knows(&self, namespace: &str) -> bool {
        self.store.get(&ObjectRef::new(namespace)).is_some()
    }

    /// The namespace's labels and annotations as the apiserver has them now, not as the
    /// cache last saw them (none when there is no client: router tests). A namespace that
    /// does not exist has none.
    pub async fn read(
        &self,
        namespace: &str,
    ) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>), kube::Error> {
        let Some(client) = &self.client else {
            return Ok(Default::default());
        };
        let ns = Api::<Namespace>::all(client.clone()).get_opt(namespace).await?;
        Ok(ns
            .map(|ns| {
                (
                    ns.metadata.labels.unwrap_or_default(),
                    ns.metadata.annotations.unwrap_or_default(),
                )
            })
            .unwrap_or_default())
    }

    /// The namespace's labels and annotations: from the cache, or from the apiserver for a
    /// namespace the cache does not hold yet (it was just created).
    pub async fn get(
        &self,
        namespace: &str,
    ) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>), kube::Error> {
        match self.store.get(&ObjectRef::new(namespace)) {
            Some(ns) => Ok((
                ns.metadata.labels.clone().unwrap_or_default(),
                ns.metadata.annotations.clone().unwrap_or_default(),
            )),
            None => self.read(namespace).await,
        }
    }
}
