//! Rotation decisions, pure: when a Secret is due, which Secrets a workload consumes, and
//! whether a workload rolls.

use crate::{
    duration::parse_duration,
    materialize::{self, CachedSecret},
    mutate::{self, InjectConfig},
    reference::Reference,
    rotation::pods::PodUse,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use sha2::{Digest, Sha256};
use std::{collections::BTreeMap, time::Duration};

pub use crate::mutate::REFRESH_INTERVAL_ANNOTATION;
/// Workload (or namespace) annotation: `"true"` rolls the workload when a Secret it uses changes.
pub const ROLLOUT_ANNOTATION: &str = "kvinject.io/rollout-on-rotation";
/// Workload annotation: `restart` (default) or `evict`.
pub const STRATEGY_ANNOTATION: &str = "kvinject.io/rollout-strategy";
/// SHA-256 over the versions a workload consumes: on the workload's metadata, the versions
/// its running pods were last rolled (or first seen) with; on its pod template, the
/// versions of the last rollout kvinject made.
pub const VERSIONS_ANNOTATION: &str = "kvinject.io/secret-versions";

/// The reference a materialized Secret follows, when it follows the current version.
pub fn followed_reference(secret: &CachedSecret) -> Option<Reference> {
    let annotation = secret.annotation(materialize::REFERENCE_ANNOTATION)?;
    let reference = Reference::parse(annotation)?.ok()?;
    // A pinned version never changes: nothing to follow.
    reference.version.is_none().then_some(reference)
}

pub fn version_of(secret: &CachedSecret) -> Option<&str> {
    secret.annotation(materialize::VERSION_ANNOTATION)
}

/// What a workload's rollouts follow of a Secret: its version and, after a hand-edited value
/// was restored, when (pods that started meanwhile read the edited value: they roll once).
pub fn rollout_version(secret: &CachedSecret) -> Option<String> {
    let version = version_of(secret)?;
    Some(match secret.annotation(materialize::RESTORED_ANNOTATION) {
        Some(at) => format!("{version} restored {at}"),
        None => version.to_owned(),
    })
}

/// The intervals pods ask for, per Secret they use (`(namespace, name)`): the shortest
/// `kvinject.io/refresh-interval` among them, never below `floor`. One pass over the pods; unparseable or zero
/// annotations are ignored, and Secrets no pod asks about are absent (they use the default).
pub fn requested_intervals<'a>(
    pods: impl IntoIterator<Item = &'a PodUse>,
    floor: Duration,
) -> BTreeMap<(String, String), Duration> {
    let mut out = BTreeMap::new();
    for pod in pods {
        let Some(asked) = pod
            .refresh_interval
            .as_deref()
            .and_then(|v| parse_duration(v).ok())
            .filter(|d| !d.is_zero())
            .map(|d| d.max(floor))
        else {
            continue;
        };
        for name in &pod.secrets {
            out.entry((pod.namespace.clone(), name.to_string()))
                .and_modify(|d: &mut Duration| *d = (*d).min(asked))
                .or_insert(asked);
        }
    }
    out
}

/// Marks a materialized Secret kvinject may delete once nothing has referred to it for the
/// grace period: the time it was first seen unreferenced.
pub const UNREFERENCED_ANNOTATION: &str = "kvinject.io/unreferenced-since";

#[derive(Debug, PartialEq, Eq)]
pub enum Collect {
    Keep,
    /// Referenced again: drop the mark.
    Unmark,
    /// First seen unreferenced: set the mark.
    Mark,
    Delete,
}

/// Secret annotation (RFC 3339 time): keep the Secret until then, referenced or not, for
/// pods kvinject cannot see coming (custom controllers, workflow engines).
pub const RETAIN_UNTIL_ANNOTATION: &str = "kvinject.io/retain-until";
/// Namespace annotation: the garbage-collection grace period of its Secrets (a duration;
/// `0` never collects), instead of `--gc-grace-period`.
pub const GC_GRACE_ANNOTATION: &str = "kvinject.io/gc-grace-period";

