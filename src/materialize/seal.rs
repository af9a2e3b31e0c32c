//! Seals on materialized Secrets, pure. kvinject signs every Secret it writes with a key
//! only it holds, so a Secret that merely carries its label is never taken for one of its
//! own: not by the webhook (which would hand it to pods), not by the rotation controller
//! (which would fill it with a Key Vault value).
//!
//! Two HMAC-SHA256 tags go in one annotation, `v1:<key id>:<origin>:<seal>`:
//! - `origin` covers the namespace, the name, the reference, the version and, for a Secret
//!   read with a workload identity, whose: it says kvinject made this Secret for this
//!   reference;
//! - `seal` covers the same and the Secret's type and data: it says the value is the one
//!   kvinject wrote.
//!
//! A valid origin with a broken seal is a genuine Secret whose value was edited by hand
//! (the controller restores it); a broken origin is a foreign Secret (never used, never
//! written). Tags are keyed, so they reveal nothing about the value.

use aws_lc_rs::hmac;
use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, RwLock},
};

pub const SIGNATURE_ANNOTATION: &str = "kvinject.io/signature";
const VERSION_TAG: &str = "v1";
/// Bytes of key material (HMAC-SHA256 wants at least 32).
pub const KEY_BYTES: usize = 32;

/// The signing keys: one signs, every one verifies (so a new key can be introduced without
/// turning existing Secrets foreign). Clones share them: `replace` (the key Secret
/// followed while running) changes what every clone signs and verifies with.
#[derive(Clone)]
pub struct Keys {
    set: Arc<RwLock<Arc<KeySet>>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

struct KeySet {
    signing: String,
    keys: BTreeMap<String, hmac::Key>,
    /// Of the ids and material: tells a change of what verifies from a change of signer.
    digest: [u8; 32],
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.snapshot();
        let ids: Vec<&String> = set.keys.keys().collect();
        write!(
            f,
            "Keys {{ current: {:?}, ids: {ids:?}, material: <redacted> }}",
            set.signing
        )
    }
}

