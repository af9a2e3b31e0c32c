//! The Secret a reference is materialized as (pure), and the metadata kvinject recognises
//! its own Secrets by.

pub mod cached;
pub mod keys;
pub mod seal;
pub mod value;

use crate::{
    materialize::value::Fetched,
    mutate::{self, Needed, Source},
};
use base64::Engine;
pub use cached::CachedSecret;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The field manager of every write kvinject makes.
pub const FIELD_MANAGER: &str = "kvinject";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "kvinject";
/// Label selector for kvinject's own Secrets.
pub const SELECTOR: &str = "app.kubernetes.io/managed-by=kvinject";
pub const REFERENCE_ANNOTATION: &str = "kvinject.io/reference";
pub const VERSION_ANNOTATION: &str = "kvinject.io/version";
pub const REGISTRY_ANNOTATION: &str = "kvinject.io/registry";
pub const USERNAME_ANNOTATION: &str = "kvinject.io/username";
/// On a Secret read with a workload identity: whose (ServiceAccount, client id, tenant).
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "kvinject.io/service-account";
pub const CLIENT_ID_ANNOTATION: &str = "kvinject.io/client-id";
pub const TENANT_ID_ANNOTATION: &str = "kvinject.io/tenant-id";
/// On a materialized Secret whose Key Vault secret was not found at the last check (deleted
/// in the vault): when that was first seen. The value is kept; the rotation controller
/// sets and clears it, the webhook warns about it.
pub const MISSING_ANNOTATION: &str = "kvinject.io/missing-in-vault-since";
/// The controller's signature over that mark (`seal::missing_mark`): a mark a tenant set or
/// copied by hand is not taken for the controller's.
pub const MISSING_SEAL_ANNOTATION: &str = "kvinject.io/missing-in-vault-seal";
/// On a materialized Secret whose hand-edited value the controller restored: when. Part of
/// what its consumers are rolled by, so pods that started on the edited value are replaced
/// once; a new version drops it.
pub const RESTORED_ANNOTATION: &str = "kvinject.io/restored-at";
/// The type of the Secrets that hold registry credentials.
pub const DOCKER_CONFIG_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// Secrets hold at most 1 MiB of data; the rest is left for metadata.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024 - 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("the value of {reference} is {size} bytes, more than a Secret can hold ({max} bytes)")]
    TooLarge {
        reference: String,
        size: usize,
        max: usize,
    },
    #[error("the value of {reference} is not JSON ({why}), so it has no field `{field}`")]
    NotJson {
        reference: String,
        field: String,
        why: String,
    },
    #[error("the JSON value of {reference} has no field `{field}` (it stops at `{missing}`)")]
    NoField {
        reference: String,
        field: String,
        missing: String,
    },
    #[error("the value of {reference} is not a docker config JSON ({why})")]
    NotDockerConfig { reference: String, why: String },
}

/// True when `secret` carries kvinject's managed-by label.
pub fn is_managed(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .map(String::as_str)
        == Some(MANAGED_BY)
}

