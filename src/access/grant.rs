//! The access decision, pure: which AccessPolicy, if any, grants a reference to a
//! namespace, a ServiceAccount and a use. Policies are compiled once into an index by
//! vault and namespace, so an admission looks at the few policies that can apply, however
//! many the cluster holds.

use super::policy::{AccessPolicy, AccessPolicySpec, Use};
use crate::{
    mutate::{Plan, Source},
    reference::Reference,
};
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::LabelSelector};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// The ServiceAccount a pod runs as when its spec names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Who asks: the pod's namespace (with its labels) and ServiceAccount.
#[derive(Clone, Debug)]
pub struct Subject<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub service_account: &'a str,
}

/// A whole-name pattern: `*` matches any run of characters (none included); everything else
/// matches itself, ignoring ASCII case (Key Vault names are case-insensitive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(pattern: &str) -> Self {
        Pattern(pattern.to_ascii_lowercase())
    }

    /// Anchored at both ends: `team-a-*` does not match `xteam-a-db`, and `team-a` does
    /// not match `team-a-evil`.
    pub fn matches(&self, name: &str) -> bool {
        let (p, n) = (self.0.as_bytes(), name.as_bytes());
        // Iterative glob with one backtrack point: linear in practice, never exponential.
        let (mut pi, mut ni) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ni < n.len() {
            if pi < p.len() && p[pi] == b'*' {
                star = Some((pi, ni));
                pi += 1;
            } else if pi < p.len() && p[pi] == n[ni].to_ascii_lowercase() {
                pi += 1;
                ni += 1;
            } else if let Some((sp, sn)) = star {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

/// Whether `selector` selects an object with `labels`, as the apiserver decides it. An
/// operator it does not know selects nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    by_labels
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// One policy, ready to match.
#[derive(Debug)]
struct Compiled {
    name: String,
    secrets: Vec<Pattern>,
    selector: Option<LabelSelector>,
    service_accounts: Option<BTreeSet<String>>,
    uses: BTreeSet<Use>,
}

impl Compiled {
    fn new(name: &str, spec: &AccessPolicySpec) -> Self {
        Compiled {
            name: name.to_owned(),
            secrets: spec.secrets.iter().map(|p| Pattern::new(p)).collect(),
            selector: spec.namespaces.selector.clone(),
            service_accounts: spec
                .service_accounts
                .as_ref()
                .map(|s| s.iter().cloned().collect()),
            uses: spec.uses().into_iter().collect(),
        }
    }

    fn covers_secret(&self, name: &str) -> bool {
        self.secrets.iter().any(|p| p.matches(name))
    }
}

/// What one vault's policies grant, by the namespaces they name. Selector policies are
/// filed under one of their `matchLabels` pairs when they have one, so an admission looks
/// only at those its namespace's labels could satisfy.
#[derive(Debug, Default)]
struct VaultGrants {
    by_name: HashMap<String, Vec<Arc<Compiled>>>,
    /// label key -> label value -> policies whose selector requires that pair.
    by_label: HashMap<String, HashMap<String, Vec<Arc<Compiled>>>>,
    /// Selectors with expressions only (or `{}`): checked for every namespace.
    by_other_selector: Vec<Arc<Compiled>>,
}

impl VaultGrants {
    fn insert(&mut self, policy: Arc<Compiled>, names: &[String]) {
        for ns in names {
            self.by_name.entry(ns.clone()).or_default().push(policy.clone());
        }
        let Some(selector) = &policy.selector else { return };
        match selector.match_labels.as_ref().and_then(|l| l.iter().next()) {
            Some((k, v)) => {
                let (k, v) = (k.clone(), v.clone());
                self.by_label
                    .entry(k)
                    .or_default()
                    .entry(v)
                    .or_default()
                    .push(policy);
            }
            None => self.by_other_selector.push(policy),
        }
    }

    /// The policies that apply to `subject`'s namespace, by name or by selector.
    fn for_namespace<'a>(&'a self, subject: &'a Subject<'_>) -> impl Iterator<Item = &'a Arc<Compiled>> + 'a {
        let named = self.by_name.get(subject.namespace).into_iter().flatten();
        let labelled = subject
            .labels
            .iter()
            .filter_map(|(k, v)| self.by_label.get(k)?.get(v))
            .flatten()
            .chain(&self.by_other_selector)
            .filter(|c| {
                c.selector
                    .as_ref()
                    .is_some_and(|s| selector_matches(s, subject.labels))
            });
        named.chain(labelled)
    }
}

/// Every policy, indexed by vault, then by namespace name (or selector).
#[derive(Debug, Default)]
pub struct Index {
    vaults: HashMap<String, VaultGrants>,
    policies: usize,
}

/// Why nothing grants a reference, with what came closest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotGranted {
    /// Policies that grant the secret to the namespace, and why each did not apply.
    pub near_misses: Vec<NearMiss>,
}

/// A policy that covers the secret and the namespace, and why it did not apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearMiss {
    pub policy: String,
    /// Its ServiceAccounts, when the pod's is not among them.
    pub service_accounts: Option<Vec<String>>,
    /// Its uses, when the pod's is not among them.
    pub uses: Option<Vec<String>>,
}

