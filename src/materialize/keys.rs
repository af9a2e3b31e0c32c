//! The signing keys' home: a Secret in kvinject's own namespace, created by the first
//! replica that starts and read by the others, like the bootstrap certificate.
//!
//! Layout: `data` maps key ids to 32 random bytes; the annotation `kvinject.io/current-key`
//! names the one that signs. Every key in the Secret verifies, so rotating is: add a key,
//! point the annotation at it, restart kvinject (rolling); the rotation controller re-seals
//! every Secret still signed with another key; then remove the old key.

use super::seal::{self, Keys};
use anyhow::{Context, bail};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, api::PostParams};
use std::collections::BTreeMap;
use tracing::info;

/// Label on the signing-key Secret: a Secret of that name without it is not kvinject's.
pub const KEY_LABEL: &str = "kvinject.io/signing-key";
pub const CURRENT_ANNOTATION: &str = "kvinject.io/current-key";

/// Reads the keys from `namespace/name`, creating the Secret with a first key when absent.
pub async fn load_or_create(client: &Client, namespace: &str, name: &str) -> anyhow::Result<Keys> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match api
        .get_opt(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?
    {
        Some(s) => s,
        None => {
            let id = format!("k{}", k8s_openapi::jiff::Timestamp::now().as_second());
            let mut s = Secret::default();
            s.metadata.name = Some(name.to_owned());
            s.metadata.labels = Some(BTreeMap::from([(KEY_LABEL.to_owned(), "true".to_owned())]));
            s.metadata.annotations = Some(BTreeMap::from([(CURRENT_ANNOTATION.to_owned(), id.clone())]));
            s.data = Some(BTreeMap::from([(id, ByteString(seal::random_key()))]));
            match api.create(&PostParams::default(), &s).await {
                Ok(created) => {
                    info!(secret = %name, %namespace, "created the signing key for materialized Secrets");
                    created
                }
                // Another replica was first: use its key.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    api.get(name).await.context("reading the signing key")?
                }
                Err(e) => return Err(e).with_context(|| format!("creating Secret {namespace}/{name}")),
            }
        }
    };
    keys_of(&secret).with_context(|| format!("Secret {namespace}/{name}"))
}

fn keys_of(secret: &Secret) -> anyhow::Result<Keys> {
    let labelled = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(KEY_LABEL))
        .map(String::as_str)
        == Some("true");
    if !labelled {
        bail!(
            "exists but was not created by kvinject (no {KEY_LABEL} label); delete it or choose another --signing-key-secret"
        );
    }
    let current = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CURRENT_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    let material = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    Ok(Keys::new(&current, material)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_must_be_kvinjects_and_name_a_current_key() {
        let mut s = Secret {
            data: Some(BTreeMap::from([("k1".to_owned(), ByteString(vec![1; 32]))])),
            ..Default::default()
        };
        s.metadata.annotations = Some(BTreeMap::from([(CURRENT_ANNOTATION.to_owned(), "k1".to_owned())]));
        assert!(
            keys_of(&s)
                .unwrap_err()
                .to_string()
                .contains("was not created by kvinject")
        );
        s.metadata.labels = Some(BTreeMap::from([(KEY_LABEL.to_owned(), "true".to_owned())]));
        assert_eq!(keys_of(&s).unwrap().current_id(), "k1");
        s.metadata.annotations = Some(BTreeMap::from([(CURRENT_ANNOTATION.to_owned(), "k2".to_owned())]));
        assert!(format!("{:#}", keys_of(&s).unwrap_err()).contains("current signing key `k2`"));
    }
}
