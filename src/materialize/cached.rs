//! What the caches keep of one of kvinject's Secrets (pure): who it is, the annotations
//! kvinject reads, and what its seal said. Never its value: the webhook needs only the
//! version a Secret holds, and the rotation controller reads a Secret before it writes one.
//!
//! The Secret watch builds one from each Secret it sees (`CachedSecret::new`), verifying the
//! seal there, once per resourceVersion. A `k8s_openapi` Secret with its data dropped still
//! costs about 2.6 KiB in a cache (two `BTreeMap`s and a wide `ObjectMeta`); this is about a
//! third of that (docs, operators/resources.md).

use super::seal::{self, Verdict};
use crate::{identity::WorkloadIdentity, mutate::Source, reference::Reference};
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::runtime::reflector::{Lookup, ObjectRef};
use std::borrow::Cow;

/// The annotations a cache keeps: kvinject's own. The seal's (`kvinject.io/signature`) is
/// kept as its verdict and its key id instead.
const KEPT: &str = "kvinject.io/";

/// Names every Secret repeats, shared rather than copied into each cached one.
const SHARED: &[&str] = &[
    super::REFERENCE_ANNOTATION,
    super::VERSION_ANNOTATION,
    super::REGISTRY_ANNOTATION,
    super::USERNAME_ANNOTATION,
    super::SERVICE_ACCOUNT_ANNOTATION,
    super::CLIENT_ID_ANNOTATION,
    super::TENANT_ID_ANNOTATION,
    super::MISSING_ANNOTATION,
    super::RESTORED_ANNOTATION,
    "Opaque",
    "kubernetes.io/dockerconfigjson",
];

