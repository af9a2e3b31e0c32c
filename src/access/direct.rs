//! Pods that name kvinject's Secrets themselves, pure. A materialized Secret's name is
//! visible in every pod spec that uses it and is deterministic, so anyone who may create a
//! pod in the namespace could write it into a `secretKeyRef`, an `envFrom`, a volume or
//! `imagePullSecrets` and get a value their ServiceAccount was never granted. kvinject's
//! Secrets therefore reach a pod only where kvinject's own plan would put them for that
//! pod's ServiceAccount under its grants: anything else is denied at admission.

use super::grant::{Index, NotGrantedTo, Subject, use_of};
use crate::{
    identity::WorkloadIdentity,
    materialize::{CachedSecret, seal::Verdict},
    mutate::{Plan, Source},
    reference,
};
use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, Pod};

/// The prefix every materialized Secret's name starts with (`kvi-` and `kvi-pull-`).
pub const NAME_PREFIX: &str = "kvi";

/// What a place in a pod does with a Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Env vars and files: the container reads the data.
    Data,
    /// `imagePullSecrets`: only kubelet reads it, to pull images.
    Pull,
}

/// A Secret a pod names itself, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named<'a> {
    pub location: String,
    pub name: &'a str,
    pub place: Place,
}

/// Every Secret `pod` names, in every container kind (init, app and ephemeral), env,
/// envFrom, volume (secret, projected, and the volume plugins that take a Secret) and
/// `imagePullSecrets`.
pub fn secrets_named(pod: &Pod) -> Vec<Named<'_>> {
    let mut out = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return out;
    };
    let mut data = Vec::new();
    for c in spec.init_containers.iter().flatten() {
        data.extend(env_secrets(
            "init container",
            &c.name,
            c.env.as_ref(),
            c.env_from.as_ref(),
        ));
    }
    for c in &spec.containers {
        data.extend(env_secrets(
            "container",
            &c.name,
            c.env.as_ref(),
            c.env_from.as_ref(),
        ));
    }
    for c in spec.ephemeral_containers.iter().flatten() {
        let (env, from) = (c.env.as_ref(), c.env_from.as_ref());
        data.extend(env_secrets("ephemeral container", &c.name, env, from));
    }
    for v in spec.volumes.iter().flatten() {
        let at = |how: &str| format!("volume `{}` ({how})", v.name);
        if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
            data.push((at("secret"), name));
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(s) = &source.secret {
                data.push((at("projected secret"), s.name.as_str()));
            }
        }
        // Volume plugins that are handed a Secret's data.
        let plugins = [
            (
                "csi nodePublishSecretRef",
                v.csi
                    .as_ref()
                    .and_then(|c| c.node_publish_secret_ref.as_ref())
                    .map(|r| r.name.as_str()),
            ),
            ("azureFile", v.azure_file.as_ref().map(|a| a.secret_name.as_str())),
            (
                "cephfs",
                v.cephfs
                    .as_ref()
                    .and_then(|c| c.secret_ref.as_ref())
                    .map(|r| r.name.as_str()),
            ),
            (
                "flexVolume",
                v.flex_volume
                    .as_ref()
                    .and_then(|c| c.secret_ref.as_ref())
                    .map(|r| r.name.as_str()),
            ),
            (
                "iscsi",
                v.iscsi
                    .as_ref()
                    .and_then(|c| c.secret_ref.as_ref())
                    .map(|r| r.name.as_str()),
            ),
            (
                "rbd",
                v.rbd
                    .as_ref()
                    .and_then(|c| c.secret_ref.as_ref())
                    .map(|r| r.name.as_str()),
            ),
            ("scaleIO", v.scale_io.as_ref().map(|c| c.secret_ref.name.as_str())),
            (
                "cinder",
                v.cinder
                    .as_ref()
                    .and_then(|c| c.secret_ref.as_ref())
                    .map(|r| r.name.as_str()),
            ),
            (
                "storageos",
                v.storageos
                    .as_ref()
                    .and_then(|c| c.secret_ref.as_ref())
                    .map(|r| r.name.as_str()),
            ),
        ];
        for (how, name) in plugins {
            if let Some(name) = name {
                data.push((at(how), name));
            }
        }
    }
    out.extend(data.into_iter().map(|(location, name)| Named {
        location,
        name,
        place: Place::Data,
    }));
    for (i, r) in spec.image_pull_secrets.iter().flatten().enumerate() {
        out.push(Named {
            location: format!("imagePullSecrets {i}"),
            name: r.name.as_str(),
            place: Place::Pull,
        });
    }
    out
}