impl Default for Keys {
    /// A fresh random key: for tests and benchmarks; `kvinject serve` loads its keys from the
    /// cluster so every replica shares them.
    fn default() -> Self {
        Keys::new("local", BTreeMap::from([("local".to_owned(), random_key())])).unwrap_or_else(|_| {
            // Unreachable: one well-formed key. Fall back to an empty set that signs nothing
            // verifiable rather than panic.
            Keys::from_set(KeySet {
                signing: String::new(),
                keys: BTreeMap::new(),
                digest: [0; 32],
            })
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the current signing key `{0}` is not among the keys")]
    NoCurrent(String),
    #[error("signing key `{id}` is {len} bytes; it needs at least {KEY_BYTES}")]
    TooShort { id: String, len: usize },
    #[error("signing key id `{0}` may hold only letters, digits and '-'")]
    BadId(String),
}

/// Fresh key material from the system's random source.
pub fn random_key() -> Vec<u8> {
    let mut bytes = vec![0u8; KEY_BYTES];
    // aws-lc's generator does not fail on a working system; a zero key would still only
    // make Secrets look foreign, never let a forged one pass.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    bytes
}

fn key_set(signing: &str, material: BTreeMap<String, Vec<u8>>) -> Result<KeySet, KeyError> {
    let mut keys = BTreeMap::new();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (id, bytes) in &material {
        for part in [id.as_bytes(), bytes.as_slice()] {
            digest.update(&(part.len() as u64).to_be_bytes());
            digest.update(part);
        }
    }
    let mut digest_bytes = [0u8; 32];
    digest_bytes.copy_from_slice(digest.finish().as_ref());
    for (id, bytes) in material {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(KeyError::BadId(id));
        }
        if bytes.len() < KEY_BYTES {
            return Err(KeyError::TooShort { id, len: bytes.len() });
        }
        keys.insert(id, hmac::Key::new(hmac::HMAC_SHA256, &bytes));
    }
    if !keys.contains_key(signing) {
        return Err(KeyError::NoCurrent(signing.to_owned()));
    }
    Ok(KeySet {
        signing: signing.to_owned(),
        keys,
        digest: digest_bytes,
    })
}

impl Keys {
    /// `material` by key id, `signing` the one that signs.
    pub fn new(signing: &str, material: BTreeMap<String, Vec<u8>>) -> Result<Self, KeyError> {
        Ok(Keys::from_set(key_set(signing, material)?))
    }

    fn from_set(set: KeySet) -> Self {
        Keys {
            set: Arc::new(RwLock::new(Arc::new(set))),
            generation: Default::default(),
        }
    }

    /// Every clone signs with `signing` and verifies with `material` from now on. Invalid
    /// input changes nothing.
    pub fn replace(&self, signing: &str, material: BTreeMap<String, Vec<u8>>) -> Result<(), KeyError> {
        let set = Arc::new(key_set(signing, material)?);
        // A poisoned lock still holds a whole set (it is only ever swapped).
        let mut current = self.set.write().unwrap_or_else(|p| p.into_inner());
        let verifies_otherwise = current.digest != set.digest;
        *current = set;
        drop(current);
        if verifies_otherwise {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(())
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The id of the key that signs.
    pub fn current_id(&self) -> String {
        self.snapshot().signing.clone()
    }

    /// The ids of every key that verifies.
    pub fn ids(&self) -> Vec<String> {
        self.snapshot().keys.keys().cloned().collect()
    }

    /// Whether key `id` verifies now (a verdict reached under a key since removed does not
    /// stand).
    pub fn knows(&self, id: &str) -> bool {
        self.snapshot().keys.contains_key(id)
    }

    /// Counts the changes of the keys that verify: a cache whose verdicts were reached
    /// under other keys reads its objects again when it moves.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What a labelled Secret turns out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Made by kvinject, value as written.
    Genuine,
    /// Made by kvinject for its reference and version, but its value or type was changed.
    Edited,
    /// Not made by kvinject (or its metadata was changed): never used, never written.
    Foreign,
}

fn field(secret: &Secret, annotation: &str) -> String {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation))
        .cloned()
        .unwrap_or_default()
}

/// Length-prefixed parts, so no two different inputs share a message.
fn push(message: &mut Vec<u8>, part: &[u8]) {
    message.extend_from_slice(&(part.len() as u64).to_be_bytes());
    message.extend_from_slice(part);
}

fn origin_message(secret: &Secret) -> Vec<u8> {
    let mut m = b"kvinject-origin-v1".to_vec();
    push(
        &mut m,
        secret
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default()
            .as_bytes(),
    );
    push(
        &mut m,
        secret.metadata.name.as_deref().unwrap_or_default().as_bytes(),
    );
    push(&mut m, field(secret, super::REFERENCE_ANNOTATION).as_bytes());
    push(&mut m, field(secret, super::VERSION_ANNOTATION).as_bytes());
    // Whose identity reads it, when not kvinject's: part of what kvinject made.
    if !field(secret, super::CLIENT_ID_ANNOTATION).is_empty() {
        for annotation in [
            super::SERVICE_ACCOUNT_ANNOTATION,
            super::CLIENT_ID_ANNOTATION,
            super::TENANT_ID_ANNOTATION,
        ] {
            push(&mut m, field(secret, annotation).as_bytes());
        }
    }
    m
}

fn seal_message(secret: &Secret) -> Vec<u8> {
    let mut m = b"kvinject-seal-v1".to_vec();
    m.extend_from_slice(&origin_message(secret));
    push(&mut m, secret.type_.as_deref().unwrap_or_default().as_bytes());
    for (key, value) in secret.data.iter().flatten() {
        push(&mut m, key.as_bytes());
        push(&mut m, &value.0);
    }
    m
}

fn b64(tag: hmac::Tag) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
}

/// Signs `secret` as it is (namespace, name, reference and version annotations, type, data).
pub fn seal(keys: &Keys, secret: &mut Secret) {
    let set = keys.snapshot();
    let Some(key) = set.keys.get(&set.signing) else {
        return;
    };
    let origin = b64(hmac::sign(key, &origin_message(secret)));
    let seal = b64(hmac::sign(key, &seal_message(secret)));
    let value = format!("{VERSION_TAG}:{}:{origin}:{seal}", set.signing);
    secret
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(SIGNATURE_ANNOTATION.to_owned(), value);
}

/// Checks `secret`'s signature (constant-time comparisons).
pub fn verify(keys: &Keys, secret: &Secret) -> Verdict {
    let signature = field(secret, SIGNATURE_ANNOTATION);
    let parts: Vec<&str> = signature.split(':').collect();
    let [VERSION_TAG, id, origin, seal] = parts.as_slice() else {
        return Verdict::Foreign;
    };
    let set = keys.snapshot();
    let Some(key) = set.keys.get(*id) else {
        return Verdict::Foreign;
    };
    let decode = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap_or_default()
    };
    if hmac::verify(key, &origin_message(secret), &decode(origin)).is_err() {
        return Verdict::Foreign;
    }
    if hmac::verify(key, &seal_message(secret), &decode(seal)).is_err() {
        return Verdict::Edited;
    }
    Verdict::Genuine
}