fn shared(s: &str) -> Cow<'static, str> {
    match SHARED.iter().find(|k| **k == s) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(s.to_owned()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedSecret {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub resource_version: String,
    pub type_: Option<Cow<'static, str>>,
    /// Carries kvinject's managed-by label.
    pub managed: bool,
    /// What its seal says of this resourceVersion.
    pub verdict: Verdict,
    /// The signing key its seal names (a genuine one is sealed again when it is not the
    /// current key).
    pub key_id: Option<String>,
    /// Its `kvinject.io/` annotations, sorted by name.
    annotations: Box<[(Cow<'static, str>, Box<str>)]>,
}

impl CachedSecret {
    /// `secret` as a cache keeps it, its seal checked with `keys`.
    pub fn new(keys: &seal::Keys, secret: &Secret) -> Self {
        let mut cached = Self::with_verdict(secret, seal::verify(keys, secret));
        // A "missing in Key Vault" mark kvinject did not sign is not kept: it is no mark.
        if cached.annotation(super::MISSING_ANNOTATION).is_some()
            && seal::verified_missing_since(keys, secret).is_none()
        {
            let kept = std::mem::take(&mut cached.annotations);
            cached.annotations = kept
                .into_iter()
                .filter(|(k, _)| k.as_ref() != super::MISSING_ANNOTATION)
                .collect();
        }
        cached
    }

    /// `secret` as a cache keeps it, with a seal verdict reached elsewhere.
    pub fn with_verdict(secret: &Secret, verdict: Verdict) -> Self {
        let meta = &secret.metadata;
        let annotations: Box<[(Cow<'static, str>, Box<str>)]> = meta
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with(KEPT) && k.as_str() != seal::SIGNATURE_ANNOTATION)
            .map(|(k, v)| (shared(k), v.as_str().into()))
            .collect();
        CachedSecret {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            type_: secret.type_.as_deref().map(shared),
            managed: super::is_managed(secret),
            verdict,
            key_id: seal::key_id(secret),
            // A BTreeMap iterates in order: the slice is sorted.
            annotations,
        }
    }

    /// Its verdict under `keys` as they are now: a seal by a key since removed is no seal.
    pub fn verdict_with(&self, keys: &seal::Keys) -> Verdict {
        match (&self.verdict, &self.key_id) {
            (Verdict::Foreign, _) => Verdict::Foreign,
            (verdict, Some(id)) if keys.knows(id) => *verdict,
            _ => Verdict::Foreign,
        }
    }

    /// One of its `kvinject.io/` annotations.
    pub fn annotation(&self, name: &str) -> Option<&str> {
        self.annotations
            .binary_search_by(|(k, _)| k.as_ref().cmp(name))
            .ok()
            .map(|i| self.annotations[i].1.as_ref())
    }

    /// What this Secret says it was made for: the source (reference, kind, and for a
    /// registry login its registry and user name) and whose identity read it. `None` when
    /// its annotations do not say, or when they do not give back its own name: the name
    /// hashes all of them and is covered by the seal, so an annotation edited by hand (a
    /// registry host, a ServiceAccount) or a name that met another's never passes.
    pub fn made_for(&self) -> Option<(Source, Option<WorkloadIdentity>)> {
        let reference = Reference::parse(self.annotation(super::REFERENCE_ANNOTATION)?)?.ok()?;
        let identity = match self.annotation(super::CLIENT_ID_ANNOTATION) {
            None => None,
            Some(client_id) => Some(WorkloadIdentity {
                namespace: self.namespace.clone(),
                service_account: self.annotation(super::SERVICE_ACCOUNT_ANNOTATION)?.to_owned(),
                client_id: client_id.to_owned(),
                tenant_id: self.annotation(super::TENANT_ID_ANNOTATION)?.to_owned(),
            }),
        };
        let source = match (self.type_.as_deref(), self.annotation(super::REGISTRY_ANNOTATION)) {
            (Some("Opaque"), None) => Source::Env(reference),
            (Some(super::DOCKER_CONFIG_TYPE), None) => Source::DockerConfig(reference),
            (Some(super::DOCKER_CONFIG_TYPE), Some(registry)) => Source::RegistryLogin {
                registry: registry.to_owned(),
                username: self.annotation(super::USERNAME_ANNOTATION)?.to_owned(),
                password: reference,
            },
            _ => return None,
        };
        source
            .is_named(&self.name, identity.as_ref())
            .then_some((source, identity))
    }

    /// (`namespace`, `name`).
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    /// What Events about it are recorded on.
    pub fn object_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            uid: Some(self.uid.clone()).filter(|u| !u.is_empty()),
            resource_version: Some(self.resource_version.clone()).filter(|v| !v.is_empty()),
            ..Default::default()
        }
    }
}

impl Lookup for CachedSecret {
    type DynamicType = ();

    fn kind(_: &()) -> Cow<'_, str> {
        "Secret".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "secrets".into()
    }
    fn name(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.name))
    }
    fn namespace(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(&self.namespace))
    }
    fn resource_version(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self.resource_version.as_str())).filter(|v| !v.is_empty())
    }
    fn uid(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self.uid.as_str())).filter(|u| !u.is_empty())
    }
    /// The key a cache files it under: its name, without copies of its uid and
    /// resourceVersion (the cached value has them).
    fn to_object_ref(&self, _: ()) -> ObjectRef<Self> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materialize::{MANAGED_BY, MANAGED_BY_LABEL};
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(annotations: &[(&str, &str)]) -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some("team-a".into());
        s.metadata.name = Some("kvi-main-db-0123456789".into());
        s.metadata.uid = Some("u-1".into());
        s.metadata.resource_version = Some("42".into());
        s.metadata.labels = Some(BTreeMap::from([(
            MANAGED_BY_LABEL.to_owned(),
            MANAGED_BY.to_owned(),
        )]));
        s.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        s.type_ = Some("Opaque".into());
        s.data = Some(BTreeMap::from([(
            "value".to_owned(),
            ByteString(b"s3cret".to_vec()),
        )]));
        s
    }

    #[test]
    fn a_missing_in_vault_mark_counts_only_as_kvinject_signed_it_for_this_secret() {
        let mut s = secret(&[
            (super::super::REFERENCE_ANNOTATION, "akv://main/db"),
            (super::super::VERSION_ANNOTATION, "v1"),
        ]);
        let keys = seal::Keys::default();
        seal::seal(&keys, &mut s);
        let at = |s: &Secret| {
            CachedSecret::new(&keys, s)
                .annotation(super::super::MISSING_ANNOTATION)
                .map(str::to_owned)
        };
        let mark = |s: &mut Secret, since: &str, signature: Option<String>| {
            let a = s.metadata.annotations.as_mut().unwrap();
            a.insert(super::super::MISSING_ANNOTATION.into(), since.into());
            match signature {
                Some(sig) => a.insert(super::super::MISSING_SEAL_ANNOTATION.into(), sig),
                None => a.remove(super::super::MISSING_SEAL_ANNOTATION),
            };
        };
        let signed = |name: &str, version: &str, since: &str| {
            let m = seal::Missing {
                namespace: "team-a",
                name,
                reference: "akv://main/db",
                version,
                since,
            };
            seal::missing_mark(&keys, &m)
        };
        let name = s.metadata.name.clone().unwrap();
        let since = "2026-11-29T00:00:00Z";
        // Set by hand: no mark.
        mark(&mut s, since, None);
        assert_eq!(at(&s), None);
        // Signed by kvinject for this Secret: the mark.
        mark(&mut s, since, signed(&name, "v1", since));
        assert_eq!(at(&s).as_deref(), Some(since));
        // Another time under the same signature, another Secret's or another version's
        // signature, another key's: no mark. The Secret's own seal is not touched.
        mark(&mut s, "2026-01-01T00:00:00Z", signed(&name, "v1", since));
        assert_eq!(at(&s), None);
        mark(&mut s, since, signed("kvi-main-other-0123456789", "v1", since));
        assert_eq!(at(&s), None);
        mark(&mut s, since, signed(&name, "v0", since));
        assert_eq!(at(&s), None);
        let other = seal::Keys::default();
        let foreign = seal::missing_mark(
            &other,
            &seal::Missing {
                namespace: "team-a",
                name: &name,
                reference: "akv://main/db",
                version: "v1",
                since,
            },
        );
        mark(&mut s, since, foreign);
        assert_eq!(at(&s), None);
        assert_eq!(CachedSecret::new(&keys, &s).verdict, Verdict::Genuine);
    }

    #[test]
    fn keeps_kvinjects_annotations_and_the_verdict_and_never_the_value() {
        let mut s = secret(&[
            (super::super::REFERENCE_ANNOTATION, "akv://main/db"),
            (super::super::VERSION_ANNOTATION, "v1"),
            (super::super::MISSING_ANNOTATION, "2026-11-29T00:00:00Z"),
            ("example.com/team", "a"),
        ]);
        let keys = seal::Keys::default();
        seal::seal(&keys, &mut s);
        let mark = seal::Missing {
            namespace: "team-a",
            name: "kvi-main-db-0123456789",
            reference: "akv://main/db",
            version: "v1",
            since: "2026-11-29T00:00:00Z",
        };
        let signature = seal::missing_mark(&keys, &mark).unwrap();
        s.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(super::super::MISSING_SEAL_ANNOTATION.into(), signature);
        let cached = CachedSecret::new(&keys, &s);
        assert_eq!(cached.verdict, Verdict::Genuine);
        assert_eq!(cached.key_id.as_deref(), Some(keys.current_id().as_str()));
        assert!(cached.managed);
        assert_eq!(
            cached.key(),
            ("team-a".to_owned(), "kvi-main-db-0123456789".to_owned())
        );
        for (name, value) in s.metadata.annotations.iter().flatten() {
            let kept = name.starts_with("kvinject.io/") && name.as_str() != seal::SIGNATURE_ANNOTATION;
            assert_eq!(cached.annotation(name), kept.then_some(value.as_str()), "{name}");
        }
        assert_eq!(cached.annotation("kvinject.io/none"), None);
        assert!(!format!("{cached:?}").contains("s3cret"));

        // A value edited after sealing: the cache says so, without holding either value.
        s.data = Some(BTreeMap::from([(
            "value".to_owned(),
            ByteString(b"other".to_vec()),
        )]));
        assert_eq!(CachedSecret::new(&keys, &s).verdict, Verdict::Edited);
        // Another key set: not kvinject's.
        assert_eq!(
            CachedSecret::new(&seal::Keys::default(), &s).verdict,
            Verdict::Foreign
        );
    }

    #[test]
    fn a_secret_without_kvinjects_label_is_not_managed() {
        let mut s = secret(&[]);
        s.metadata.labels = None;
        let cached = CachedSecret::with_verdict(&s, Verdict::Foreign);
        assert!(!cached.managed);
        let r = cached.object_reference();
        assert_eq!(
            (
                r.kind.as_deref(),
                r.name.as_deref(),
                r.namespace.as_deref(),
                r.uid.as_deref()
            ),
            (
                Some("Secret"),
                Some("kvi-main-db-0123456789"),
                Some("team-a"),
                Some("u-1")
            )
        );
    }
}