/// The grace period for a namespace: its annotation, else `default` (`None`: never
/// collect). An annotation that does not parse collects nothing there until it is fixed
/// (whoever wrote it wanted a grace period of their own, likely a longer one), and says why.
pub fn grace_for(
    namespace_annotation: Option<&str>,
    default: Option<Duration>,
) -> (Option<Duration>, Option<String>) {
    match namespace_annotation.map(|v| (v, parse_duration(v))) {
        Some((_, Ok(d))) if d.is_zero() => (None, None),
        Some((_, Ok(d))) => (Some(d), None),
        Some((v, Err(e))) => (
            None,
            Some(format!(
                "{GC_GRACE_ANNOTATION}: `{v}` is not a duration ({e}; for example 168h, or 0 for never); no Secret of this namespace is collected until it is fixed"
            )),
        ),
        None => (default, None),
    }
}

/// Whether `retain_until` (a Secret's `kvinject.io/retain-until`) keeps the Secret at
/// `now`: while the time is ahead. One that does not parse keeps it too (whoever wrote it
/// wanted it kept), and says why.
pub fn retained(retain_until: Option<&str>, now: k8s_openapi::jiff::Timestamp) -> (bool, Option<String>) {
    match retain_until.map(|t| (t, t.parse::<k8s_openapi::jiff::Timestamp>())) {
        None => (false, None),
        Some((_, Ok(t))) => (t > now, None),
        Some((v, Err(_))) => (
            true,
            Some(format!(
                "{RETAIN_UNTIL_ANNOTATION}: `{v}` is not an RFC 3339 time (for example 2027-01-31T00:00:00Z); the Secret is kept until it is fixed"
            )),
        ),
    }
}

/// What garbage collection does with one of kvinject's Secrets (pure). A Secret retained
/// (`retained`) counts as referenced.
pub fn collect(
    referenced: bool,
    marked_at: Option<&str>,
    now: k8s_openapi::jiff::Timestamp,
    grace: Duration,
) -> Collect {
    match (referenced, marked_at) {
        (true, None) => Collect::Keep,
        (true, Some(_)) => Collect::Unmark,
        (false, None) => Collect::Mark,
        (false, Some(at)) => match at.parse::<k8s_openapi::jiff::Timestamp>() {
            // A mark kvinject cannot read is replaced, never trusted.
            Err(_) => Collect::Mark,
            Ok(at) => {
                let elapsed = now.as_millisecond().saturating_sub(at.as_millisecond());
                if elapsed >= i64::try_from(grace.as_millis()).unwrap_or(i64::MAX) {
                    Collect::Delete
                } else {
                    Collect::Keep
                }
            }
        },
    }
}

/// A deterministic spread in [0, interval/10): 10,000 Secrets do not fall due together.
pub fn jitter(secret_key: &str, interval: Duration) -> Duration {
    let h = Sha256::digest(secret_key.as_bytes());
    let n = u64::from_le_bytes(h[..8].try_into().unwrap_or_default());
    let span = (interval.as_millis() / 10).max(1) as u64;
    Duration::from_millis(n % span)
}

/// The materialized Secrets a workload's pods will use, read as `identity` (its
/// ServiceAccount's, or kvinject's): the same planning the webhook does.
pub fn workload_secrets(
    template: &PodTemplateSpec,
    config: &InjectConfig,
    identity: Option<&crate::identity::WorkloadIdentity>,
    namespace_annotations: &BTreeMap<String, String>,
) -> Vec<String> {
    workload_plan(template, config, identity, namespace_annotations).map_or_else(Vec::new, |p| {
        p.needed.into_iter().map(|n| n.secret_name).collect()
    })
}

/// The webhook's plan for a workload's pods (`None` when they would be denied).
pub fn workload_plan(
    template: &PodTemplateSpec,
    config: &InjectConfig,
    identity: Option<&crate::identity::WorkloadIdentity>,
    namespace_annotations: &BTreeMap<String, String>,
) -> Option<mutate::Plan> {
    let pod = Pod {
        metadata: template.metadata.clone().unwrap_or_default(),
        spec: template.spec.clone(),
        status: None,
    };
    let pod = mutate::with_namespace_pull_secrets(&pod, namespace_annotations).unwrap_or(pod);
    mutate::plan_as(&pod, config, identity).ok()
}

