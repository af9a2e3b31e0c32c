//! Integrity of kvinject's Secrets: only what kvinject sealed is its own. A labelled Secret
//! without a valid seal (forged, or copied from elsewhere) is never filled, rotated or
//! deleted, and gets one `ForeignSecret` Event; a sealed Secret whose value was edited by
//! hand gets its value back from Key Vault (the same version) and a `Restored` Event; a
//! Secret sealed with an older key is sealed again with the current one.

use super::{Controller, Written, decide, needed_for};
use crate::{
    inject::FIELD_MANAGER,
    materialize::{
        CachedSecret,
        seal::{self, Verdict},
    },
    reference::Reference,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::PostParams, runtime::events::EventType};
use std::{collections::BTreeSet, sync::Arc};
use tracing::{debug, info, warn};

impl Controller {
    /// Reports foreign Secrets once, restores edited ones, and re-seals old-key ones.
    /// Each Secret's verdict is the one the Secret watch reached (once per resourceVersion,
    /// before it dropped the value).
    pub(super) async fn guard_integrity(&mut self, secrets: &[Arc<CachedSecret>]) {
        let mut foreign_now = BTreeSet::new();
        for secret in secrets.iter().filter(|s| s.managed) {
            match secret.verdict_with(&self.inject.keys) {
                Verdict::Foreign => {
                    let key = secret.key();
                    if !self.foreign.contains(&key) {
                        warn!(secret = %key.1, namespace = %key.0, "a Secret carries kvinject's label without its seal; left alone");
                        let note = "carries kvinject's label but no valid kvinject seal: not created by kvinject, or its \
                                    reference or version was changed; kvinject never writes, deletes or hands it to a pod"
                            .to_owned();
                        self.secret_event(secret, EventType::Warning, "ForeignSecret", note)
                            .await;
                    }
                    foreign_now.insert(key);
                }
                Verdict::Edited => self.restore(secret).await,
                Verdict::Genuine
                    if secret.key_id.as_deref() != Some(self.inject.keys.current_id().as_str()) =>
                {
                    self.reseal(secret).await
                }
                _ => {}
            }
        }
        self.foreign = foreign_now;
    }

    /// Writes back the value of the version the Secret records, read from Key Vault.
    async fn restore(&self, secret: &CachedSecret) {
        let (Some(needed), Some(version)) = (needed_for(secret), decide::version_of(secret)) else {
            return;
        };
        let reference = needed.source.reference();
        // Not even read for a Secret the controller would not write.
        if let Some(hold) = self.hold(&secret.namespace, &needed) {
            debug!(secret = %secret.name, namespace = %secret.namespace, ?hold, "not restored");
            return;
        }
        // Editing a value by hand again and again must not spend the vault's budget.
        if !self.reads.take(&secret.namespace) {
            warn!(secret = %secret.name, namespace = %secret.namespace, "restore deferred: the namespace's Key Vault read budget is spent (--namespace-read-rate); retrying next sweep");
            return;
        }
        let pinned = Reference {
            version: Some(version.to_owned()),
            ..reference.secret()
        };
        let fetched = match self.source.fetch(&pinned, needed.identity.as_ref()).await {
            Ok(f) => f,
            Err(e) => {
                warn!(secret = %secret.name, error = %e, "cannot restore a hand-edited Secret yet; retrying next sweep");
                return;
            }
        };
        if self.write_value(secret, &fetched, true).await == Written::Yes {
            info!(secret = %secret.name, namespace = %secret.namespace, "restored a hand-edited value");
            let note = format!(
                "its value was changed by hand; restored {reference} version {version} from Key Vault"
            );
            self.secret_event(secret, EventType::Warning, "Restored", note)
                .await;
        }
    }

    /// Seals a genuine Secret again with the current key (after a key rotation). The seal
    /// covers the value, which the cache does not keep: the Secret is read first, and
    /// written only if it is still the one the cache showed and still genuine.
    async fn reseal(&self, secret: &CachedSecret) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &secret.namespace);
        let mut resealed = match api.get(&secret.name).await {
            Ok(s) => s,
            Err(e) => {
                warn!(secret = %secret.name, error = %e, "could not read a Secret to seal it with the current key; retrying next sweep");
                return;
            }
        };
        if resealed.metadata.resource_version.as_deref() != Some(secret.resource_version.as_str())
            || seal::verify(&self.inject.keys, &resealed) != Verdict::Genuine
        {
            // Changed meanwhile: the next sweep looks at it as it is now.
            return;
        }
        resealed.metadata.managed_fields = None;
        seal::seal(&self.inject.keys, &mut resealed);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        if let Err(e) = api.replace(&secret.name, &params, &resealed).await {
            warn!(secret = %secret.name, error = %e, "could not seal a Secret with the current key; retrying next sweep");
        }
    }
}
