//! What a pod becomes: a pure function from the pod and the configuration to the Secrets it
//! needs and the JSON patch, or a denial that says what is wrong and where. No I/O: the
//! materialized names are deterministic, so the patch never depends on a value.

pub mod patch;

use crate::{
    identity::WorkloadIdentity,
    reference::{self, Reference, ReferenceError},
};
use json_patch::Patch;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};

/// Pod annotation: how often the Secrets it uses are checked for a new version.
pub const REFRESH_INTERVAL_ANNOTATION: &str = "kvinject.io/refresh-interval";
/// Label on pods kvinject rewrote.
pub const INJECTED_LABEL: &str = "kvinject.io/injected";
/// Pod annotation: `"false"` leaves the pod alone.
pub const INJECT_ANNOTATION: &str = "kvinject.io/inject";
/// Pod annotation: comma-separated references to docker config JSON secrets.
pub const PULL_SECRETS_ANNOTATION: &str = "kvinject.io/image-pull-secrets";
/// Pod annotations of the service-principal form of registry credentials.
pub const PULL_REGISTRY_ANNOTATION: &str = "kvinject.io/image-pull-registry";
pub const PULL_USERNAME_ANNOTATION: &str = "kvinject.io/image-pull-username";
pub const PULL_PASSWORD_ANNOTATION: &str = "kvinject.io/image-pull-password";
/// The key of the value in a materialized env Secret.
pub const VALUE_KEY: &str = "value";

/// What the planner needs to know of the configuration.
#[derive(Clone, Debug, Default)]
pub struct InjectConfig {
    /// Vault names a reference may use.
    pub vaults: BTreeSet<String>,
    /// Keys that seal the Secrets kvinject writes (and tell them from foreign ones).
    pub keys: crate::materialize::seal::Keys,
    /// Floor of the `kvinject.io/refresh-interval` a pod may ask for.
    pub min_refresh_interval: std::time::Duration,
}

/// Where a materialized value comes from, and what kind of Secret holds it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// An env value: an Opaque Secret with the value under `value`.
    Env(Reference),
    /// A Key Vault secret holding a docker config JSON: a `kubernetes.io/dockerconfigjson` Secret.
    DockerConfig(Reference),
    /// A registry login built from a registry, a user name and a password in Key Vault.
    RegistryLogin {
        registry: String,
        username: String,
        password: Reference,
    },
}

impl Source {
    /// The Key Vault secret the value is read from.
    pub fn reference(&self) -> &Reference {
        match self {
            Source::Env(r) | Source::DockerConfig(r) => r,
            Source::RegistryLogin { password, .. } => password,
        }
    }

    /// The deterministic name of the Secret this source is materialized as, read with
    /// kvinject's identity.
    pub fn secret_name(&self) -> String {
        self.secret_name_as(None)
    }

    /// The name when read as `identity`: the identity is part of the hashed identity, so two
    /// ServiceAccounts never share a value only one of them may read.
    pub fn secret_name_as(&self, identity: Option<&WorkloadIdentity>) -> String {
        self.name_with(identity, reference::object_name)
    }

    /// Whether `name` is what this source read as `identity` is materialized as: today's
    /// name, or the one it had before the hash grew to 64 bits (such Secrets keep serving
    /// the pods that use them until they are collected).
    pub fn is_named(&self, name: &str, identity: Option<&WorkloadIdentity>) -> bool {
        self.secret_name_as(identity) == name || self.legacy_secret_name_as(identity) == name
    }

    /// The name this source had before the hash grew to 64 bits.
    pub fn legacy_secret_name_as(&self, identity: Option<&WorkloadIdentity>) -> String {
        self.name_with(identity, reference::legacy_object_name)
    }

    fn name_with(
        &self,
        identity: Option<&WorkloadIdentity>,
        object_name: fn(&str, &[&str], &str) -> String,
    ) -> String {
        let r = self.reference();
        let reader = identity
            .map(|i| format!("\n{}\n{}\n{}", i.service_account, i.client_id, i.tenant_id))
            .unwrap_or_default();
        match self {
            Source::Env(_) => object_name(
                "kvi",
                &[&r.vault, &r.name, r.field.as_deref().unwrap_or_default()],
                &format!("{r}{reader}"),
            ),
            Source::DockerConfig(_) => object_name("kvi-pull", &[&r.vault, &r.name], &format!("{r}{reader}")),
            Source::RegistryLogin {
                registry, username, ..
            } => object_name(
                "kvi-pull",
                &[registry],
                &format!("{registry}\n{username}\n{r}{reader}"),
            ),
        }
    }
}

/// A Secret the pod needs in its namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Needed {
    pub secret_name: String,
    pub source: Source,
    /// Whose Azure identity reads it; `None`: kvinject's.
    pub identity: Option<WorkloadIdentity>,
}