/// The Secrets whose versions decide whether a workload rolls: those its pods read at start.
/// Files update in place, so a Secret used only as files counts only when the workload
/// itself asks to roll (`kvinject.io/rollout-on-rotation: "true"`), not by default. Registry
/// credentials never count: kubelet reads them only when it pulls an image, so a restart
/// changes nothing for running pods, and the next pull uses the new one anyway.
pub fn rollout_secrets(plan: &mutate::Plan, workload_asks: bool) -> Vec<String> {
    plan.needed
        .iter()
        .filter(|n| matches!(n.source, mutate::Source::Env(_)))
        .map(|n| n.secret_name.clone())
        .filter(|n| workload_asks || !plan.files_only.contains(n))
        .collect()
}

/// Workload annotation: the versions hash for which a rollout halted (an `evict`
/// replacement did not become Ready in time, or an `OnDelete` workload that a restart
/// cannot roll). Rollouts resume for other versions, or when it is removed.
pub const HALTED_ANNOTATION: &str = "kvinject.io/rollout-halted";

/// Workload annotation: SHA-256 over the names of the Secrets whose versions
/// `VERSIONS_ANNOTATION` records, so a change of the set itself (a reference added, removed
/// or re-pinned in git) is told apart from a new version.
pub const NAMES_ANNOTATION: &str = "kvinject.io/secret-names";

