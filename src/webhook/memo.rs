//! The decision memo: what the webhook answered for a review, remembered by the review's
//! exact bytes less its `request.uid` and the random part of the ServiceAccount token
//! volume's name, so that the same review again (a ReplicaSet's burst of pods, identical
//! but for those within the second of their `managedFields` time) is answered without
//! deciding again.
//!
//! It is never a second source of truth. An answer is remembered only when it was decided
//! from the caches alone (no Key Vault read, no Secret created, no GET), together with the
//! `Generation` read before deciding; every cache that decision read bumps that count after
//! each change, and an answer is served only while the count is unchanged. Any change to
//! kvinject's Secrets, the namespaces, the ServiceAccounts, the access policies or a vault's
//! health drops the whole memo. Its size is bounded in bytes; a full memo is emptied.

use crate::generation::Generation;
use serde::{
    Deserialize,
    de::{Deserializer, MapAccess, Visitor},
};
use serde_json::value::RawValue;
use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
};

/// What the memo may hold, in bytes of keys and answers (docs, operators/resources.md).
pub const BUDGET: usize = 256 * 1024;

/// How every answer starts, up to its uid (`webhook::encode`).
pub const ANSWER_START: &[u8] =
    br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#;

/// An answer as remembered: everything but the uid, which each review brings.
#[derive(Debug, PartialEq, Eq)]
pub struct Decided {
    /// `patched` or `allowed`.
    pub result: &'static str,
    /// The encoded answer after its uid: `ANSWER_START`, the uid as a JSON string, then this.
    pub after_uid: Box<[u8]>,
    /// How many warnings it carries, for the log line.
    pub warnings: usize,
    /// The materialized Secrets the decision used, counted as cache hits on each use.
    pub secrets: u64,
    /// Who it is about, for its log line.
    pub subject: Subject,
}

/// Who an admission is about: its namespace, its pod (name, or generateName), whether it
/// is a dry run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Subject {
    pub namespace: Box<str>,
    pub pod: Box<str>,
    pub dry_run: bool,
}

impl Decided {
    /// The answer for `uid`.
    pub fn answer(&self, uid: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(ANSWER_START.len() + uid.len() + 2 + self.after_uid.len());
        out.extend_from_slice(ANSWER_START);
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, uid);
        out.extend_from_slice(&self.after_uid);
        out
    }

    /// What follows the uid in `encoded`, an answer encoded for the empty uid; `None` if it
    /// is not such an answer.
    pub fn after_uid(encoded: &[u8]) -> Option<Box<[u8]>> {
        let rest = encoded.strip_prefix(ANSWER_START)?.strip_prefix(b"\"\"")?;
        Some(rest.into())
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.after_uid.len()
            + self.subject.namespace.len()
            + self.subject.pod.len()
    }
}

/// A review as the memo knows it: its bytes less `request.uid` (`key`), and that uid.
#[derive(Debug)]
pub struct Keyed<'a> {
    pub key: Vec<u8>,
    pub uid: &'a str,
}

/// `None` when the body is not a JSON object with exactly one `request` object holding
/// exactly one string `uid`, or a member name it must look at is escaped. Such a review
/// is decided as usual, never remembered. The body is read once.
pub fn key(body: &[u8]) -> Option<Keyed<'_>> {
    let review: Review = serde_json::from_slice(body).ok()?;
    let mut key = String::with_capacity(body.len());
    let mut uid = None;
    key.push('{');
    for member in &review.0 {
        match member {
            Member::Other(name, value) => write(&mut key, name, value.get()),
            Member::Request(request) => {
                if uid.is_some() {
                    return None;
                }
                key.push_str(r#""request":{"#);
                for member in request {
                    match member {
                        Member::Uid(Some(u)) if uid.is_none() => uid = Some(*u),
                        Member::Other(name, value) => write(&mut key, name, value.get()),
                        _ => return None,
                    }
                }
                uid?;
                key.push_str("},");
            }
            Member::Uid(_) => return None,
        }
    }
    key.push('}');
    token_volume_names_alike(&mut key);
    Some(Keyed {
        key: key.into_bytes(),
        uid: uid?,
    })
}

/// The name of the volume the ServiceAccount admission plugin adds to each pod: this, then
/// five random letters or digits. It is the only difference between a ReplicaSet's pods at
/// admission (besides the uid and, across seconds, the `managedFields` time).
const TOKEN_VOLUME: &str = r#"{"name":"kube-api-access-"#;