/// What the controller's "missing in Key Vault" mark on a Secret says: which Secret, for
/// which reference and version, since when.
#[derive(Clone, Copy, Debug)]
pub struct Missing<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub reference: &'a str,
    pub version: &'a str,
    pub since: &'a str,
}

fn missing_message(m: &Missing<'_>) -> Vec<u8> {
    let mut out = b"kvinject-missing-v1".to_vec();
    for part in [m.namespace, m.name, m.reference, m.version, m.since] {
        push(&mut out, part.as_bytes());
    }
    out
}

/// The signature of a "missing in Key Vault" mark (`kvinject.io/missing-in-vault-seal`).
/// The mark is metadata a tenant who may edit Secrets can write, and what it sets reaches
/// past the namespace (the webhook drops its cached values of the reference, the gauge
/// alerts): only a signed one counts.
pub fn missing_mark(keys: &Keys, mark: &Missing<'_>) -> Option<String> {
    let set = keys.snapshot();
    let key = set.keys.get(&set.signing)?;
    let tag = b64(hmac::sign(key, &missing_message(mark)));
    Some(format!("{VERSION_TAG}:{}:{tag}", set.signing))
}

/// Whether `signature` is kvinject's over `mark` (constant-time comparison).
pub fn missing_mark_verifies(keys: &Keys, mark: &Missing<'_>, signature: &str) -> bool {
    let parts: Vec<&str> = signature.split(':').collect();
    let [VERSION_TAG, id, tag] = parts.as_slice() else {
        return false;
    };
    let set = keys.snapshot();
    let Some(key) = set.keys.get(*id) else {
        return false;
    };
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tag)
        .unwrap_or_default();
    hmac::verify(key, &missing_message(mark), &tag).is_ok()
}

/// `secret`'s "missing in Key Vault" mark when kvinject signed it: its time.
pub fn verified_missing_since(keys: &Keys, secret: &Secret) -> Option<String> {
    let since = field(secret, super::MISSING_ANNOTATION);
    if since.is_empty() {
        return None;
    }
    let (namespace, name) = (
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default(),
    );
    let (reference, version) = (
        field(secret, super::REFERENCE_ANNOTATION),
        field(secret, super::VERSION_ANNOTATION),
    );
    let mark = Missing {
        namespace,
        name,
        reference: &reference,
        version: &version,
        since: &since,
    };
    missing_mark_verifies(keys, &mark, &field(secret, super::MISSING_SEAL_ANNOTATION)).then_some(since)
}