/// SHA-256 over the sorted names of `versions`.
pub fn names_hash(versions: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for name in versions.keys() {
        h.update(name.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `rollout`, told whether the set of Secrets changed since the record (`stored_names`
/// against `current_names`). A changed set means the pod template changed in git, which
/// rolls the workload by itself, with the current Secrets: a second roll by kvinject would
/// restart every pod again for nothing, so the new versions are only recorded. A record
/// without names (made before they were recorded) gets them, without a roll.
pub fn rollout_by_set(
    stored: Option<&str>,
    stored_names: Option<&str>,
    current: &str,
    current_names: &str,
    opted_in: bool,
    strategy: Option<&str>,
) -> Result<Rollout, String> {
    let decision = rollout(stored, current, opted_in, strategy)?;
    let set_changed = stored_names.is_some_and(|n| n != current_names);
    Ok(match decision {
        Rollout::Roll { hash, .. } if set_changed => Rollout::Record { hash },
        Rollout::None if opted_in && stored.is_some() && stored_names.is_none() => Rollout::Record {
            hash: current.to_owned(),
        },
        other => other,
    })
}

/// SHA-256 over `secret name = version` lines, sorted: the same versions, the same hash.
pub fn versions_hash(versions: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (name, version) in versions {
        h.update(name.as_bytes());
        h.update(b"=");
        h.update(version.as_bytes());
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Restart,
    Evict,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// Nothing to do.
    None,
    /// First sight: record the versions on the workload's metadata, roll nothing.
    Record { hash: String },
    /// A real version change: roll with `strategy` and record the new versions.
    Roll { hash: String, strategy: Strategy },
}

/// Whether a workload rolls. `stored` is its metadata annotation; `opted_in` combines the
/// workload's annotation with the namespace's and the global default.
pub fn rollout(
    stored: Option<&str>,
    current: &str,
    opted_in: bool,
    strategy: Option<&str>,
) -> Result<Rollout, String> {
    if !opted_in {
        return Ok(Rollout::None);
    }
    let strategy = match strategy.unwrap_or("restart") {
        "restart" => Strategy::Restart,
        "evict" => Strategy::Evict,
        other => {
            return Err(format!(
                "{STRATEGY_ANNOTATION} `{other}` is neither `restart` nor `evict`"
            ));
        }
    };
    Ok(match stored {
        None => Rollout::Record {
            hash: current.to_owned(),
        },
        Some(s) if s == current => Rollout::None,
        Some(_) => Rollout::Roll {
            hash: current.to_owned(),
            strategy,
        },
    })
}

/// The workload's own annotation wins; then the namespace's; then the global default.
pub fn opted_in(workload: Option<&str>, namespace: Option<&str>, global: bool) -> bool {
    match workload.or(namespace) {
        Some(v) => v == "true",
        None => global,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(annotations: serde_json::Value, secret: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "annotations": annotations},
            "spec": {"containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": secret, "key": "value"}}}]}]}
        }))
        .unwrap()
    }

    #[test]
    fn a_restore_changes_what_rollouts_follow_and_a_new_version_drops_it() {
        let secret = |annotations: serde_json::Value| {
            let s: k8s_openapi::api::core::v1::Secret =
                serde_json::from_value(json!({"metadata": {"name": "s", "annotations": annotations}}))
                    .unwrap();
            CachedSecret::with_verdict(&s, crate::materialize::seal::Verdict::Genuine)
        };
        let plain = secret(json!({materialize::VERSION_ANNOTATION: "v1"}));
        let restored = secret(json!({
            materialize::VERSION_ANNOTATION: "v1",
            materialize::RESTORED_ANNOTATION: "2026-12-07T09:00:00Z"
        }));
        let again = secret(json!({
            materialize::VERSION_ANNOTATION: "v1",
            materialize::RESTORED_ANNOTATION: "2026-12-07T10:00:00Z"
        }));
        assert_eq!(rollout_version(&plain).as_deref(), Some("v1"));
        assert_ne!(rollout_version(&restored), rollout_version(&plain));
        assert_ne!(rollout_version(&again), rollout_version(&restored));
        assert_eq!(rollout_version(&secret(json!({}))), None);
    }

    #[test]
    fn the_shortest_interval_of_the_pods_using_a_secret_wins() {
        let pods = [
            pod(json!({"kvinject.io/refresh-interval": "10m"}), "a"),
            pod(json!({"kvinject.io/refresh-interval": "30s"}), "a"),
            pod(json!({"kvinject.io/refresh-interval": "1s"}), "b"),
            pod(json!({"kvinject.io/refresh-interval": "soon"}), "a"),
            pod(json!({}), "a"),
        ];
        let pods = pods.map(PodUse::from);
        let asked = requested_intervals(&pods, Duration::ZERO);
        let key = |n: &str| ("ns".to_string(), n.to_string());
        assert_eq!(asked.get(&key("a")), Some(&Duration::from_secs(30)));
        assert_eq!(asked.get(&key("b")), Some(&Duration::from_secs(1)));
        let floored = requested_intervals(&pods, Duration::from_secs(20));
        assert_eq!(
            floored.get(&key("b")),
            Some(&Duration::from_secs(20)),
            "raised to the floor"
        );
        assert_eq!(
            floored.get(&key("a")),
            Some(&Duration::from_secs(30)),
            "30s is above the floor"
        );
        assert_eq!(asked.get(&key("c")), None, "nobody asked: the default applies");
        assert_eq!(
            requested_intervals(&pods[3..], Duration::ZERO).get(&key("a")),
            None,
            "a bad value is ignored"
        );
    }

    #[test]
    fn secrets_used_only_as_files_roll_a_workload_only_when_it_asks() {
        let template: PodTemplateSpec = serde_json::from_value(json!({"spec": {
            "volumes": [{"name": "f", "csi": {"driver": "kvinject.io", "volumeAttributes": {"t": "akv://v/token"}}}],
            "containers": [{"name": "c", "env": [{"name": "DB", "value": "akv://v/db"}]}]}}))
        .unwrap();
        let config = InjectConfig {
            vaults: ["v".to_string()].into(),
            ..Default::default()
        };
        let plan = workload_plan(&template, &config, None, &BTreeMap::new()).unwrap();
        let db = plan
            .needed
            .iter()
            .find(|n| n.source.reference().name == "db")
            .unwrap()
            .secret_name
            .clone();
        assert_eq!(
            rollout_secrets(&plan, false),
            vec![db],
            "the file-only token does not count by default"
        );
        assert_eq!(
            rollout_secrets(&plan, true).len(),
            2,
            "a workload that asks rolls for its files too"
        );
    }

    #[test]
    fn registry_credentials_never_decide_a_rollout() {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"annotations": {"kvinject.io/image-pull-secrets": "akv://v/acr"}},
            "spec": {"containers": [{"name": "c", "env": [{"name": "DB", "value": "akv://v/db"}]}]}}))
        .unwrap();
        let config = InjectConfig {
            vaults: ["v".to_string()].into(),
            ..Default::default()
        };
        let plan = workload_plan(&template, &config, None, &BTreeMap::new()).unwrap();
        assert_eq!(plan.needed.len(), 2, "the plan has the pull Secret too");
        let db = plan
            .needed
            .iter()
            .find(|n| n.source.reference().name == "db")
            .unwrap()
            .secret_name
            .clone();
        for asks in [false, true] {
            assert_eq!(rollout_secrets(&plan, asks), vec![db.clone()], "asks: {asks}");
        }
    }

    #[test]
    fn pinned_references_are_not_followed() {
        use crate::materialize::seal::Verdict;
        use k8s_openapi::api::core::v1::Secret;
        let cached = |s: Secret| CachedSecret::with_verdict(&s, Verdict::Genuine);
        let secret = |r: &str| {
            cached(
                serde_json::from_value(json!({"metadata": {"annotations": {"kvinject.io/reference": r}}}))
                    .unwrap(),
            )
        };
        assert!(followed_reference(&secret("akv://v/db")).is_some());
        assert!(followed_reference(&secret("akv://v/db/0123456789abcdef0123456789abcdef")).is_none());
        assert!(followed_reference(&cached(Secret::default())).is_none());
    }

    #[test]
    fn hashes_depend_on_versions_only() {
        let a = BTreeMap::from([
            ("s1".to_string(), "v1".to_string()),
            ("s2".to_string(), "v1".to_string()),
        ]);
        let mut b = a.clone();
        assert_eq!(versions_hash(&a), versions_hash(&b));
        b.insert("s2".into(), "v2".into());
        assert_ne!(versions_hash(&a), versions_hash(&b));
        assert_eq!(versions_hash(&a).len(), 64);
    }

    #[test]
    fn rollout_table() {
        let h = "h1";
        let cases = [
            (None, false, None, Ok(Rollout::None)),
            (None, true, None, Ok(Rollout::Record { hash: h.into() })),
            (Some("h1"), true, None, Ok(Rollout::None)),
            (
                Some("h0"),
                true,
                None,
                Ok(Rollout::Roll {
                    hash: h.into(),
                    strategy: Strategy::Restart,
                }),
            ),
            (
                Some("h0"),
                true,
                Some("evict"),
                Ok(Rollout::Roll {
                    hash: h.into(),
                    strategy: Strategy::Evict,
                }),
            ),
            (
                Some("h0"),
                true,
                Some("recreate"),
                Err("kvinject.io/rollout-strategy `recreate` is neither `restart` nor `evict`".to_string()),
            ),
        ];
        for (stored, opted, strategy, want) in cases {
            assert_eq!(
                rollout(stored, h, opted, strategy),
                want,
                "{stored:?} {opted} {strategy:?}"
            );
        }
    }

    #[test]
    fn a_changed_set_of_secrets_is_recorded_not_rolled() {
        let (h, n) = ("h1", "n1");
        let cases = [
            // Same set, new versions: rolls.
            (Some("h0"), Some("n1"), true, "roll"),
            // A reference added or re-pinned in git: that change already rolls.
            (Some("h0"), Some("n0"), true, "record"),
            // A record from before names were kept: versions decide, as before.
            (Some("h0"), None, true, "roll"),
            // Nothing new, but no names yet: they are recorded, nothing rolls.
            (Some("h1"), None, true, "record"),
            (Some("h1"), Some("n1"), true, "none"),
            // Not opted in: nothing, whatever changed.
            (Some("h0"), Some("n0"), false, "none"),
            (Some("h1"), None, false, "none"),
        ];
        for (stored, stored_names, opted, want) in cases {
            let got = match rollout_by_set(stored, stored_names, h, n, opted, None).unwrap() {
                Rollout::Roll { .. } => "roll",
                Rollout::Record { hash } => {
                    assert_eq!(hash, h);
                    "record"
                }
                Rollout::None => "none",
            };
            assert_eq!(got, want, "{stored:?} {stored_names:?} {opted}");
        }
    }

    #[test]
    fn names_hash_depends_on_names_only() {
        let a = BTreeMap::from([("s1".to_string(), "v1".to_string()), ("s2".into(), "v1".into())]);
        let b = BTreeMap::from([("s1".to_string(), "v9".to_string()), ("s2".into(), "v9".into())]);
        let c = BTreeMap::from([("s1".to_string(), "v1".to_string())]);
        assert_eq!(names_hash(&a), names_hash(&b));
        assert_ne!(names_hash(&a), names_hash(&c));
    }

    #[test]
    fn opt_in_precedence() {
        assert!(opted_in(Some("true"), Some("false"), false));
        assert!(!opted_in(Some("false"), Some("true"), true));
        assert!(opted_in(None, Some("true"), false));
        assert!(opted_in(None, None, true));
        assert!(!opted_in(None, None, false));
    }

    #[test]
    fn workloads_consume_what_the_webhook_would_materialize() {
        let config = InjectConfig {
            vaults: ["v".to_string()].into(),
            ..Default::default()
        };
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"annotations": {"kvinject.io/image-pull-secrets": "akv://v/acr"}},
            "spec": {"containers": [{"name": "c", "env": [{"name": "X", "value": "akv://v/db"}]}]}
        }))
        .unwrap();
        let names = workload_secrets(&template, &config, None, &BTreeMap::new());
        assert_eq!(names.len(), 2);
        assert!(
            names.iter().any(|n| n.starts_with("kvi-v-db-"))
                && names.iter().any(|n| n.starts_with("kvi-pull-v-acr-")),
            "{names:?}"
        );
    }

    #[test]
    fn collection_table() {
        let now: k8s_openapi::jiff::Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        let hour = Duration::from_secs(3600);
        let cases = [
            (true, None, Collect::Keep),
            (true, Some("2026-11-28T10:00:00Z"), Collect::Unmark),
            (false, None, Collect::Mark),
            (false, Some("2026-11-28T11:30:00Z"), Collect::Keep),
            (false, Some("2026-11-28T11:00:00Z"), Collect::Delete),
            (false, Some("yesterday"), Collect::Mark),
        ];
        for (referenced, mark, want) in cases {
            assert_eq!(
                collect(referenced, mark, now, hour),
                want,
                "{referenced} {mark:?}"
            );
        }
    }

    #[test]
    fn a_namespace_grace_overrides_the_default_and_zero_never_collects() {
        let hour = Some(Duration::from_secs(3600));
        let week = Some(Duration::from_secs(168 * 3600));
        assert_eq!(grace_for(None, hour), (hour, None));
        assert_eq!(grace_for(Some("168h"), hour), (week, None));
        assert_eq!(grace_for(Some("168h"), None), (week, None));
        assert_eq!(grace_for(Some("0"), hour), (None, None));
        let (grace, why) = grace_for(Some("a week"), hour);
        assert_eq!(grace, None, "unparseable: nothing is collected there");
        let why = why.expect("and it says why");
        assert!(
            why.contains("kvinject.io/gc-grace-period: `a week` is not a duration"),
            "{why}"
        );
    }

    #[test]
    fn retain_until_keeps_a_secret_until_then_and_a_bad_one_keeps_it_and_says_why() {
        let now: k8s_openapi::jiff::Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        assert_eq!(retained(Some("2026-12-01T00:00:00Z"), now), (true, None));
        assert_eq!(retained(Some("2026-11-28T11:59:59Z"), now), (false, None));
        assert_eq!(retained(None, now), (false, None));
        let (kept, why) = retained(Some("next week"), now);
        assert!(kept);
        let why = why.expect("it says why");
        assert!(
            why.contains("kvinject.io/retain-until: `next week` is not an RFC 3339 time"),
            "{why}"
        );
    }

    #[test]
    fn jitter_is_bounded_and_stable() {
        let i = Duration::from_secs(300);
        assert!(jitter("ns/a", i) < Duration::from_secs(30));
        assert_eq!(jitter("ns/a", i), jitter("ns/a", i));
    }
}
