//! ServiceAccounts as the webhook and the controller see them: a watch cache (a GET when it
//! does not know one yet), and the identity each one's pods read Key Vault as.

use crate::identity::{self, IdentityError, WorkloadIdentity};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    Api,
    runtime::reflector::{ObjectRef, Store},
};
use std::{collections::BTreeMap, sync::Arc};

/// ServiceAccounts, from a watch cache (a GET when it does not know one yet), and the
/// identity each one's pods read Key Vault as.
#[derive(Clone)]
pub struct ServiceAccounts {
    pub store: Store<ServiceAccount>,
    pub client: Option<kube::Client>,
    pub settings: Arc<identity::Settings>,
}

impl ServiceAccounts {
    /// From the cache alone (a ServiceAccount it does not know: kvinject's identity).
    pub fn cached(&self, namespace: &str, name: &str) -> Result<Option<WorkloadIdentity>, IdentityError> {
        let sa = self.store.get(&ObjectRef::new(name).within(namespace));
        let annotations = sa
            .and_then(|sa| sa.metadata.annotations.clone())
            .unwrap_or_default();
        identity::resolve(namespace, name, &annotations, &self.settings)
    }

    /// Whether the watch cache holds this ServiceAccount.
    pub fn knows(&self, namespace: &str, name: &str) -> bool {
        self.store.get(&ObjectRef::new(name).within(namespace)).is_some()
    }

    pub async fn of(&self, namespace: &str, name: &str) -> Result<Option<WorkloadIdentity>, IdentityError> {
        let cached = self.store.get(&ObjectRef::new(name).within(namespace));
        let annotations = match (cached, &self.client) {
            (Some(sa), _) => sa.metadata.annotations.clone().unwrap_or_default(),
            // Not readable is not "says nothing": that may be kvinject's own identity.
            (None, Some(client)) => Api::<ServiceAccount>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(|e| IdentityError::Unreadable {
                    namespace: namespace.to_owned(),
                    service_account: name.to_owned(),
                    detail: e.to_string(),
                })?
                .and_then(|sa| sa.metadata.annotations)
                .unwrap_or_default(),
            (None, None) => BTreeMap::new(),
        };
        identity::resolve(namespace, name, &annotations, &self.settings)
    }
}