impl NearMiss {
    /// All of it, for the platform (`kvinject access check`).
    fn detail(&self) -> String {
        let mut why = Vec::new();
        if let Some(names) = &self.service_accounts {
            why.push(format!("only to ServiceAccounts {}", names.join(", ")));
        }
        if let Some(uses) = &self.uses {
            why.push(format!("only for {}", uses.join(", ")));
        }
        format!("AccessPolicy {} grants it {}", self.policy, why.join(" and "))
    }
}

impl Index {
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a AccessPolicy>) -> Self {
        let mut index = Index::default();
        for policy in policies {
            let name = policy.metadata.name.clone().unwrap_or_default();
            let compiled = Arc::new(Compiled::new(&name, &policy.spec));
            let names = policy.spec.namespaces.names.as_deref().unwrap_or_default();
            index
                .vaults
                .entry(policy.spec.vault.clone())
                .or_default()
                .insert(compiled, names);
            index.policies += 1;
        }
        index
    }

    /// How many policies the index holds.
    pub fn len(&self) -> usize {
        self.policies
    }

    pub fn is_empty(&self) -> bool {
        self.policies == 0
    }

    /// The name of the policy that grants `reference` for `use_` to `subject` (the first by
    /// name when several do), or what came closest.
    pub fn check(
        &self,
        subject: &Subject<'_>,
        reference: &Reference,
        use_: Use,
    ) -> Result<String, NotGranted> {
        let mut granted: Option<&str> = None;
        let mut near_misses = BTreeMap::new();
        if let Some(vault) = self.vaults.get(&reference.vault) {
            for policy in vault
                .for_namespace(subject)
                .filter(|c| c.covers_secret(&reference.name))
            {
                let sa_ok = policy
                    .service_accounts
                    .as_ref()
                    .is_none_or(|s| s.contains(subject.service_account));
                let use_ok = policy.uses.contains(&use_);
                if sa_ok && use_ok {
                    granted = Some(granted.map_or(policy.name.as_str(), |g| g.min(policy.name.as_str())));
                } else {
                    near_misses.insert(policy.name.clone(), miss(policy, sa_ok, use_ok));
                }
            }
        }
        match granted {
            Some(name) => Ok(name.to_owned()),
            None => Err(NotGranted {
                near_misses: near_misses.into_values().collect(),
            }),
        }
    }

    /// Whether some policy grants `reference` for `use_` in `namespace` to any of its
    /// ServiceAccounts: what keeps a materialized Secret followed.
    pub fn grants_namespace(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        reference: &Reference,
        use_: Use,
    ) -> bool {
        let subject = Subject {
            namespace,
            labels,
            service_account: "",
        };
        self.vaults.get(&reference.vault).is_some_and(|vault| {
            vault
                .for_namespace(&subject)
                .any(|p| p.uses.contains(&use_) && p.covers_secret(&reference.name))
        })
    }
}

fn miss(policy: &Compiled, sa_ok: bool, use_ok: bool) -> NearMiss {
    NearMiss {
        policy: policy.name.clone(),
        service_accounts: (!sa_ok).then(|| policy.service_accounts.iter().flatten().cloned().collect()),
        uses: (!use_ok).then(|| policy.uses.iter().map(|u| u.as_str().to_owned()).collect()),
    }
}

/// The ServiceAccount a pod runs as.
pub fn service_account_of(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
}

/// What a materialized source is used for.
pub fn use_of(source: &Source) -> Use {
    match source {
        Source::Env(_) => Use::Env,
        Source::DockerConfig(_) | Source::RegistryLogin { .. } => Use::ImagePull,
    }
}