impl Needed {
    /// The Secret `source` is materialized as, read with kvinject's own identity.
    pub fn own_read(source: Source) -> Self {
        Needed {
            secret_name: source.secret_name(),
            source,
            identity: None,
        }
    }
}

/// The decision for one pod.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Distinct Secrets the pod refers to, sorted by name.
    pub needed: Vec<Needed>,
    /// `None` when the pod needs no change at all.
    pub patch: Option<Patch>,
    /// Admission warnings for the client that created the pod.
    pub warnings: Vec<String>,
    /// Where in the pod each needed Secret's reference is written (by Secret name), for
    /// denials that point at every place.
    pub locations: BTreeMap<String, Vec<String>>,
    /// Secrets the pod uses only as files (kubelet updates those in place: a rotation need
    /// not restart it).
    pub files_only: BTreeSet<String>,
}

/// Why a pod is denied; every variant names where the problem is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("{location}: {source}")]
    BadReference {
        location: String,
        #[source]
        source: ReferenceError,
    },
    #[error("{location}: vault `{vault}` is not configured in kvinject (configured: {known})")]
    UnknownVault {
        location: String,
        vault: String,
        known: String,
    },
    #[error("annotation `{annotation}`: {message}")]
    BadAnnotation {
        annotation: &'static str,
        message: String,
    },
    #[error("volume `{volume}`: {message}")]
    BadVolume { volume: String, message: String },
    #[error(
        "ephemeral container `{container}` env `{env}`: kvinject does not resolve akv:// references in containers added to a running pod; use a secretKeyRef to a Secret the pod's own containers use"
    )]
    EphemeralReference { container: String, env: String },
}

/// Whether `pod` carries anything kvinject would act on: an env value, a file volume or a
/// registry annotation of kvinject's (the check before letting a pod through unchanged).
pub fn carries_references(pod: &Pod) -> bool {
    let annotations = pod.metadata.annotations.iter().flatten();
    if annotations
        .map(|(k, _)| k.as_str())
        .any(|k| [PULL_SECRETS_ANNOTATION, PULL_PASSWORD_ANNOTATION].contains(&k))
    {
        return true;
    }
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let env = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.env.iter().flatten())
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .flat_map(|c| c.env.iter().flatten()),
        );
    env.filter_map(|e| e.value.as_deref())
        .any(|v| v.contains(reference::SCHEME))
        || spec
            .volumes
            .iter()
            .flatten()
            .any(|v| v.csi.as_ref().is_some_and(|c| c.driver == VOLUME_DRIVER))
}

/// `patch` with the pod also labelled as one kvinject admitted (`INJECTED_LABEL`): a pod
/// that names kvinject's Secrets itself uses them as much as one whose references were
/// rewritten, and the rotation controller (which watches labelled pods) must see it, or it
/// would collect a Secret the pod still needs.
pub fn labelled_injected(pod: &Pod, patch: Option<Patch>) -> Option<Patch> {
    let labels = pod.metadata.labels.as_ref();
    let mut ops = patch.map(|p| p.0).unwrap_or_default();
    let adds_label = ops.iter().any(|op| match op {
        json_patch::PatchOperation::Add(a) => a.path.to_string().ends_with("/kvinject.io~1injected"),
        _ => false,
    });
    if labels.and_then(|l| l.get(INJECTED_LABEL)).map(String::as_str) != Some("true") && !adds_label {
        patch::ensure_map(&mut ops, &["metadata", "labels"], labels.is_some());
        ops.push(patch::add(&["metadata", "labels", INJECTED_LABEL], "true".into()));
    }
    (!ops.is_empty()).then_some(Patch(ops))
}