/// The Secrets one container's env and envFrom name.
fn env_secrets<'a>(
    what: &str,
    container: &str,
    env: Option<&'a Vec<EnvVar>>,
    env_from: Option<&'a Vec<EnvFromSource>>,
) -> Vec<(String, &'a str)> {
    let mut found = Vec::new();
    for e in env.into_iter().flatten() {
        if let Some(r) = e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) {
            let location = format!("{what} `{container}` env `{}` (secretKeyRef)", e.name);
            found.push((location, r.name.as_str()));
        }
    }
    for (i, from) in env_from.into_iter().flatten().enumerate() {
        if let Some(r) = &from.secret_ref {
            found.push((
                format!("{what} `{container}` envFrom {i} (secretRef)"),
                r.name.as_str(),
            ));
        }
    }
    found
}

/// Whether `name` has the shape of a materialized Secret's name: such names are checked
/// even when no such Secret exists (yet).
pub fn is_kvinject_name(name: &str) -> bool {
    reference::looks_like_object_name(NAME_PREFIX, name)
}

/// What the apiserver (or kvinject's cache) knows of a Secret a pod names.
#[derive(Clone, Debug)]
pub enum Found {
    /// No Secret of that name in the namespace.
    Absent,
    /// A Secret without kvinject's label: the namespace's own, none of kvinject's business.
    Theirs,
    /// One of kvinject's.
    Ours(CachedSecret),
}

/// Why a pod may not name a Secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no such Secret exists; names of this shape are kvinject's, made only for an akv:// reference")]
    Absent,
    #[error(
        "it is not kvinject's, but names of this shape are: kvinject could make it later for someone else's reference (rename the Secret)"
    )]
    Reserved,
    #[error("its kvinject.io/ annotations do not give back its name (changed by hand?)")]
    Undescribed,
    #[error("it was read as another ServiceAccount's Azure identity, not as this pod's")]
    OtherIdentity,
    #[error("it holds a registry credential ({0}), which kvinject hands out only in imagePullSecrets")]
    PullOnly(String),
    #[error("it holds {0}, not a registry credential")]
    NotPull(String),
    #[error("{0}")]
    NotGranted(NotGrantedTo),
    #[error("its value was changed by hand; kvinject hands it out again once it has restored it")]
    Edited,
    #[error("its seal does not verify: kvinject did not write it as it is")]
    Foreign,
}

/// A pod that names kvinject's Secrets outside kvinject's plan: every such place.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{}",
    self.0.iter().map(|(location, name, why)| format!(
        "{location} names Secret `{name}` itself: kvinject's Secrets reach pods only through akv:// references the pod's ServiceAccount is granted, and {why}"
    )).collect::<Vec<_>>().join("; ")
)]
pub struct DirectDenied(pub Vec<(String, String, Refusal)>);

/// What the pod asks for, and who it is.
pub struct Asking<'a> {
    pub subject: &'a Subject<'a>,
    /// The identity the pod's ServiceAccount reads Key Vault as (`None`: kvinject's).
    pub identity: Option<&'a WorkloadIdentity>,
    /// `None`: `--access-policy off`.
    pub grants: Option<&'a Index>,
    /// Nothing is stored on a dry run: a name whose Secret does not exist yet gives nothing.
    pub dry_run: bool,
}