/// Builds the Secret `needed` is materialized as in `namespace`, from its fetched value,
/// sealed with `keys`.
pub fn desired_secret(
    namespace: &str,
    needed: &Needed,
    fetched: &Fetched,
    keys: &seal::Keys,
) -> Result<Secret, ValueError> {
    let reference = needed.source.reference().to_string();
    let extracted = match &needed.source.reference().field {
        Some(field) => Some(extract_field(fetched.value.expose(), field, &reference)?),
        None => None,
    };
    let raw = extracted.as_deref().unwrap_or(fetched.value.expose());
    if raw.len() > MAX_VALUE_BYTES {
        return Err(ValueError::TooLarge {
            reference,
            size: raw.len(),
            max: MAX_VALUE_BYTES,
        });
    }
    let mut annotations = BTreeMap::from([
        (REFERENCE_ANNOTATION.to_owned(), reference.clone()),
        (VERSION_ANNOTATION.to_owned(), fetched.version.clone()),
    ]);
    if let Some(identity) = &needed.identity {
        annotations.insert(
            SERVICE_ACCOUNT_ANNOTATION.to_owned(),
            identity.service_account.clone(),
        );
        annotations.insert(CLIENT_ID_ANNOTATION.to_owned(), identity.client_id.clone());
        annotations.insert(TENANT_ID_ANNOTATION.to_owned(), identity.tenant_id.clone());
    }
    let (type_, key, data) = match &needed.source {
        Source::Env(_) => ("Opaque", mutate::VALUE_KEY, raw.as_bytes().to_vec()),
        Source::DockerConfig(_) => {
            check_docker_config(raw).map_err(|why| ValueError::NotDockerConfig { reference, why })?;
            (
                "kubernetes.io/dockerconfigjson",
                ".dockerconfigjson",
                raw.as_bytes().to_vec(),
            )
        }
        Source::RegistryLogin {
            registry, username, ..
        } => {
            annotations.insert(REGISTRY_ANNOTATION.to_owned(), registry.clone());
            annotations.insert(USERNAME_ANNOTATION.to_owned(), username.clone());
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{raw}"));
            let config = json!({"auths": {registry: {"username": username, "password": raw, "auth": auth}}});
            (
                "kubernetes.io/dockerconfigjson",
                ".dockerconfigjson",
                serde_json::to_vec(&config).unwrap_or_default(),
            )
        }
    };
    let mut secret = Secret::default();
    secret.metadata.name = Some(needed.secret_name.clone());
    secret.metadata.namespace = Some(namespace.to_owned());
    secret.metadata.labels = Some(BTreeMap::from([(
        MANAGED_BY_LABEL.to_owned(),
        MANAGED_BY.to_owned(),
    )]));
    secret.metadata.annotations = Some(annotations);
    secret.type_ = Some(type_.to_owned());
    secret.data = Some(BTreeMap::from([(key.to_owned(), ByteString(data))]));
    seal::seal(keys, &mut secret);
    Ok(secret)
}