/// The key id a genuine Secret was signed with (to re-sign after a key rotation).
pub fn key_id(secret: &Secret) -> Option<String> {
    let signature = field(secret, SIGNATURE_ANNOTATION);
    signature.split(':').nth(1).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret() -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some("team-a".into());
        s.metadata.name = Some("kvi-main-db-0123456789".into());
        s.metadata.annotations = Some(BTreeMap::from([
            (
                super::super::REFERENCE_ANNOTATION.to_owned(),
                "akv://main/db".to_owned(),
            ),
            (
                super::super::VERSION_ANNOTATION.to_owned(),
                "0123456789abcdef0123456789abcdef".to_owned(),
            ),
        ]));
        s.type_ = Some("Opaque".into());
        s.data = Some(BTreeMap::from([(
            "value".to_owned(),
            ByteString(b"s3cret".to_vec()),
        )]));
        s
    }

    fn keys(current: &str, ids: &[(&str, u8)]) -> Keys {
        Keys::new(
            current,
            ids.iter().map(|(id, b)| (id.to_string(), vec![*b; 32])).collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_sealed_secret_is_genuine_and_any_change_is_caught() {
        let k = keys("k1", &[("k1", 1)]);
        let mut s = secret();
        seal(&k, &mut s);
        assert_eq!(verify(&k, &s), Verdict::Genuine);

        let mut edited = s.clone();
        edited
            .data
            .as_mut()
            .unwrap()
            .insert("value".into(), ByteString(b"chosen by hand".to_vec()));
        assert_eq!(
            verify(&k, &edited),
            Verdict::Edited,
            "a new value under a genuine origin"
        );
        let mut extra = s.clone();
        extra
            .data
            .as_mut()
            .unwrap()
            .insert("other".into(), ByteString(b"x".to_vec()));
        assert_eq!(verify(&k, &extra), Verdict::Edited);
        let mut retyped = s.clone();
        retyped.type_ = Some("kubernetes.io/dockerconfigjson".into());
        assert_eq!(verify(&k, &retyped), Verdict::Edited);

        // Copied to another name or namespace, or pointed at another reference or version:
        // foreign, whatever the value.
        for change in [
            |s: &mut Secret| s.metadata.name = Some("kvi-other".into()),
            |s: &mut Secret| s.metadata.namespace = Some("team-b".into()),
            |s: &mut Secret| {
                s.metadata.annotations.as_mut().unwrap().insert(
                    super::super::REFERENCE_ANNOTATION.into(),
                    "akv://main/prod-admin".into(),
                );
            },
            |s: &mut Secret| {
                s.metadata
                    .annotations
                    .as_mut()
                    .unwrap()
                    .insert(super::super::VERSION_ANNOTATION.into(), "f".repeat(32));
            },
        ] {
            let mut moved = s.clone();
            change(&mut moved);
            assert_eq!(verify(&k, &moved), Verdict::Foreign, "{:?}", moved.metadata);
        }
    }

    #[test]
    fn unsigned_garbled_or_foreign_key_signatures_are_foreign() {
        let k = keys("k1", &[("k1", 1)]);
        let mut s = secret();
        assert_eq!(verify(&k, &s), Verdict::Foreign, "no signature");
        for bad in ["", "v1", "v1:k1:a:b", "v2:k1:x:y", "v1:k9:AAAA:AAAA", "v1:k1:::"] {
            s.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(SIGNATURE_ANNOTATION.into(), bad.into());
            assert_eq!(verify(&k, &s), Verdict::Foreign, "{bad:?}");
        }
        let mut by_other = secret();
        seal(&keys("k1", &[("k1", 2)]), &mut by_other);
        assert_eq!(
            verify(&k, &by_other),
            Verdict::Foreign,
            "same key id, other material"
        );
    }

    #[test]
    fn old_keys_verify_and_the_current_one_signs() {
        let old = keys("k1", &[("k1", 1)]);
        let mut s = secret();
        seal(&old, &mut s);
        let rotated = keys("k2", &[("k1", 1), ("k2", 2)]);
        assert_eq!(verify(&rotated, &s), Verdict::Genuine);
        assert_eq!(key_id(&s).as_deref(), Some("k1"));
        seal(&rotated, &mut s);
        assert_eq!(key_id(&s).as_deref(), Some("k2"));
        assert_eq!(verify(&rotated, &s), Verdict::Genuine);
        assert_eq!(
            verify(&old, &s),
            Verdict::Foreign,
            "a retired key set does not know k2"
        );
    }

    #[test]
    fn keys_are_checked_and_never_printed() {
        assert_eq!(
            Keys::new("k1", BTreeMap::from([("k1".to_owned(), vec![0; 8])])).unwrap_err(),
            KeyError::TooShort {
                id: "k1".into(),
                len: 8
            }
        );
        assert!(matches!(
            Keys::new("k2", BTreeMap::from([("k1".to_owned(), vec![0; 32])])),
            Err(KeyError::NoCurrent(_))
        ));
        assert!(matches!(
            Keys::new("k 1", BTreeMap::from([("k 1".to_owned(), vec![0; 32])])),
            Err(KeyError::BadId(_))
        ));
        let debug = format!("{:?}", keys("k1", &[("k1", 7)]));
        assert!(
            debug.contains("<redacted>") && !debug.contains("[7, 7"),
            "{debug}"
        );
    }
}