/// A reference that no policy grants to a namespace, ServiceAccount and use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{reference} is not granted to ServiceAccount `{service_account}` in namespace `{namespace}`: no AccessPolicy grants it for {}{}",
    use_.as_str(),
    hints(near_misses, false)
)]
pub struct NotGrantedTo {
    pub reference: String,
    pub namespace: String,
    pub service_account: String,
    pub use_: Use,
    /// Policies that grant the secret to the namespace, and why each did not apply.
    pub near_misses: Vec<NearMiss>,
}

impl NotGrantedTo {
    /// The denial with every policy that came close named, for the platform: the one a pod
    /// gets names neither the policies that grant the secret to other ServiceAccounts nor
    /// those ServiceAccounts (which would say whose pods to impersonate).
    pub fn detail(&self) -> String {
        format!(
            "{} is not granted to ServiceAccount `{}` in namespace `{}`: no AccessPolicy grants it for {}{}",
            self.reference,
            self.service_account,
            self.namespace,
            self.use_.as_str(),
            hints(&self.near_misses, true)
        )
    }
}

/// A pod denied: every reference nothing grants, each with the places in the pod that use
/// it, so one denial shows all there is to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.0.iter().map(|(locations, why)| format!("{locations}: {why}")).collect::<Vec<_>>().join("; "))]
pub struct AccessDenied(pub Vec<(String, NotGrantedTo)>);

fn hints(near_misses: &[NearMiss], detail: bool) -> String {
    let mut hints: Vec<String> = Vec::new();
    let mut others = false;
    for miss in near_misses {
        if detail || miss.service_accounts.is_none() {
            hints.push(miss.detail());
        } else {
            others = true;
        }
    }
    if others {
        hints.push(
            "it is granted in this namespace to other ServiceAccounts only; the platform team can see which with `kvinject access check`"
                .to_owned(),
        );
    }
    if hints.is_empty() {
        String::new()
    } else {
        format!(" ({})", hints.join("; "))
    }
}

impl Index {
    /// `check` for one reference, with the full reason when nothing grants it.
    pub fn decide(
        &self,
        subject: &Subject<'_>,
        reference: &Reference,
        use_: Use,
    ) -> Result<String, NotGrantedTo> {
        self.check(subject, reference, use_)
            .map_err(|NotGranted { near_misses }| NotGrantedTo {
                reference: reference.to_string(),
                namespace: subject.namespace.to_owned(),
                service_account: subject.service_account.to_owned(),
                use_,
                near_misses,
            })
    }
}

