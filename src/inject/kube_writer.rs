//! Writing materialized Secrets through the apiserver: create (a conflict is fine when
//! another replica sealed the same reference first), look up a name the cache does not
//! know, and clear a Secret's garbage-collection mark conditionally.

use super::{SecretWriter, WriteError};
use crate::{
    access::direct,
    materialize::{
        self, CachedSecret, FIELD_MANAGER,
        seal::{self, Verdict},
    },
};
use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::PostParams};

/// Creates Secrets through the apiserver; `keys` tell an existing Secret of the same name
/// that kvinject sealed (another replica was first) from a foreign one.
pub struct KubeWriter {
    pub client: kube::Client,
    pub keys: seal::Keys,
}

#[async_trait]
impl SecretWriter for KubeWriter {
    async fn find(&self, namespace: &str, name: &str) -> Result<direct::Found, WriteError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(None) => Ok(direct::Found::Absent),
            Ok(Some(s)) if materialize::is_managed(&s) => {
                Ok(direct::Found::Ours(CachedSecret::new(&self.keys, &s)))
            }
            Ok(Some(_)) => Ok(direct::Found::Theirs),
            Err(e) => Err(WriteError::Api {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                detail: format!("reading it to check what a pod names failed: {e}"),
            }),
        }
    }

    async fn unmark(&self, namespace: &str, name: &str, resource_version: &str) -> Result<bool, WriteError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let failed = |detail: String| WriteError::Api {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            detail,
        };
        let mut version = resource_version.to_owned();
        // Another write in between (a rotation, a mark): read it again, a few times.
        for _ in 0..3 {
            let patch = serde_json::json!({"metadata": {
                "resourceVersion": version,
                "annotations": {crate::rotation::decide::UNREFERENCED_ANNOTATION: null},
            }});
            let params = kube::api::PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            match api.patch(name, &params, &kube::api::Patch::Merge(&patch)).await {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
                Err(kube::Error::Api(s)) if s.code == 409 => match api.get_opt(name).await {
                    Ok(None) => return Ok(false),
                    Ok(Some(current)) => version = current.metadata.resource_version.unwrap_or_default(),
                    Err(e) => {
                        return Err(failed(format!(
                            "reading it to clear its unreferenced mark failed: {e}"
                        )));
                    }
                },
                Err(e) => return Err(failed(format!("clearing its unreferenced mark failed: {e}"))),
            }
        }
        Err(failed(
            "clearing its unreferenced mark kept conflicting with other writes".into(),
        ))
    }

    async fn create(&self, secret: Secret) -> Result<(), WriteError> {
        let namespace = secret.metadata.namespace.clone().unwrap_or_default();
        let name = secret.metadata.name.clone().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        let api_error = |e: kube::Error| WriteError::Api {
            namespace: namespace.clone(),
            name: name.clone(),
            detail: e.to_string(),
        };
        match api.create(&params, &secret).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = api.get(&name).await.map_err(api_error)?;
                let reference = |s: &Secret| {
                    s.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(materialize::REFERENCE_ANNOTATION).cloned())
                };
                let sealed = seal::verify(&self.keys, &existing) != Verdict::Foreign;
                if materialize::is_managed(&existing) && sealed && reference(&existing) == reference(&secret)
                {
                    Ok(())
                } else {
                    Err(WriteError::NotOurs {
                        namespace,
                        name,
                        reference: reference(&secret).unwrap_or_default(),
                    })
                }
            }
            Err(e) => Err(api_error(e)),
        }
    }
}