/// Of `pod`, only its ephemeral containers (and who it runs as): what a
/// `pods/ephemeralcontainers` update adds.
pub fn only_ephemeral_containers(pod: &Pod) -> Pod {
    let spec = pod.spec.as_ref();
    Pod {
        metadata: pod.metadata.clone(),
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            service_account_name: spec.and_then(|s| s.service_account_name.clone()),
            ephemeral_containers: spec.and_then(|s| s.ephemeral_containers.clone()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The pod a `pods/ephemeralcontainers` update makes: the stored pod with only the sent
/// pod's ephemeral containers. The apiserver drops every other change the update carries
/// after admission, so only these are the caller's to choose.
pub fn with_ephemeral_containers_of(stored: &Pod, sent: &Pod) -> Pod {
    let mut pod = stored.clone();
    let ephemeral = sent.spec.as_ref().and_then(|s| s.ephemeral_containers.clone());
    pod.spec.get_or_insert_with(Default::default).ephemeral_containers = ephemeral;
    pod
}

/// Ephemeral containers are added to a running pod, whose spec kvinject no longer rewrites:
/// a reference there would reach the container as its literal text.
pub fn refuse_ephemeral_references(pod: &Pod) -> Result<(), Denial> {
    let containers = pod
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten());
    for c in containers {
        for env in c.env.iter().flatten() {
            if env
                .value
                .as_deref()
                .is_some_and(|v| v.contains(reference::SCHEME))
            {
                return Err(Denial::EphemeralReference {
                    container: c.name.clone(),
                    env: env.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The CSI driver name of kvinject's file volumes. No such driver is installed: a pod that
/// reaches a node unmutated (the webhook down with `failurePolicy: Ignore`) fails visibly at
/// mount instead of starting with empty files.
pub const VOLUME_DRIVER: &str = "kvinject.io";

/// `pod` as kvinject plans it in a namespace annotated with `kvinject.io/image-pull-secrets`:
/// the namespace's registry credentials join the pod's own (each once, the pod's first), as
/// if the pod carried them. Unchanged when the namespace says nothing or the pod opts out.
pub fn with_namespace_pull_secrets(
    pod: &Pod,
    namespace_annotations: &BTreeMap<String, String>,
) -> Option<Pod> {
    let from_namespace = namespace_annotations.get(PULL_SECRETS_ANNOTATION)?;
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("false") {
        return None;
    }
    let own = annotations
        .get(PULL_SECRETS_ANNOTATION)
        .map(String::as_str)
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    let merged: Vec<&str> = own
        .split(',')
        .chain(from_namespace.split(','))
        .map(str::trim)
        .filter(|r| !r.is_empty() && seen.insert(*r))
        .collect();
    let mut effective = pod.clone();
    effective
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(PULL_SECRETS_ANNOTATION.to_owned(), merged.join(","));
    Some(effective)
}

/// Plans the rewrite of `pod`. Applying the patch and planning again yields no patch.
pub fn plan(pod: &Pod, config: &InjectConfig) -> Result<Plan, Denial> {
    plan_as(pod, config, None)
}

/// `plan` for a pod whose secrets are read as `identity` (its ServiceAccount's).
pub fn plan_as(
    pod: &Pod,
    config: &InjectConfig,
    identity: Option<&WorkloadIdentity>,
) -> Result<Plan, Denial> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("false") {
        return Ok(Plan::default());
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(Plan::default());
    };
    let mut needed = BTreeMap::<String, Source>::new();
    let mut ops = Vec::new();
    let mut warnings = Vec::new();
    let mut locations = BTreeMap::<String, Vec<String>>::new();

    let groups: [(&str, &str, &[Container]); 2] = [
        (
            "initContainers",
            "init container",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("containers", "container", &spec.containers),
    ];
    for (field, what, containers) in groups {
        for (ci, container) in containers.iter().enumerate() {
            for (ei, env) in container.env.iter().flatten().enumerate() {
                let Some(value) = env.value.as_deref() else {
                    continue;
                };
                // Named only for what is reported: most env values are not references.
                let location = || format!("{what} `{}` env `{}`", container.name, env.name);
                match Reference::parse(value) {
                    None if value.contains(reference::SCHEME) => warnings.push(format!(
                        "{} contains akv:// but is not a reference (the whole value must be akv://<vault>/<secret>[/<version>][#<field>]); left unchanged",
                        location()
                    )),
                    None => {}
                    Some(parsed) => {
                        let location = location();
                        let r = parsed.map_err(|source| Denial::BadReference { location: location.clone(), source })?;
                        check_vault(&r, &location, config)?;
                        let source = Source::Env(r);
                        let secret_name = source.secret_name_as(identity);
                        let (ci, ei) = (ci.to_string(), ei.to_string());
                        ops.push(patch::replace(
                            &["spec", field, &ci, "env", &ei],
                            json!({"name": env.name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": VALUE_KEY}}}),
                        ));
                        locations.entry(secret_name.clone()).or_default().push(location);
                        needed.insert(secret_name, source);
                    }
                }
            }
        }
    }

    // File volumes: `csi: {driver: kvinject.io, volumeAttributes: {<file>: akv://...}}`
    // becomes a projected volume over the materialized Secrets, mounted where it was.
    let mut in_files = BTreeSet::new();
    for (vi, volume) in spec.volumes.iter().flatten().enumerate() {
        let Some(csi) = volume.csi.as_ref().filter(|c| c.driver == VOLUME_DRIVER) else {
            continue;
        };
        let bad = |message: String| Denial::BadVolume {
            volume: volume.name.clone(),
            message,
        };
        let files = csi.volume_attributes.clone().unwrap_or_default();
        if files.is_empty() {
            return Err(bad(
                "names no file: set volumeAttributes to `<file name>: akv://<vault>/<secret>`".into(),
            ));
        }
        let mut sources = Vec::new();
        for (file, value) in &files {
            if file.is_empty()
                || file.len() > 253
                || file == "."
                || file == ".."
                || !file
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(bad(format!(
                    "`{file}` is not a file name (letters, digits, '.', '_' and '-')"
                )));
            }
            let location = format!("volume `{}` file `{file}`", volume.name);
            let r = match Reference::parse(value) {
                Some(parsed) => parsed.map_err(|source| Denial::BadReference {
                    location: location.clone(),
                    source,
                })?,
                None => {
                    return Err(bad(format!(
                        "file `{file}`: the value must be an akv:// reference, never the secret itself"
                    )));
                }
            };
            check_vault(&r, &location, config)?;
            let source = Source::Env(r);
            let secret_name = source.secret_name_as(identity);
            sources
                .push(json!({"secret": {"name": secret_name, "items": [{"key": VALUE_KEY, "path": file}]}}));
            locations.entry(secret_name.clone()).or_default().push(location);
            in_files.insert(secret_name.clone());
            needed.insert(secret_name, source);
        }
        // kubelet never updates a subPath mount: refuse it rather than let rotations miss.
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            if c.volume_mounts.iter().flatten().any(|m| {
                m.name == volume.name
                    && [&m.sub_path, &m.sub_path_expr]
                        .into_iter()
                        .any(|p| p.as_deref().is_some_and(|p| !p.is_empty()))
            }) {
                return Err(bad(format!(
                    "container `{}` mounts it with subPath or subPathExpr, which kubelet never updates on rotation: mount the whole volume",
                    c.name
                )));
            }
        }
        let vi = vi.to_string();
        ops.push(patch::replace(
            &["spec", "volumes", &vi],
            json!({"name": volume.name, "projected": {"sources": sources}}),
        ));
    }

    let pull = pull_sources(&annotations, config)?;
    if !pull.is_empty() {
        let mut seen: BTreeSet<String> = spec
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|r| r.name.clone())
            .collect();
        // in annotation order, each name once
        let missing: Vec<String> = pull
            .iter()
            .map(|s| s.secret_name_as(identity))
            .filter(|n| seen.insert(n.clone()))
            .collect();
        if !missing.is_empty() {
            patch::ensure_array(
                &mut ops,
                &["spec", "imagePullSecrets"],
                spec.image_pull_secrets.is_some(),
            );
            for name in missing {
                ops.push(patch::add(
                    &["spec", "imagePullSecrets", "-"],
                    json!({"name": name}),
                ));
            }
        }
        for source in pull {
            let annotation = match source {
                Source::RegistryLogin { .. } => PULL_PASSWORD_ANNOTATION,
                _ => PULL_SECRETS_ANNOTATION,
            };
            locations
                .entry(source.secret_name_as(identity))
                .or_default()
                .push(format!("annotation `{annotation}`"));
            needed.insert(source.secret_name_as(identity), source);
        }
    }

    if !needed.is_empty() {
        warnings.extend(refresh_floor_warning(&annotations, config.min_refresh_interval));
    }
    let labels = pod.metadata.labels.as_ref();
    if !needed.is_empty() && labels.and_then(|l| l.get(INJECTED_LABEL)).map(String::as_str) != Some("true") {
        patch::ensure_map(&mut ops, &["metadata", "labels"], labels.is_some());
        ops.push(patch::add(&["metadata", "labels", INJECTED_LABEL], "true".into()));
    }
    Ok(Plan {
        needed: needed
            .into_iter()
            .map(|(secret_name, source)| Needed {
                secret_name,
                source,
                identity: identity.cloned(),
            })
            .collect(),
        patch: (!ops.is_empty()).then_some(Patch(ops)),
        warnings,
        files_only: in_files
            .into_iter()
            .filter(|name| {
                locations
                    .get(name)
                    .is_some_and(|places| places.iter().all(|p| p.starts_with("volume ")))
            })
            .collect(),
        locations,
    })
}

/// A pod asking for checks more often than the floor (one tenant must not be able to make
/// kvinject hammer Key Vault) is told what it gets instead.
fn refresh_floor_warning(
    annotations: &BTreeMap<String, String>,
    floor: std::time::Duration,
) -> Option<String> {
    use REFRESH_INTERVAL_ANNOTATION as KEY;
    let asked = annotations.get(KEY)?;
    match crate::duration::parse_duration(asked) {
        Err(e) => Some(format!("annotation `{KEY}`: {e}; the default interval applies")),
        Ok(d) if d < floor => Some(format!(
            "annotation `{KEY}`: {asked} is below the floor of {floor:?} (--min-refresh-interval); the Secrets are checked every {floor:?}"
        )),
        Ok(_) => None,
    }
}

fn check_vault(r: &Reference, location: &str, config: &InjectConfig) -> Result<(), Denial> {
    if config.vaults.contains(&r.vault) {
        return Ok(());
    }
    Err(Denial::UnknownVault {
        location: location.to_owned(),
        vault: r.vault.clone(),
        known: config.vaults.iter().cloned().collect::<Vec<_>>().join(", "),
    })
}

/// The registry credentials a pod asks for through its annotations.
fn pull_sources(
    annotations: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<Vec<Source>, Denial> {
    let mut sources = Vec::new();
    if let Some(list) = annotations.get(PULL_SECRETS_ANNOTATION) {
        let refs = reference::parse_list(list).map_err(|e| Denial::BadAnnotation {
            annotation: PULL_SECRETS_ANNOTATION,
            message: e.to_string(),
        })?;
        if refs.is_empty() {
            return Err(Denial::BadAnnotation {
                annotation: PULL_SECRETS_ANNOTATION,
                message: "names no akv:// reference".into(),
            });
        }
        for r in refs {
            check_vault(&r, &format!("annotation `{PULL_SECRETS_ANNOTATION}`"), config)?;
            sources.push(Source::DockerConfig(r));
        }
    }
    let sp = [
        PULL_REGISTRY_ANNOTATION,
        PULL_USERNAME_ANNOTATION,
        PULL_PASSWORD_ANNOTATION,
    ]
    .map(|k| annotations.get(k));
    match sp {
        [None, None, None] => {}
        [Some(registry), Some(username), Some(password)] => {
            let bad = |annotation, message: String| Denial::BadAnnotation { annotation, message };
            if registry.trim().is_empty() || registry.contains(['/', ' ', '"']) {
                return Err(bad(
                    PULL_REGISTRY_ANNOTATION,
                    format!("`{registry}` is not a registry host name"),
                ));
            }
            if username.trim().is_empty() {
                return Err(bad(PULL_USERNAME_ANNOTATION, "is empty".into()));
            }
            let password = match Reference::parse(password) {
                Some(Ok(r)) => r,
                Some(Err(e)) => return Err(bad(PULL_PASSWORD_ANNOTATION, e.to_string())),
                None => {
                    return Err(bad(
                        PULL_PASSWORD_ANNOTATION,
                        "must be an akv:// reference, never the password itself".into(),
                    ));
                }
            };
            check_vault(
                &password,
                &format!("annotation `{PULL_PASSWORD_ANNOTATION}`"),
                config,
            )?;
            sources.push(Source::RegistryLogin {
                registry: registry.trim().to_owned(),
                username: username.trim().to_owned(),
                password,
            });
        }
        _ => {
            return Err(Denial::BadAnnotation {
                annotation: PULL_REGISTRY_ANNOTATION,
                message: format!(
                    "{PULL_REGISTRY_ANNOTATION}, {PULL_USERNAME_ANNOTATION} and {PULL_PASSWORD_ANNOTATION} go together; set all three"
                ),
            });
        }
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn config() -> InjectConfig {
        InjectConfig {
            vaults: ["main".to_string(), "other".to_string()].into(),
            ..Default::default()
        }
    }

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn apply(p: &Pod, plan: &Plan) -> Value {
        let mut doc = serde_json::to_value(p).unwrap();
        if let Some(patch) = &plan.patch {
            json_patch::patch(&mut doc, patch).unwrap();
        }
        doc
    }

    fn name(source: Source) -> String {
        source.secret_name()
    }

    fn env_ref(v: &str, n: &str) -> Source {
        Source::Env(Reference {
            vault: v.into(),
            name: n.into(),
            version: None,
            field: None,
        })
    }

    #[test]
    fn a_pod_naming_kvinjects_secrets_itself_is_labelled_once() {
        let bare = pod(json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c"}]}}));
        let labelled = apply(
            &bare,
            &Plan {
                patch: labelled_injected(&bare, None),
                ..Default::default()
            },
        );
        assert_eq!(labelled["metadata"]["labels"][INJECTED_LABEL], "true");
        // Already labelled, or labelled by the plan's own patch: nothing more.
        let already = pod(json!({"metadata": {"name": "a", "labels": {INJECTED_LABEL: "true"}}}));
        assert_eq!(labelled_injected(&already, None), None);
        let with_refs = pod(json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c", "env": [{"name": "X", "value": "akv://main/db"}]}]}
        }));
        let plan = plan(&with_refs, &config()).unwrap();
        let ops = plan.patch.clone().unwrap().0.len();
        assert_eq!(labelled_injected(&with_refs, plan.patch).unwrap().0.len(), ops);
    }

    #[test]
    fn an_ephemeral_update_is_the_stored_pod_with_only_the_sent_ephemeral_containers() {
        let stored = pod(json!({
            "metadata": {"name": "a"},
            "spec": {"serviceAccountName": "web", "containers": [{"name": "app"}]}
        }));
        let sent = pod(json!({
            "metadata": {"name": "a", "annotations": {"kubernetes.io/config.mirror": "x"}},
            "spec": {
                "serviceAccountName": "payment",
                "containers": [{"name": "app"}],
                "ephemeralContainers": [{"name": "debug"}]
            }
        }));
        let judged = with_ephemeral_containers_of(&stored, &sent);
        assert_eq!(judged.metadata.annotations, None);
        let spec = judged.spec.unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        let names: Vec<_> = spec
            .ephemeral_containers
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["debug"]);
    }

    #[test]
    fn rewrites_env_references_in_containers_and_init_containers() {
        let p = pod(json!({
            "metadata": {"name": "a", "labels": {"app": "x"}},
            "spec": {
                "initContainers": [{"name": "init", "env": [{"name": "DB", "value": "akv://main/db"}]}],
                "containers": [{"name": "app", "env": [
                    {"name": "PLAIN", "value": "hello"},
                    {"name": "DB", "value": "akv://main/db"},
                    {"name": "API", "value": "akv://other/api-key"},
                    {"name": "URL", "value": "postgres://u:$(DB)@h/db"}
                ]}]
            }
        }));
        let plan = plan(&p, &config()).unwrap();
        let db = name(env_ref("main", "db"));
        let api = name(env_ref("other", "api-key"));
        let secret_ref =
            |n: &str, s: &str| json!({"name": n, "valueFrom": {"secretKeyRef": {"name": s, "key": "value"}}});
        let want = json!({
            "metadata": {"name": "a", "labels": {"app": "x", "kvinject.io/injected": "true"}},
            "spec": {
                "initContainers": [{"name": "init", "env": [secret_ref("DB", &db)]}],
                "containers": [{"name": "app", "env": [
                    {"name": "PLAIN", "value": "hello"},
                    secret_ref("DB", &db),
                    secret_ref("API", &api),
                    {"name": "URL", "value": "postgres://u:$(DB)@h/db"}
                ]}]
            }
        });
        let got = apply(&p, &plan);
        assert_eq!(pod(got.clone()), pod(want));
        // one Secret per distinct reference, shared by both containers
        let mut names: Vec<_> = plan.needed.iter().map(|n| n.secret_name.clone()).collect();
        names.sort();
        let mut want_names = vec![db, api];
        want_names.sort();
        assert_eq!(names, want_names);
        assert!(plan.warnings.is_empty());
        // mutating again is a no-op
        assert_eq!(super::plan(&pod(got), &config()).unwrap(), Plan::default());
    }

    #[test]
    fn a_pod_without_references_gets_no_patch() {
        let p = pod(
            json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c", "env": [{"name": "X", "value": "y"}]}]}}),
        );
        assert_eq!(plan(&p, &config()).unwrap(), Plan::default());
        let p = pod(json!({"metadata": {"name": "a"}}));
        assert_eq!(plan(&p, &config()).unwrap(), Plan::default());
    }

    #[test]
    fn opt_out_annotation_leaves_the_pod_alone() {
        let p = pod(
            json!({"metadata": {"annotations": {"kvinject.io/inject": "false"}}, "spec": {"containers": [{"name": "c", "env": [{"name": "X", "value": "akv://main/db"}]}]}}),
        );
        assert_eq!(plan(&p, &config()).unwrap(), Plan::default());
    }

    #[test]
    fn embedded_scheme_is_left_alone_with_a_warning() {
        let p = pod(
            json!({"spec": {"containers": [{"name": "c", "env": [{"name": "X", "value": "see akv://main/db"}]}]}}),
        );
        let plan = plan(&p, &config()).unwrap();
        assert_eq!(plan.patch, None);
        assert_eq!(plan.warnings.len(), 1);
        assert!(
            plan.warnings[0].contains("container `c` env `X`"),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn denials_name_the_place_and_the_problem() {
        let env = |v: &str| {
            pod(json!({"spec": {"containers": [{"name": "web", "env": [{"name": "DB", "value": v}]}]}}))
        };
        let cases = [
            (
                env("akv://main/db_pw"),
                "container `web` env `DB`: secret name `db_pw` must be 1 to 127 characters",
            ),
            (
                env("akv://main"),
                "container `web` env `DB`: `akv://main` has no secret name",
            ),
            (
                env("akv://nope/db"),
                "container `web` env `DB`: vault `nope` is not configured in kvinject (configured: main, other)",
            ),
            (
                pod(
                    json!({"metadata": {"annotations": {"kvinject.io/image-pull-secrets": "akv://nope/x"}}, "spec": {"containers": []}}),
                ),
                "annotation `kvinject.io/image-pull-secrets`: vault `nope` is not configured",
            ),
            (
                pod(
                    json!({"metadata": {"annotations": {"kvinject.io/image-pull-secrets": "registry-creds"}}, "spec": {"containers": []}}),
                ),
                "annotation `kvinject.io/image-pull-secrets`: `registry-creds` has no vault",
            ),
            (
                pod(
                    json!({"metadata": {"annotations": {"kvinject.io/image-pull-registry": "r.example"}}, "spec": {"containers": []}}),
                ),
                "go together; set all three",
            ),
            (
                pod(json!({"metadata": {"annotations": {
                    "kvinject.io/image-pull-registry": "r.example", "kvinject.io/image-pull-username": "u",
                    "kvinject.io/image-pull-password": "hunter2"}}, "spec": {"containers": []}})),
                "annotation `kvinject.io/image-pull-password`: must be an akv:// reference",
            ),
        ];
        for (p, want) in cases {
            let err = plan(&p, &config()).expect_err(want).to_string();
            assert!(err.contains(want), "got {err:?}, want it to contain {want:?}");
            assert!(
                !err.contains("hunter2"),
                "a denial must not echo a password: {err}"
            );
        }
    }

    #[test]
    fn pull_secrets_are_appended_without_duplicates() {
        let creds = Source::DockerConfig(Reference {
            vault: "main".into(),
            name: "acr".into(),
            version: None,
            field: None,
        });
        let login = Source::RegistryLogin {
            registry: "r.example".into(),
            username: "app-id".into(),
            password: Reference {
                vault: "main".into(),
                name: "sp-secret".into(),
                version: None,
                field: None,
            },
        };
        let p = pod(json!({
            "metadata": {"annotations": {
                "kvinject.io/image-pull-secrets": "akv://main/acr",
                "kvinject.io/image-pull-registry": "r.example",
                "kvinject.io/image-pull-username": "app-id",
                "kvinject.io/image-pull-password": "akv://main/sp-secret"
            }},
            "spec": {"containers": [{"name": "c"}], "imagePullSecrets": [{"name": "existing"}, {"name": name(creds.clone())}]}
        }));
        let plan = plan(&p, &config()).unwrap();
        let got = apply(&p, &plan);
        assert_eq!(
            got["spec"]["imagePullSecrets"],
            json!([{"name": "existing"}, {"name": name(creds.clone())}, {"name": name(login.clone())}])
        );
        assert_eq!(got["metadata"]["labels"], json!({"kvinject.io/injected": "true"}));
        let sources: Vec<_> = plan.needed.iter().map(|n| n.source.clone()).collect();
        assert!(
            sources.contains(&creds) && sources.contains(&login),
            "{sources:?}"
        );
        assert_eq!(
            super::plan(&pod(got), &config()).unwrap().patch,
            None,
            "second admission is a no-op"
        );
    }

    #[test]
    fn a_namespace_gives_its_registry_credentials_to_every_pod_once() {
        let ns = BTreeMap::from([(
            PULL_SECRETS_ANNOTATION.to_owned(),
            "akv://main/acr, akv://other/acr".to_owned(),
        )]);
        let bare = pod(json!({"spec": {"containers": [{"name": "c"}]}}));
        let got = apply(
            &bare,
            &plan(&with_namespace_pull_secrets(&bare, &ns).unwrap(), &config()).unwrap(),
        );
        assert_eq!(got["spec"]["imagePullSecrets"].as_array().unwrap().len(), 2);
        let own = pod(
            json!({"metadata": {"annotations": {PULL_SECRETS_ANNOTATION: "akv://other/acr,akv://main/mine"}},
                             "spec": {"containers": [{"name": "c"}]}}),
        );
        let merged = with_namespace_pull_secrets(&own, &ns).unwrap();
        assert_eq!(
            merged.metadata.annotations.unwrap()[PULL_SECRETS_ANNOTATION],
            "akv://other/acr,akv://main/mine,akv://main/acr",
            "the pod's first, each once"
        );
        let out = pod(
            json!({"metadata": {"annotations": {INJECT_ANNOTATION: "false"}}, "spec": {"containers": []}}),
        );
        assert!(
            with_namespace_pull_secrets(&out, &ns).is_none(),
            "a pod that opts out stays out"
        );
        assert!(with_namespace_pull_secrets(&bare, &BTreeMap::new()).is_none());
    }

    #[test]
    fn file_volumes_become_projected_volumes_over_the_materialized_secrets() {
        let p = pod(json!({"spec": {
            "volumes": [{"name": "other", "emptyDir": {}},
                        {"name": "creds", "csi": {"driver": "kvinject.io", "volumeAttributes": {"db-password": "akv://main/db", "config.json": "akv://main/cfg#app"}}}],
            "containers": [{"name": "c", "volumeMounts": [{"name": "creds", "mountPath": "/etc/creds"}],
                            "env": [{"name": "DB", "value": "akv://main/db"}]}]}}));
        let plan = plan(&p, &config()).unwrap();
        let got = apply(&p, &plan);
        let db = name(env_ref("main", "db"));
        let cfg = Source::Env(Reference {
            field: Some("app".into()),
            ..env_ref("main", "cfg").reference().clone()
        })
        .secret_name();
        assert_eq!(
            got["spec"]["volumes"][1],
            json!({"name": "creds", "projected": {"sources": [
            {"secret": {"name": cfg, "items": [{"key": "value", "path": "config.json"}]}},
            {"secret": {"name": db, "items": [{"key": "value", "path": "db-password"}]}}]}})
        );
        assert_eq!(
            got["spec"]["volumes"][0],
            json!({"name": "other", "emptyDir": {}}),
            "other volumes stay"
        );
        assert_eq!(
            got["spec"]["containers"][0]["volumeMounts"],
            json!([{"name": "creds", "mountPath": "/etc/creds"}])
        );
        assert_eq!(
            plan.files_only,
            BTreeSet::from([cfg.clone()]),
            "db is used as env too"
        );
        assert_eq!(
            plan.locations[&cfg],
            vec!["volume `creds` file `config.json`".to_owned()]
        );
        assert_eq!(
            super::plan(&pod(got), &config()).unwrap().patch,
            None,
            "mutating again is a no-op"
        );
    }

    #[test]
    fn bad_file_volumes_are_denied_naming_the_volume() {
        let with = |attributes: Value, mount: Value| {
            pod(
                json!({"spec": {"volumes": [{"name": "creds", "csi": {"driver": "kvinject.io", "volumeAttributes": attributes}}],
                                "containers": [{"name": "c", "volumeMounts": [mount]}]}}),
            )
        };
        let mount = json!({"name": "creds", "mountPath": "/x"});
        let cases = [
            (json!({}), mount.clone(), "volume `creds`: names no file"),
            (
                json!({"../etc/passwd": "akv://main/db"}),
                mount.clone(),
                "volume `creds`: `../etc/passwd` is not a file name",
            ),
            (
                json!({"pw": "hunter2"}),
                mount.clone(),
                "volume `creds`: file `pw`: the value must be an akv:// reference",
            ),
            (
                json!({"pw": "akv://nope/db"}),
                mount.clone(),
                "volume `creds` file `pw`: vault `nope` is not configured",
            ),
            (
                json!({"pw": "akv://main/db"}),
                json!({"name": "creds", "mountPath": "/x/pw", "subPath": "pw"}),
                "volume `creds`: container `c` mounts it with subPath",
            ),
            (
                json!({"pw": "akv://main/db"}),
                json!({"name": "creds", "mountPath": "/x/pw", "subPathExpr": "$(POD_NAME)"}),
                "volume `creds`: container `c` mounts it with subPath or subPathExpr",
            ),
        ];
        for (attributes, mount, want) in cases {
            let err = plan(&with(attributes, mount), &config()).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
            assert!(!err.contains("hunter2"), "{err}");
        }
        let foreign = pod(
            json!({"spec": {"volumes": [{"name": "v", "csi": {"driver": "secrets-store.csi.k8s.io"}}], "containers": []}}),
        );
        assert_eq!(
            plan(&foreign, &config()).unwrap(),
            Plan::default(),
            "other CSI drivers are left alone"
        );
    }

    #[test]
    fn pull_secrets_create_the_list_when_missing() {
        let p = pod(
            json!({"metadata": {"annotations": {"kvinject.io/image-pull-secrets": "akv://main/acr,akv://other/acr"}}, "spec": {"containers": [{"name": "c"}]}}),
        );
        let got = apply(&p, &plan(&p, &config()).unwrap());
        assert_eq!(got["spec"]["imagePullSecrets"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_refresh_interval_below_the_floor_gets_a_warning() {
        let config = InjectConfig {
            min_refresh_interval: std::time::Duration::from_secs(30),
            ..config()
        };
        let with = |interval: &str| {
            pod(
                json!({"metadata": {"annotations": {"kvinject.io/refresh-interval": interval}},
                       "spec": {"containers": [{"name": "c", "env": [{"name": "X", "value": "akv://main/db"}]}]}}),
            )
        };
        let warned = plan(&with("1ms"), &config).unwrap().warnings;
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("1ms is below the floor of 30s"), "{warned:?}");
        assert!(plan(&with("45s"), &config).unwrap().warnings.is_empty());
        assert!(plan(&with("soon"), &config).unwrap().warnings[0].contains("`soon` is not a duration"));
    }

    #[test]
    fn pinned_and_unpinned_references_are_different_secrets() {
        let v = "0123456789abcdef0123456789abcdef";
        let a = env_ref("main", "db");
        let b = Source::Env(Reference {
            vault: "main".into(),
            name: "db".into(),
            version: Some(v.into()),
            field: None,
        });
        assert_ne!(a.secret_name(), b.secret_name());
        assert_ne!(
            a.secret_name(),
            Source::DockerConfig(a.reference().clone()).secret_name()
        );
    }
}