/// Checks every Secret a plan needs; denied when any reference is not granted.
pub fn check_plan(index: &Index, subject: &Subject<'_>, plan: &Plan) -> Result<(), AccessDenied> {
    let denied: Vec<(String, NotGrantedTo)> = plan
        .needed
        .iter()
        .filter_map(|needed| {
            let why = index
                .decide(subject, needed.source.reference(), use_of(&needed.source))
                .err()?;
            let locations = plan
                .locations
                .get(&needed.secret_name)
                .map(|l| l.join(", "))
                .unwrap_or_default();
            Some((locations, why))
        })
        .collect();
    if denied.is_empty() {
        Ok(())
    } else {
        Err(AccessDenied(denied))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::{self, InjectConfig};
    use serde_json::json;

    fn policy(name: &str, spec: serde_json::Value) -> AccessPolicy {
        AccessPolicy::new(name, serde_json::from_value(spec).unwrap())
    }

    fn r(vault: &str, name: &str) -> Reference {
        Reference {
            vault: vault.into(),
            name: name.into(),
            version: None,
            field: None,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn patterns_are_anchored_case_insensitive_and_wild_only_where_written() {
        let cases = [
            ("team-a-*", "team-a-db", true),
            ("team-a-*", "TEAM-A-DB", true),
            ("Team-A-*", "team-a-db", true),
            ("team-a-*", "team-a-", true),
            ("team-a-*", "xteam-a-db", false),
            ("team-a-*", "team-b-db", false),
            ("team-a", "team-a", true),
            ("team-a", "team-a-evil", false),
            ("team-a", "evil-team-a", false),
            ("team-a", "team-", false),
            ("*-db", "team-a-db", true),
            ("*-db", "team-a-db2", false),
            ("a*b*c", "a-x-b-y-c", true),
            ("a*b*c", "a-x-c-y-b", false),
            ("*", "anything-at-all", true),
            ("db", "d", false),
            ("*a*a*a*a*a*b", &"a".repeat(120), false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(Pattern::new(pattern).matches(name), want, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn selectors_match_like_the_apiserver() {
        let sel = |v: serde_json::Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
        let l = labels(&[("team", "a"), ("tier", "prod")]);
        let cases = [
            (json!({}), true),
            (json!({"matchLabels": {"team": "a"}}), true),
            (json!({"matchLabels": {"team": "b"}}), false),
            (json!({"matchLabels": {"team": "a", "tier": "dev"}}), false),
            (
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod", "stage"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["prod"]}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "other", "operator": "NotIn", "values": ["x"]}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "team", "operator": "Exists"}]}),
                true,
            ),
            (
                json!({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}),
                false,
            ),
            (
                json!({"matchExpressions": [{"key": "team", "operator": "Sometimes"}]}),
                false,
            ),
        ];
        for (selector, want) in cases {
            assert_eq!(selector_matches(&sel(selector.clone()), &l), want, "{selector}");
        }
    }

    fn index() -> Index {
        Index::new(&[
            policy(
                "team-a",
                json!({"vault": "main", "secrets": ["team-a-*"], "namespaces": {"names": ["team-a"]}}),
            ),
            policy(
                "team-a-api",
                json!({"vault": "main", "secrets": ["api-key"], "namespaces": {"names": ["team-a"]}, "serviceAccounts": ["api"]}),
            ),
            policy(
                "shared-registry",
                json!({"vault": "main", "secrets": ["acr"], "namespaces": {"selector": {"matchLabels": {"registry": "shared"}}}, "uses": ["imagePull"]}),
            ),
            policy(
                "other-vault",
                json!({"vault": "other", "secrets": ["*"], "namespaces": {"names": ["team-b"]}}),
            ),
        ])
    }

    fn subject<'a>(namespace: &'a str, labels: &'a BTreeMap<String, String>, sa: &'a str) -> Subject<'a> {
        Subject {
            namespace,
            labels,
            service_account: sa,
        }
    }

    #[test]
    fn grants_by_vault_namespace_service_account_and_use() {
        let index = index();
        let none = BTreeMap::new();
        let shared = labels(&[("registry", "shared")]);
        let cases = [
            // (namespace, labels, sa, reference, use, granted by)
            (
                "team-a",
                &none,
                "default",
                r("main", "team-a-db"),
                Use::Env,
                Some("team-a"),
            ),
            (
                "team-a",
                &none,
                "default",
                r("main", "TEAM-A-DB"),
                Use::ImagePull,
                Some("team-a"),
            ),
            ("team-a", &none, "default", r("main", "team-b-db"), Use::Env, None),
            ("team-b", &none, "default", r("main", "team-a-db"), Use::Env, None),
            (
                "team-a",
                &none,
                "default",
                r("other", "team-a-db"),
                Use::Env,
                None,
            ),
            (
                "team-a",
                &none,
                "api",
                r("main", "api-key"),
                Use::Env,
                Some("team-a-api"),
            ),
            ("team-a", &none, "default", r("main", "api-key"), Use::Env, None),
            (
                "team-c",
                &shared,
                "default",
                r("main", "acr"),
                Use::ImagePull,
                Some("shared-registry"),
            ),
            ("team-c", &shared, "default", r("main", "acr"), Use::Env, None),
            ("team-c", &none, "default", r("main", "acr"), Use::ImagePull, None),
            (
                "team-b",
                &none,
                "default",
                r("other", "anything"),
                Use::Env,
                Some("other-vault"),
            ),
        ];
        for (ns, l, sa, reference, use_, want) in cases {
            let got = index.check(&subject(ns, l, sa), &reference, use_).ok();
            assert_eq!(got.as_deref(), want, "{reference} for {use_:?} by {ns}/{sa}");
        }
    }

    #[test]
    fn selector_grants_are_found_by_any_of_their_forms() {
        let index = Index::new(&[
            policy(
                "two-labels",
                json!({"vault": "v", "secrets": ["a"], "namespaces": {"selector": {"matchLabels": {"team": "x", "tier": "prod"}}}}),
            ),
            policy(
                "expressions",
                json!({"vault": "v", "secrets": ["b"], "namespaces": {"selector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod"]}]}}}),
            ),
            policy(
                "everyone",
                json!({"vault": "v", "secrets": ["c"], "namespaces": {"selector": {}}}),
            ),
        ]);
        let both = labels(&[("team", "x"), ("tier", "prod")]);
        let tier_only = labels(&[("tier", "prod")]);
        let none = BTreeMap::new();
        let granted = |l: &BTreeMap<String, String>, name: &str| {
            index
                .check(&subject("ns", l, "sa"), &r("v", name), Use::Env)
                .is_ok()
        };
        assert!(
            granted(&both, "a") && !granted(&tier_only, "a"),
            "every matchLabels pair must hold"
        );
        assert!(granted(&tier_only, "b") && !granted(&none, "b"));
        assert!(
            granted(&none, "c"),
            "an empty selector selects every namespace, as in Kubernetes"
        );
    }

    #[test]
    fn a_pinned_version_is_covered_by_its_secret() {
        let mut pinned = r("main", "team-a-db");
        pinned.version = Some("0123456789abcdef0123456789abcdef".into());
        let none = BTreeMap::new();
        assert!(
            index()
                .check(&subject("team-a", &none, "default"), &pinned, Use::Env)
                .is_ok()
        );
    }

    #[test]
    fn a_namespace_grant_for_one_service_account_keeps_the_secret_followed() {
        let index = index();
        let none = BTreeMap::new();
        assert!(index.grants_namespace("team-a", &none, &r("main", "api-key"), Use::Env));
        assert!(!index.grants_namespace("team-b", &none, &r("main", "api-key"), Use::Env));
        let shared = labels(&[("registry", "shared")]);
        assert!(index.grants_namespace("team-c", &shared, &r("main", "acr"), Use::ImagePull));
        assert!(!index.grants_namespace("team-c", &shared, &r("main", "acr"), Use::Env));
        assert!(!Index::default().grants_namespace("team-a", &none, &r("main", "team-a-db"), Use::Env));
    }

    #[test]
    fn the_first_grant_by_name_decides_and_near_misses_explain() {
        let both = Index::new(&[
            policy(
                "b",
                json!({"vault": "v", "secrets": ["x"], "namespaces": {"names": ["ns"]}}),
            ),
            policy(
                "a",
                json!({"vault": "v", "secrets": ["*"], "namespaces": {"names": ["ns"]}}),
            ),
        ]);
        let none = BTreeMap::new();
        assert_eq!(
            both.check(&subject("ns", &none, "default"), &r("v", "x"), Use::Env)
                .unwrap(),
            "a"
        );
        let err = index()
            .decide(
                &subject("team-a", &none, "default"),
                &r("main", "api-key"),
                Use::Env,
            )
            .unwrap_err();
        assert_eq!(
            err.detail(),
            "akv://main/api-key is not granted to ServiceAccount `default` in namespace `team-a`: no AccessPolicy grants it \
             for env (AccessPolicy team-a-api grants it only to ServiceAccounts api)"
        );
        // What the pod's creator reads names neither the policy nor whose it is.
        assert_eq!(
            err.to_string(),
            "akv://main/api-key is not granted to ServiceAccount `default` in namespace `team-a`: no AccessPolicy grants it \
             for env (it is granted in this namespace to other ServiceAccounts only; the platform team can see which with \
             `kvinject access check`)"
        );
    }

    #[test]
    fn a_denial_names_every_place_the_reference_is_used() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"annotations": {"kvinject.io/image-pull-secrets": "akv://main/acr"}},
            "spec": {"serviceAccountName": "web", "containers": [
                {"name": "app", "env": [{"name": "DB", "value": "akv://main/team-b-db"}, {"name": "OK", "value": "akv://main/team-a-db"}]},
                {"name": "sidecar", "env": [{"name": "DB2", "value": "akv://main/team-b-db"}]}
            ]}
        }))
        .unwrap();
        let plan = mutate::plan(
            &pod,
            &InjectConfig {
                vaults: ["main".to_owned()].into(),
                ..Default::default()
            },
        )
        .unwrap();
        let none = BTreeMap::new();
        let err = check_plan(
            &index(),
            &subject("team-a", &none, service_account_of(&pod)),
            &plan,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "container `app` env `DB`, container `sidecar` env `DB2`: akv://main/team-b-db is not granted to \
             ServiceAccount `web` in namespace `team-a`: no AccessPolicy grants it for env; \
             annotation `kvinject.io/image-pull-secrets`: akv://main/acr is not granted to ServiceAccount `web` in \
             namespace `team-a`: no AccessPolicy grants it for imagePull"
        );
        let shared = labels(&[("registry", "shared")]);
        let err = check_plan(&index(), &subject("team-a", &shared, "web"), &plan).unwrap_err();
        assert_eq!(
            err.0.len(),
            1,
            "the registry credential is granted by selector: {err}"
        );
        assert_eq!(err.0[0].1.reference, "akv://main/team-b-db");
    }

    #[test]
    fn a_pod_without_a_service_account_runs_as_default() {
        let pod: Pod = serde_json::from_value(json!({"spec": {"containers": []}})).unwrap();
        assert_eq!(service_account_of(&pod), "default");
    }
}