/// What follows that name where the plugin writes it, as the apiserver encodes it: the
/// volume (a projected one), and each container's mount of it.
const TOKEN_VOLUME_USES: [&str; 2] = [
    r#"","projected":{"#,
    r#"","readOnly":true,"mountPath":"/var/run/secrets/kubernetes.io/serviceaccount""#,
];

/// Makes every token volume's name the same (`kube-api-access-*****`) where the plugin
/// wrote it, so that a ReplicaSet's pods share one key. Only where names cannot matter:
/// kvinject reads volume and mount names only for its own (CSI) file volumes, so a review
/// that holds `"csi"` anywhere keeps its names; so does one with a `\u` escape, which could
/// spell `"csi"` otherwise. Both keep their exact key. The same name elsewhere (an env
/// var's, say, which a patch repeats) is kept too.
fn token_volume_names_alike(key: &mut String) {
    if key.contains(r#""csi""#) || key.contains("\\u") {
        return;
    }
    let names: Vec<usize> = key
        .match_indices(TOKEN_VOLUME)
        .map(|(at, _)| at + TOKEN_VOLUME.len())
        .filter(|&at| {
            let (Some(random), Some(rest)) = (key.get(at..at + 5), key.get(at + 5..)) else {
                return false;
            };
            random
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && TOKEN_VOLUME_USES.iter().any(|u| rest.starts_with(u))
        })
        .collect();
    for at in names {
        key.replace_range(at..at + 5, "*****");
    }
}

/// `"name":value,`; member names are plain (unescaped) strings, so the key reads as JSON
/// (less its trailing commas) and no two reviews share one.
fn write(key: &mut String, name: &str, value: &str) {
    key.push('"');
    key.push_str(name);
    key.push_str("\":");
    key.push_str(value);
    key.push(',');
}

/// The review's members in order: `request` read into its own members, every other one
/// kept as its raw JSON. Any escaped member name fails.
struct Review<'a>(Vec<Member<'a>>);

enum Member<'a> {
    Request(Vec<Member<'a>>),
    /// `request.uid`: `None` when it is not a plain string.
    Uid(Option<&'a str>),
    Other(&'a str, &'a RawValue),
}

/// Reads a JSON object's members; `top`: the review itself, else its `request`.
struct Members {
    top: bool,
}

impl<'de> Visitor<'de> for Members {
    type Value = Vec<Member<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(8);
        while let Some(name) = map.next_key::<&'de str>()? {
            members.push(match name {
                "request" if self.top => Member::Request(map.next_value::<RequestMembers>()?.0),
                "uid" if !self.top => {
                    let raw: &'de RawValue = map.next_value()?;
                    Member::Uid(serde_json::from_str(raw.get()).ok())
                }
                _ => Member::Other(name, map.next_value()?),
            });
        }
        Ok(members)
    }
}

impl<'de> Deserialize<'de> for Review<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(Members { top: true }).map(Review)
    }
}

struct RequestMembers<'a>(Vec<Member<'a>>);

impl<'de> Deserialize<'de> for RequestMembers<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(Members { top: false }).map(RequestMembers)
    }
}

pub struct Memo {
    changes: Generation,
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The count its answers were decided at.
    generation: u64,
    answers: HashMap<Box<[u8]>, Arc<Decided>>,
    bytes: usize,
}

impl Memo {
    /// A memo whose answers hold while `changes` does not move.
    pub fn new(changes: Generation, budget: usize) -> Self {
        Self {
            changes,
            budget,
            inner: Mutex::default(),
        }
    }

    /// The count to read before deciding; give it back to `remember`.
    pub fn generation(&self) -> u64 {
        self.changes.current()
    }

    /// The answer remembered for `key`, if nothing it was decided from has changed since.
    pub fn recall(&self, key: &[u8]) -> Option<Arc<Decided>> {
        let now = self.changes.current();
        let inner = self.inner.lock().ok()?;
        if inner.generation != now {
            return None;
        }
        inner.answers.get(key).cloned()
    }