/// The value of `field` (`a.b`: key `b` under key `a`; a number indexes an array) in the JSON
/// document `raw`: a string as it is, anything else as its JSON text. Errors name positions
/// and fields only, never the content.
fn extract_field(raw: &str, field: &str, reference: &str) -> Result<String, ValueError> {
    let doc: Value = serde_json::from_str(raw).map_err(|e| ValueError::NotJson {
        reference: reference.to_owned(),
        field: field.to_owned(),
        why: format!("syntax error at line {} column {}", e.line(), e.column()),
    })?;
    let mut at = &doc;
    for segment in field.split('.') {
        let next = match at {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        at = next.ok_or_else(|| ValueError::NoField {
            reference: reference.to_owned(),
            field: field.to_owned(),
            missing: segment.to_owned(),
        })?;
    }
    Ok(match at {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// Checks the shape the kubelet expects: `{"auths": {"<registry>": {...}, ...}}`. The
/// reasons name positions and fields only, never the content.
fn check_docker_config(raw: &str) -> Result<(), String> {
    let doc: Value = serde_json::from_str(raw).map_err(|e| {
        format!(
            "not JSON: syntax error at line {} column {}",
            e.line(),
            e.column()
        )
    })?;
    let auths = doc.get("auths").ok_or("it has no \"auths\" object")?;
    let auths = auths.as_object().ok_or("\"auths\" is not an object")?;
    if auths.is_empty() {
        return Err("\"auths\" names no registry".into());
    }
    for (i, entry) in auths.values().enumerate() {
        if !entry.is_object() {
            return Err(format!("entry {} of \"auths\" is not an object", i + 1));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{keyvault::SecretValue, reference::Reference};

    fn r(name: &str) -> Reference {
        Reference {
            vault: "main".into(),
            name: name.into(),
            version: None,
            field: None,
        }
    }

    fn fetched(v: &str) -> Fetched {
        Fetched {
            value: SecretValue::new(v),
            version: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    #[test]
    fn env_secret_holds_only_the_value_and_says_where_it_came_from() {
        let n = Needed::own_read(Source::Env(r("db")));
        let keys = seal::Keys::default();
        let mut s = desired_secret("team-a", &n, &fetched("s3cret"), &keys).unwrap();
        assert_eq!(
            seal::verify(&keys, &s),
            seal::Verdict::Genuine,
            "sealed with kvinject's key"
        );
        let signature = s
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(seal::SIGNATURE_ANNOTATION)
            .unwrap();
        assert!(!signature.contains("czNjcmV0") && !signature.contains("s3cret"));
        let want: Secret = serde_json::from_value(json!({
            "metadata": {
                "name": n.secret_name, "namespace": "team-a",
                "labels": {"app.kubernetes.io/managed-by": "kvinject"},
                "annotations": {"kvinject.io/reference": "akv://main/db", "kvinject.io/version": "0123456789abcdef0123456789abcdef"}
            },
            "type": "Opaque",
            "data": {"value": "czNjcmV0"}
        }))
        .unwrap();
        assert_eq!(s, want);
        assert!(is_managed(&s));
    }

    #[test]
    fn docker_configs_are_checked_without_echoing_them() {
        let n = Needed::own_read(Source::DockerConfig(r("acr")));
        let ok = r#"{"auths":{"r.example":{"auth":"dTpw"}}}"#;
        let s = desired_secret("ns", &n, &fetched(ok), &Default::default()).unwrap();
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        assert_eq!(s.data.unwrap()[".dockerconfigjson"].0, ok.as_bytes());
        for bad in [
            "hunter2-not-json",
            r#"{"auths":"hunter2"}"#,
            r#"{"hunter2":{}}"#,
            r#"{"auths":{}}"#,
            r#"{"auths":{"r":"hunter2"}}"#,
        ] {
            let err = desired_secret("ns", &n, &fetched(bad), &Default::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("the value of akv://main/acr is not a docker config JSON"),
                "{err}"
            );
            assert!(!err.contains("hunter2"), "the value leaked into {err}");
        }
    }

    #[test]
    fn registry_logins_become_docker_configs() {
        let n = Needed::own_read(Source::RegistryLogin {
            registry: "r.example".into(),
            username: "app-id".into(),
            password: r("sp"),
        });
        let s = desired_secret("ns", &n, &fetched("pw"), &Default::default()).unwrap();
        let config: Value = serde_json::from_slice(&s.data.unwrap()[".dockerconfigjson"].0).unwrap();
        assert_eq!(
            config,
            json!({"auths": {"r.example": {"username": "app-id", "password": "pw", "auth": "YXBwLWlkOnB3"}}})
        );
        assert_eq!(
            s.metadata.annotations.unwrap()["kvinject.io/registry"],
            "r.example"
        );
    }

    #[test]
    fn one_field_of_a_json_secret_is_materialized_and_errors_never_echo_it() {
        let doc = r#"{"username": "app", "password": "hunter2", "db": {"port": 5432, "hosts": ["a", "b"]}}"#;
        let with_field = |f: &str| {
            let mut r = r("svc");
            r.field = Some(f.into());
            Needed::own_read(Source::Env(r))
        };
        let value = |f: &str| {
            desired_secret("ns", &with_field(f), &fetched(doc), &Default::default())
                .map(|s| s.data.unwrap()["value"].0.clone())
        };
        assert_eq!(value("password").unwrap(), b"hunter2");
        assert_eq!(value("db.port").unwrap(), b"5432", "a number as its JSON text");
        assert_eq!(value("db.hosts.1").unwrap(), b"b");
        assert_eq!(value("db").unwrap(), br#"{"hosts":["a","b"],"port":5432}"#);
        let missing = value("db.user").unwrap_err().to_string();
        assert_eq!(
            missing,
            "the JSON value of akv://main/svc#db.user has no field `db.user` (it stops at `user`)"
        );
        let not_json = desired_secret(
            "ns",
            &with_field("password"),
            &fetched("hunter2 is not json"),
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            not_json.starts_with("the value of akv://main/svc#password is not JSON"),
            "{not_json}"
        );
        for err in [missing, not_json] {
            assert!(!err.contains("hunter2"), "the value leaked into {err}");
        }
        assert_ne!(
            with_field("password").secret_name,
            with_field("username").secret_name,
            "a Secret per field"
        );
    }

    #[test]
    fn oversized_values_are_refused() {
        let n = Needed::own_read(Source::Env(r("big")));
        let err = desired_secret(
            "ns",
            &n,
            &fetched(&"x".repeat(MAX_VALUE_BYTES + 1)),
            &Default::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ValueError::TooLarge { .. }), "{err}");
    }
}