/// Checks every Secret `pod` names itself against what kvinject's `plan` for it makes.
/// `find` tells what a name that the plan does not produce is (called only for names of
/// kvinject's shape, or for the ones the cache knows as kvinject's).
pub fn check(
    pod: &Pod,
    plan: &Plan,
    asking: &Asking<'_>,
    mut find: impl FnMut(&str) -> Found,
) -> Result<(), DirectDenied> {
    let mut refused = Vec::new();
    for named in secrets_named(pod) {
        let why = match plan.needed.iter().find(|n| n.secret_name == named.name) {
            // The plan's own Secret (granted by the plan's check) in another place too.
            Some(needed) => placed(&needed.source, named.place),
            None => match find(named.name) {
                // Someone's own Secret under a name kvinject may need: deleted later, kvinject
                // would make it for another pod's reference, and this pod would read it.
                Found::Theirs if is_kvinject_name(named.name) => Some(Refusal::Reserved),
                Found::Theirs => None,
                Found::Absent if asking.dry_run || !is_kvinject_name(named.name) => None,
                Found::Absent => Some(Refusal::Absent),
                Found::Ours(secret) => judge(&secret, named.place, asking),
            },
        };
        if let Some(why) = why {
            refused.push((named.location, named.name.to_owned(), why));
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(DirectDenied(refused))
    }
}

/// One of kvinject's Secrets, named outside the plan: allowed only when kvinject would have
/// made it, under that name, for this pod's ServiceAccount and a granted use.
fn judge(secret: &CachedSecret, place: Place, asking: &Asking<'_>) -> Option<Refusal> {
    match secret.verdict {
        Verdict::Genuine => {}
        Verdict::Edited => return Some(Refusal::Edited),
        Verdict::Foreign => return Some(Refusal::Foreign),
    }
    let Some((source, _)) = secret.made_for() else {
        return Some(Refusal::Undescribed);
    };
    if !source.is_named(&secret.name, asking.identity) {
        return Some(Refusal::OtherIdentity);
    }
    if let Some(grants) = asking.grants
        && let Err(why) = grants.decide(asking.subject, source.reference(), use_of(&source))
    {
        return Some(Refusal::NotGranted(why));
    }
    placed(&source, place)
}

fn placed(source: &Source, place: Place) -> Option<Refusal> {
    match (source, place) {
        (Source::Env(_), Place::Data)
        | (Source::DockerConfig(_) | Source::RegistryLogin { .. }, Place::Pull) => None,
        (Source::Env(r), Place::Pull) => Some(Refusal::NotPull(format!("the value of {r}"))),
        (other, Place::Data) => Some(Refusal::PullOnly(other.reference().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        access::policy::AccessPolicy,
        materialize::{self, seal},
        mutate::{self, InjectConfig, Needed},
        reference::Reference,
    };
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    use serde_json::json;
    use std::collections::BTreeMap;

    fn r(name: &str) -> Reference {
        Reference::parse(&format!("akv://main/{name}")).unwrap().unwrap()
    }

    /// kvinject's Secret for `source` read as `identity`, as the watch cache holds it.
    fn ours(source: Source, identity: Option<&WorkloadIdentity>) -> CachedSecret {
        let needed = Needed {
            secret_name: source.secret_name_as(identity),
            source,
            identity: identity.cloned(),
        };
        let value = match &needed.source {
            Source::Env(_) => "v",
            _ => r#"{"auths":{"r.example":{"auth":"dTpw"}}}"#,
        };
        let fetched = crate::keyvault::source::Fetched {
            value: crate::keyvault::SecretValue::new(value),
            version: "0123456789abcdef0123456789abcdef".into(),
        };
        let keys = seal::Keys::default();
        let secret = materialize::desired_secret("team-a", &needed, &fetched, &keys).unwrap();
        CachedSecret::new(&keys, &secret)
    }

    fn api() -> WorkloadIdentity {
        WorkloadIdentity {
            namespace: "team-a".into(),
            service_account: "api".into(),
            client_id: "cid".into(),
            tenant_id: "t".into(),
        }
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    fn policies(secrets: &[&str], uses: &[&str]) -> Index {
        let mut spec = json!({"vault": "main", "secrets": secrets, "namespaces": {"names": ["team-a"]}});
        if !uses.is_empty() {
            spec["uses"] = json!(uses);
        }
        let p = AccessPolicy::new("team-a", serde_json::from_value(spec).unwrap());
        Index::new([&p])
    }

    /// The check for `pod` (planned as kvinject plans it), with `cache` as what exists.
    fn decide(
        pod: &Pod,
        cache: &[CachedSecret],
        grants: Option<&Index>,
        dry_run: bool,
    ) -> Result<(), DirectDenied> {
        decide_found(pod, grants, dry_run, |name| {
            match cache.iter().find(|s| s.name == name) {
                Some(s) => Found::Ours(s.clone()),
                None if is_kvinject_name(name) => Found::Absent,
                None => Found::Theirs,
            }
        })
    }

    /// The check for `pod` of ServiceAccount `default` in `team-a`, with `find` saying what
    /// each name it names is.
    fn decide_found(
        pod: &Pod,
        grants: Option<&Index>,
        dry_run: bool,
        find: impl FnMut(&str) -> Found,
    ) -> Result<(), DirectDenied> {
        let config = InjectConfig {
            vaults: ["main".to_owned()].into(),
            ..Default::default()
        };
        let plan = mutate::plan(pod, &config).unwrap();
        let labels = BTreeMap::new();
        let subject = Subject {
            namespace: "team-a",
            labels: &labels,
            service_account: "default",
        };
        let asking = Asking {
            subject: &subject,
            identity: None,
            grants,
            dry_run,
        };
        check(pod, &plan, &asking, find)
    }

    #[test]
    fn every_place_a_pod_can_name_a_secret_is_found() {
        let p = pod(json!({
            "initContainers": [{"name": "i", "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "k"}}}]}],
            "containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "s2"}}]}],
            "ephemeralContainers": [{"name": "e", "env": [{"name": "B", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "k"}}}]}],
            "volumes": [
                {"name": "v1", "secret": {"secretName": "s4"}},
                {"name": "v2", "projected": {"sources": [{"secret": {"name": "s5"}}]}},
                {"name": "v3", "csi": {"driver": "x", "nodePublishSecretRef": {"name": "s6"}}},
                {"name": "v4", "azureFile": {"secretName": "s7", "shareName": "x"}},
                {"name": "v5", "cinder": {"volumeID": "x", "secretRef": {"name": "s8"}}}
            ],
            "imagePullSecrets": [{"name": "s9"}]
        }));
        let named = secrets_named(&p);
        let names: Vec<&str> = named.iter().map(|n| n.name).collect();
        assert_eq!(names, ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"]);
        assert_eq!(named[0].location, "init container `i` env `A` (secretKeyRef)");
        assert_eq!(
            named[2].location,
            "ephemeral container `e` env `B` (secretKeyRef)"
        );
        assert_eq!(named[4].location, "volume `v2` (projected secret)");
        assert_eq!(named[7].location, "volume `v5` (cinder)");
        assert_eq!(named[8].place, Place::Pull);
        assert!(named[..8].iter().all(|n| n.place == Place::Data));
    }

    #[test]
    fn a_pod_may_name_only_what_kvinject_would_hand_its_service_account() {
        let granted = ours(Source::Env(r("team-a-db")), None);
        let other = ours(Source::Env(r("team-b-db")), None);
        let pull = ours(Source::DockerConfig(r("team-a-acr")), None);
        let apis = ours(Source::Env(r("team-a-db")), Some(&api()));
        let cache = [granted.clone(), other.clone(), pull.clone(), apis.clone()];
        let grants = policies(&["team-a-*"], &[]);
        let env = |name: &str| {
            pod(
                json!({"containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": name, "key": "value"}}}]}]}),
            )
        };
        let volume = |name: &str| {
            pod(
                json!({"containers": [{"name": "c"}], "volumes": [{"name": "v", "secret": {"secretName": name}}]}),
            )
        };
        let pulls =
            |name: &str| pod(json!({"containers": [{"name": "c"}], "imagePullSecrets": [{"name": name}]}));

        // What kvinject itself would write: allowed (a reinvocation, a copied spec).
        assert_eq!(decide(&env(&granted.name), &cache, Some(&grants), false), Ok(()));
        assert_eq!(decide(&pulls(&pull.name), &cache, Some(&grants), false), Ok(()));
        // The namespace's own Secrets are none of kvinject's business.
        assert_eq!(decide(&env("app-config"), &cache, Some(&grants), false), Ok(()));

        let why = |p: &Pod, grants: &Index| decide(p, &cache, Some(grants), false).unwrap_err().0.remove(0).2;
        assert!(matches!(why(&env(&other.name), &grants), Refusal::NotGranted(_)));
        assert!(matches!(
            why(&volume(&other.name), &grants),
            Refusal::NotGranted(_)
        ));
        assert!(
            matches!(why(&env(&apis.name), &grants), Refusal::OtherIdentity),
            "another ServiceAccount's"
        );
        assert!(
            matches!(why(&volume(&pull.name), &grants), Refusal::PullOnly(_)),
            "a registry password as a file"
        );
        assert!(matches!(why(&pulls(&granted.name), &grants), Refusal::NotPull(_)));
        let pull_only = policies(&["team-a-*"], &["imagePull"]);
        assert!(
            matches!(why(&env(&granted.name), &pull_only), Refusal::NotGranted(_)),
            "granted for imagePull only"
        );
        // A name of kvinject's shape whose Secret does not exist yet: it would be filled in
        // once another pod is admitted. A dry run stores nothing.
        let future = Source::Env(r("team-b-db")).secret_name_as(Some(&api()));
        assert!(matches!(why(&env(&future), &grants), Refusal::Absent));
        assert_eq!(decide(&env(&future), &cache, Some(&grants), true), Ok(()));
        // The tenant's own Secret squatting such a name: it could delete it once the pod is
        // stored, and kvinject would fill the name for someone else.
        let squatting = |p: &Pod| decide_found(p, Some(&grants), false, |_| Found::Theirs);
        let squat = squatting(&env(&future)).unwrap_err();
        assert!(matches!(squat.0[0].2, Refusal::Reserved), "{squat}");
        assert_eq!(squatting(&env("app-config")), Ok(()));
        // With --access-policy off only the identity and the place count.
        assert_eq!(decide(&env(&other.name), &cache, None, false), Ok(()));
        assert!(decide(&env(&apis.name), &cache, None, false).is_err());

        // The denial names the place, the Secret, and why; every place at once.
        let both = pod(json!({"containers": [{"name": "c", "env": [
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": other.name, "key": "value"}}},
            {"name": "Y", "valueFrom": {"secretKeyRef": {"name": apis.name, "key": "value"}}}
        ]}]}));
        let message = decide(&both, &cache, Some(&grants), false)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with(&format!(
                "container `c` env `X` (secretKeyRef) names Secret `{}` itself",
                other.name
            )),
            "{message}"
        );
        assert!(
            message.contains("akv://main/team-b-db is not granted to ServiceAccount `default`"),
            "{message}"
        );
        assert!(message.contains("container `c` env `Y`"), "{message}");
    }

    #[test]
    fn an_edited_or_unsealed_secret_is_never_named_even_when_granted() {
        let grants = policies(&["team-a-*"], &[]);
        let env = |name: &str| {
            pod(
                json!({"containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": name, "key": "value"}}}]}]}),
            )
        };
        let genuine = ours(Source::Env(r("team-a-db")), None);
        assert_eq!(
            decide(
                &env(&genuine.name),
                std::slice::from_ref(&genuine),
                Some(&grants),
                false
            ),
            Ok(())
        );
        for (verdict, refusal) in [
            (Verdict::Edited, Refusal::Edited),
            (Verdict::Foreign, Refusal::Foreign),
        ] {
            let mut s = genuine.clone();
            s.verdict = verdict;
            let denied = decide(&env(&s.name), &[s.clone()], Some(&grants), false).unwrap_err();
            assert_eq!(denied.0[0].2, refusal);
        }
    }

    #[test]
    fn the_plans_own_secret_elsewhere_in_the_pod_is_held_to_its_use() {
        // An imagePull grant, and the registry credential's Secret also mounted as a file.
        let config = InjectConfig {
            vaults: ["main".to_owned()].into(),
            ..Default::default()
        };
        let name = Source::DockerConfig(r("team-a-acr")).secret_name();
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": {"kvinject.io/image-pull-secrets": "akv://main/team-a-acr"}},
            "spec": {"containers": [{"name": "c"}], "volumes": [{"name": "v", "secret": {"secretName": name}}]}
        }))
        .unwrap();
        assert!(
            mutate::plan(&p, &config)
                .unwrap()
                .needed
                .iter()
                .any(|n| n.secret_name == name)
        );
        let err = decide(&p, &[], Some(&policies(&["team-a-*"], &[])), false).unwrap_err();
        assert!(matches!(err.0[0].2, Refusal::PullOnly(_)), "{err}");
    }

    #[test]
    fn a_secret_whose_annotations_were_edited_does_not_describe_itself() {
        let keys = seal::Keys::default();
        let needed = Needed::own_read(Source::RegistryLogin {
            registry: "r.example".into(),
            username: "u".into(),
            password: r("team-a-sp"),
        });
        let fetched = crate::keyvault::source::Fetched {
            value: crate::keyvault::SecretValue::new("pw"),
            version: "0123456789abcdef0123456789abcdef".into(),
        };
        let mut secret: Secret = materialize::desired_secret("team-a", &needed, &fetched, &keys).unwrap();
        assert_eq!(
            CachedSecret::new(&keys, &secret).made_for().map(|m| m.0),
            Some(needed.source.clone())
        );
        // Another registry host: the seal (over name, reference, data) still verifies, but
        // the annotations no longer give back the name.
        secret
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(materialize::REGISTRY_ANNOTATION.into(), "evil.example".into());
        let edited = CachedSecret::new(&keys, &secret);
        assert_eq!(edited.verdict, seal::Verdict::Genuine);
        assert_eq!(edited.made_for(), None);
        secret.data = Some([("value".to_owned(), ByteString(b"x".to_vec()))].into());
        secret.type_ = Some("Opaque".into());
        assert_eq!(CachedSecret::new(&keys, &secret).made_for(), None);
    }
}