    /// Remembers `decided` for `key`, if nothing changed since `generation` was read (before
    /// deciding). Emptied first when the count moved or the budget would be passed.
    pub fn remember(&self, key: Vec<u8>, decided: Decided, generation: u64) {
        let size = key.len() + decided.size();
        if size > self.budget {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if self.changes.current() != generation {
            return;
        }
        if inner.generation != generation || inner.bytes + size > self.budget {
            *inner = Inner {
                generation,
                ..Inner::default()
            };
        }
        let key_len = key.len();
        if let Some(old) = inner.answers.insert(key.into_boxed_slice(), Arc::new(decided)) {
            // Two replicas of a burst decided at once: the first answer's bytes are gone.
            inner.bytes -= key_len + old.size();
        }
        inner.bytes += size;
    }

    /// Answers held now (the unit tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.answers.len())
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(uid: &str, namespace: &str) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "namespace": namespace, "dryRun": false,
                        "object": {"metadata": {"generateName": "web-"}, "spec": {"containers": []}}}}),
        )
        .unwrap()
    }

    fn decided() -> Decided {
        Decided {
            result: "patched",
            after_uid: br#","allowed":true,"status":{},"patch":"W10=","patchType":"JSONPatch"}}"#[..].into(),
            warnings: 0,
            secrets: 1,
            subject: Subject {
                namespace: "shop".into(),
                pod: "web-".into(),
                dry_run: false,
            },
        }
    }

    #[test]
    fn a_review_is_known_by_all_of_it_but_its_uid() {
        let (a, b) = (body("u1", "shop"), body("u2", "shop"));
        let (ka, kb) = (key(&a).unwrap(), key(&b).unwrap());
        assert_eq!((ka.uid, kb.uid), ("u1", "u2"));
        assert_eq!(ka.key, kb.key);
        // What is left reads as the review without its uid.
        let text = String::from_utf8(ka.key.clone()).unwrap().replace(",}", "}");
        let left: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(left["request"].get("uid"), None);
        assert_eq!(left["request"]["namespace"], "shop");
        // Any other difference is another review.
        assert_ne!(key(&body("u1", "shop2")).unwrap().key, ka.key);
        let dry = String::from_utf8(a.clone()).unwrap().replace("false", "true");
        assert_ne!(key(dry.as_bytes()).unwrap().key, ka.key);
        let spaced = String::from_utf8(a.clone()).unwrap().replace("[]", "[ ]");
        assert_ne!(key(spaced.as_bytes()).unwrap().key, ka.key);
    }

    /// A pod as the apiserver sends it (captured from the bed, in its member order): the
    /// ServiceAccount plugin added `volume`, and its mount in the container.
    fn pod_with_token_volume(volume: &str, more_volumes: serde_json::Value) -> Vec<u8> {
        let more: String = more_volumes
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| format!(",{v}"))
            .collect();
        format!(
            r#"{{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{{"uid":"{volume}","namespace":"shop","object":{{"metadata":{{"generateName":"web-"}},"spec":{{"volumes":[{{"name":"{volume}","projected":{{"sources":[{{"serviceAccountToken":{{"expirationSeconds":3607,"path":"token"}}}}],"defaultMode":420}}}}{more}],"containers":[{{"name":"app","env":[{{"name":"X","value":"akv://main/db"}}],"volumeMounts":[{{"name":"{volume}","readOnly":true,"mountPath":"/var/run/secrets/kubernetes.io/serviceaccount"}}]}}]}}}}}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_replicasets_pods_share_a_key_unless_they_have_file_volumes() {
        let key_of = |volume: &str, more| key(&pod_with_token_volume(volume, more)).unwrap().key;
        let none = json!([]);
        let a = key_of("kube-api-access-2mkb7", none.clone());
        assert_eq!(a, key_of("kube-api-access-7v666", none.clone()));
        assert!(
            String::from_utf8(a.clone())
                .unwrap()
                .contains("kube-api-access-*****")
        );
        // Only that name, as the plugin makes it.
        for other in [
            "kube-api-access-2mkb7x",
            "kube-api-access-2MKB7",
            "my-api-access-2mkb7",
        ] {
            assert_ne!(
                key_of(other, none.clone()),
                key_of("kube-api-access-7v666", none.clone()),
                "{other}"
            );
        }
        // kvinject reads the names of volumes and mounts when a pod has its own file volumes.
        let csi = json!([{"name": "creds", "csi": {"driver": "kvinject.io", "volumeAttributes": {"pw": "akv://main/db"}}}]);
        assert_ne!(
            key_of("kube-api-access-2mkb7", csi.clone()),
            key_of("kube-api-access-7v666", csi)
        );
        // The same name as an env var's (a patch repeats it) is not made alike.
        let env_named = |volume: &str| {
            let text = String::from_utf8(pod_with_token_volume(volume, json!([]))).unwrap();
            let text = text.replace(r#"{"name":"X""#, &format!(r#"{{"name":"{volume}""#));
            key(text.as_bytes()).unwrap().key
        };
        let (ea, eb) = (
            env_named("kube-api-access-2mkb7"),
            env_named("kube-api-access-7v666"),
        );
        assert_ne!(ea, eb);
        assert_eq!(
            String::from_utf8(ea)
                .unwrap()
                .matches("kube-api-access-*****")
                .count(),
            2
        );
        // An escape could spell "csi": exact key.
        let escaped = json!([{"name": "e", "emptyDir": {"medium": "\u{e9}"}}]);
        let text = String::from_utf8(pod_with_token_volume("kube-api-access-2mkb7", escaped)).unwrap();
        let escaped_a = text.replace('\u{e9}', "\\u00e9");
        let escaped_b = escaped_a.replace("2mkb7", "7v666");
        assert_ne!(
            key(escaped_a.as_bytes()).unwrap().key,
            key(escaped_b.as_bytes()).unwrap().key
        );
    }

    #[test]
    fn reviews_it_cannot_read_plainly_are_not_remembered() {
        for bad in [
            &br#"{"request": {"uid": "a", "uid": "b", "object": {}}}"#[..],
            br#"{"request": {"uid": "a"}, "request": {"uid": "a"}}"#,
            br#"{"request": {"object": {}}}"#,
            br#"{"request": {"uid": null}}"#,
            br#"{"request": {"uid": 7}}"#,
            br#"{"request": {"u\u0069d": "a"}}"#,
            br#"{"reque\u0073t": {"uid": "a"}}"#,
            br#"{"request": {"uid": "a\"b"}}"#,
            br#"{"request": {"uid": "a"}} trailing"#,
            br#"[{"request": {"uid": "a"}}]"#,
            b"",
        ] {
            assert!(key(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn an_answer_holds_only_while_nothing_it_read_changed() {
        let changes = Generation::default();
        let memo = Memo::new(changes.clone(), BUDGET);
        let k = key(&body("u1", "shop")).unwrap().key;
        let at = memo.generation();
        memo.remember(k.clone(), decided(), at);
        assert_eq!(memo.recall(&k).as_deref(), Some(&decided()));
        changes.bump();
        assert_eq!(memo.recall(&k), None);
        // A decision that read the caches before a change is not remembered after it.
        memo.remember(k.clone(), decided(), at);
        assert_eq!(memo.recall(&k), None);
        let now = memo.generation();
        memo.remember(k.clone(), decided(), now);
        assert!(memo.recall(&k).is_some());
        assert_eq!(memo.len(), 1);
    }

    #[test]
    fn an_answer_is_made_again_for_each_uid() {
        let encoded = [ANSWER_START, br#""","allowed":true}}"#].concat();
        let decided = Decided {
            after_uid: Decided::after_uid(&encoded).unwrap(),
            ..decided()
        };
        let answer: serde_json::Value = serde_json::from_slice(&decided.answer("u-\"7\"")).unwrap();
        assert_eq!(answer["response"]["uid"], "u-\"7\"");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(Decided::after_uid(br#"{"response":{"uid":""}}"#), None);
    }

    #[test]
    fn a_full_memo_is_emptied_and_an_answer_over_budget_is_not_kept() {
        let k = |i: usize| key(&body(&format!("u{i}"), &format!("ns{i}"))).unwrap().key;
        let one = k(0).len() + decided().size();
        let memo = Memo::new(Generation::default(), one * 3);
        for i in 0..3 {
            memo.remember(k(i), decided(), 0);
        }
        assert_eq!(memo.len(), 3);
        memo.remember(k(3), decided(), 0);
        assert_eq!(memo.len(), 1);
        assert!(memo.recall(&k(3)).is_some() && memo.recall(&k(0)).is_none());
        let small = Memo::new(Generation::default(), one - 1);
        small.remember(k(0), decided(), 0);
        assert!(small.is_empty());
    }
}
