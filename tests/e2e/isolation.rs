//! Isolation at the seams, as a tenant of a shared cluster would probe it: naming
//! kvinject's Secrets directly in a pod (env, envFrom, volumes, imagePullSecrets, ephemeral
//! containers), a Secret under a reference's name that holds another reference, a
//! ServiceAccount annotation that moves back onto kvinject's own identity, and a namespace
//! cache that has not seen an opt-in yet.

use crate::{
    inject::{self, pod},
    support::{self, Kvinject, PolicyGuard, WebhookGuard},
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use kvinject::{materialize::seal, mutate::Source, reference::Reference};
use serde_json::{Value, json};
use std::{collections::BTreeMap, time::Duration};

/// One opted-in namespace whose policy grants `<run>-pay-*` to ServiceAccount `payment`
/// only and `<run>-pub-*` to every ServiceAccount, and a kvinject the apiserver calls for it.
struct Tenant {
    client: Client,
    ns: String,
    run: String,
    kvinject: Kvinject,
    _policies: [PolicyGuard; 2],
    _webhook: WebhookGuard,
}

impl Drop for Tenant {
    fn drop(&mut self) {
        support::keep_events(&self.ns);
        support::delete_from_drop::<Namespace>(self.ns.clone());
    }
}

/// `{ns}` in `extra` is replaced by the tenant's namespace.
async fn tenant(prefix: &str, extra: &[&str]) -> Tenant {
    let client = support::kube().await;
    let label = support::unique(prefix);
    let ns = support::namespace(&client, prefix, &[("kvinject.test/suite", &label)]).await;
    let extra: Vec<String> = extra.iter().map(|a| a.replace("{ns}", &ns)).collect();
    let kvinject = Kvinject::start(&extra.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let run = support::unique("iso");
    let vault = support::testbed().vault_name.clone();
    let pay = support::access_policy(
        &client,
        &format!("{run}-pay"),
        json!({"vault": vault, "secrets": [format!("{run}-pay-*")], "namespaces": {"names": [ns]}, "serviceAccounts": ["payment"]}),
    )
    .await;
    let public = support::access_policy(
        &client,
        &format!("{run}-pub"),
        json!({"vault": vault, "secrets": [format!("{run}-pub-*")], "namespaces": {"names": [ns]}}),
    )
    .await;
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "payment"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let webhook =
        support::register_webhook(&client, &label, &kvinject.url(), ("kvinject.test/suite", &label)).await;
    support::wait_for_webhook(&client, &ns).await;
    Tenant {
        client,
        ns,
        run,
        kvinject,
        _policies: [pay, public],
        _webhook: webhook,
    }
}

async fn create(t: &Tenant, p: &Pod, dry_run: bool) -> Result<Pod, String> {
    let params = PostParams {
        dry_run,
        ..Default::default()
    };
    Api::<Pod>::namespaced(t.client.clone(), &t.ns)
        .create(&params, p)
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) => s.message,
            other => other.to_string(),
        })
}

fn as_sa(mut p: Pod, sa: &str) -> Pod {
    p.spec.as_mut().unwrap().service_account_name = Some(sa.to_owned());
    p
}

/// A pod whose one container has `spec` merged in (env, envFrom, volumeMounts) and whose
/// spec has `extra` merged in (volumes, imagePullSecrets).
fn raw_pod(name: &str, container: Value, extra: Value, annotations: Value) -> Pod {
    let mut c = json!({"name": "app", "image": "registry.invalid/app:1"});
    c.as_object_mut()
        .unwrap()
        .extend(container.as_object().unwrap().clone());
    let mut spec = json!({"containers": [c]});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}, "spec": spec}))
        .unwrap()
}

/// The payment ServiceAccount's Secret for `<run>-pay-key`, materialized by a pod of its own.
async fn payment_secret(t: &Tenant) -> (String, String) {
    let name = format!("{}-pay-key", t.run);
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    let own = as_sa(
        pod("payment", &[("KEY", &inject::reference(&name))], json!({})),
        "payment",
    );
    support::eventually(
        Duration::from_secs(10),
        "kvinject to load the policies",
        || async { create(t, &own, true).await.is_ok() },
    )
    .await;
    let stored = create(t, &own, false).await.expect("payment may read its key");
    (inject::secret_key_ref(&stored, "KEY").unwrap(), value)
}

#[tokio::test]
async fn a_pod_reaches_kvinjects_secrets_only_through_references_its_service_account_is_granted() {
    let _vault = support::VAULT.read().await;
    let t = tenant("direct", &[]).await;
    let (secret, value) = payment_secret(&t).await;

    // Every way a pod of another ServiceAccount can name it: denied, naming the place, the
    // Secret and why; a dry run answers the same; kubectl's `inject: "false"` changes nothing.
    let env =
        json!({"env": [{"name": "STOLEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "value"}}}]});
    let attempts = [
        (
            "env",
            raw_pod("by-env", env.clone(), json!({}), json!({})),
            "container `app` env `STOLEN` (secretKeyRef)",
        ),
        (
            "envFrom",
            raw_pod(
                "by-env-from",
                json!({"envFrom": [{"secretRef": {"name": secret}}]}),
                json!({}),
                json!({}),
            ),
            "container `app` envFrom 0 (secretRef)",
        ),
        (
            "a secret volume",
            raw_pod(
                "by-volume",
                json!({}),
                json!({"volumes": [{"name": "v", "secret": {"secretName": secret}}]}),
                json!({}),
            ),
            "volume `v` (secret)",
        ),
        (
            "a projected volume",
            raw_pod(
                "by-projected",
                json!({}),
                json!({"volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": secret}}]}}]}),
                json!({}),
            ),
            "volume `v` (projected secret)",
        ),
        (
            "imagePullSecrets",
            raw_pod(
                "by-pull",
                json!({}),
                json!({"imagePullSecrets": [{"name": secret}]}),
                json!({}),
            ),
            "imagePullSecrets 0",
        ),
        (
            "an opted-out pod",
            raw_pod(
                "by-opt-out",
                env.clone(),
                json!({}),
                json!({"kvinject.io/inject": "false"}),
            ),
            "container `app` env `STOLEN` (secretKeyRef)",
        ),
    ];
    for (how, attempt, place) in attempts {
        for dry_run in [true, false] {
            let err = create(&t, &attempt, dry_run).await.expect_err(&format!(
                "naming the payment Secret in {how} (dry run {dry_run}) is denied"
            ));
            assert!(
                err.contains(&format!("{place} names Secret `{secret}` itself")),
                "{how}: {err}"
            );
            assert!(
                err.contains(&format!(
                    "is not granted to ServiceAccount `default` in namespace `{}`",
                    t.ns
                )),
                "{how}: {err}"
            );
            assert!(!err.contains(&value), "the value leaked into the denial");
        }
    }
    let pods = Api::<Pod>::namespaced(t.client.clone(), &t.ns)
        .list(&Default::default())
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 1, "only the payment pod was stored");

    // The ServiceAccount it was made for may name it itself (a spec copied from a running
    // pod, a reinvocation); a value kvinject would hand it.
    create(
        &t,
        &as_sa(raw_pod("copied", env.clone(), json!({}), json!({})), "payment"),
        false,
    )
    .await
    .expect("payment may name its own Secret");

    // A name of kvinject's shape whose Secret does not exist yet: a pod waiting for it would
    // start with the value once kvinject made it for someone else.
    let future = Source::Env(
        Reference::parse(&inject::reference(&format!("{}-pay-later", t.run)))
            .unwrap()
            .unwrap(),
    )
    .secret_name();
    let waiting = json!({"env": [{"name": "LATER", "valueFrom": {"secretKeyRef": {"name": future, "key": "value", "optional": true}}}]});
    let err = create(
        &t,
        &raw_pod("waiting", waiting.clone(), json!({}), json!({})),
        false,
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("no such Secret exists; names of this shape are kvinject's"),
        "{err}"
    );
    // Squatting the name with a Secret of one's own first, to delete it once the pod is
    // stored: refused too.
    let squat: Secret =
        serde_json::from_value(json!({"metadata": {"name": future}, "stringData": {"value": "mine"}}))
            .unwrap();
    Api::<Secret>::namespaced(t.client.clone(), &t.ns)
        .create(&PostParams::default(), &squat)
        .await
        .unwrap();
    let err = create(&t, &raw_pod("squatting", waiting, json!({}), json!({})), false)
        .await
        .unwrap_err();
    assert!(
        err.contains("it is not kvinject's, but names of this shape are"),
        "{err}"
    );

    // The namespace's own Secrets stay its business.
    let own: Secret =
        serde_json::from_value(json!({"metadata": {"name": "app-config"}, "stringData": {"k": "v"}}))
            .unwrap();
    Api::<Secret>::namespaced(t.client.clone(), &t.ns)
        .create(&PostParams::default(), &own)
        .await
        .unwrap();
    let plain =
        json!({"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "app-config", "key": "k"}}}]});
    create(&t, &raw_pod("plain", plain, json!({}), json!({})), false)
        .await
        .expect("a pod's own Secret is none of kvinject's business");
    assert!(!t.kvinject.logs().contains(&value));
}

#[tokio::test]
async fn containers_added_to_a_running_pod_are_held_to_the_same_grants() {
    let _vault = support::VAULT.read().await;
    let t = tenant("ephemeral", &[]).await;
    let (secret, _) = payment_secret(&t).await;
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.ns);
    create(&t, &raw_pod("debugged", json!({}), json!({}), json!({})), false)
        .await
        .unwrap();
    let add = |name: &str, env: Value| {
        let pods = pods.clone();
        let patch = json!({"spec": {"ephemeralContainers": [{"name": name, "image": "registry.invalid/debug:1", "env": env}]}});
        async move {
            pods.patch_ephemeral_containers("debugged", &PatchParams::default(), &Patch::Strategic(patch))
                .await
                .map_err(|e| match e {
                    kube::Error::Api(s) => s.message,
                    other => other.to_string(),
                })
        }
    };
    let err = add(
        "steal",
        json!([{"name": "S", "valueFrom": {"secretKeyRef": {"name": secret, "key": "value"}}}]),
    )
    .await
    .expect_err("an ephemeral container naming another ServiceAccount's Secret is denied");
    assert!(
        err.contains(&format!(
            "ephemeral container `steal` env `S` (secretKeyRef) names Secret `{secret}` itself"
        )),
        "{err}"
    );
    // The subresource keeps only the ephemeral containers of what it is sent: a mirror
    // annotation or another ServiceAccount in the same patch is not what the pod becomes,
    // and is not what kvinject judges.
    let steal = json!([{"name": "S", "valueFrom": {"secretKeyRef": {"name": secret, "key": "value"}}}]);
    for (how, rest) in [
        (
            "a mirror annotation",
            json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "x"}}}),
        ),
        (
            "the granted ServiceAccount",
            json!({"spec": {"serviceAccountName": "payment"}}),
        ),
    ] {
        let mut patch = json!({"spec": {"ephemeralContainers": [{"name": "steal", "image": "registry.invalid/debug:1", "env": steal}]}});
        json_patch::merge(&mut patch, &rest);
        let err = pods
            .patch_ephemeral_containers("debugged", &PatchParams::default(), &Patch::Strategic(patch))
            .await
            .map(|_| ())
            .expect_err(how);
        assert!(
            err.to_string()
                .contains(&format!("names Secret `{secret}` itself")),
            "{how}: {err}"
        );
    }
    let err = add(
        "literal",
        json!([{"name": "R", "value": inject::reference(&format!("{}-pub-x", t.run))}]),
    )
    .await
    .expect_err("a reference in an ephemeral container would stay literal");
    assert!(
        err.contains("ephemeral container `literal` env `R`: kvinject does not resolve akv:// references"),
        "{err}"
    );
    let stored = add("plain", json!([{"name": "P", "value": "x"}]))
        .await
        .expect("a plain debug container is added");
    let names: Vec<_> = stored
        .spec
        .unwrap()
        .ephemeral_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["plain"]);
}

/// kvinject's signing keys, as every test's kvinject shares them (`--signing-key-namespace
/// default`).
async fn signing_keys(client: &Client) -> seal::Keys {
    let secret = Api::<Secret>::namespaced(client.clone(), "default")
        .get("kvinject-signing-key")
        .await
        .unwrap();
    let current = secret.metadata.annotations.unwrap()["kvinject.io/current-key"].clone();
    let material: BTreeMap<String, Vec<u8>> =
        secret.data.unwrap().into_iter().map(|(k, v)| (k, v.0)).collect();
    seal::Keys::new(&current, material).unwrap()
}

#[tokio::test]
async fn a_sealed_secret_under_a_references_name_that_holds_another_reference_is_not_reused() {
    let _vault = support::VAULT.read().await;
    let t = tenant("collide", &[]).await;
    let (wanted, other) = (format!("{}-pub-wanted", t.run), format!("{}-pay-other", t.run));
    support::seed_secret(&wanted, &support::distinctive_value()).await;
    // What a name collision would leave: a Secret kvinject sealed for `other`, under the name
    // `wanted` is materialized as. 64 bits of hash cannot be searched for a real one, so the
    // test seals it with kvinject's key, as kvinject would have.
    let name = Source::Env(Reference::parse(&inject::reference(&wanted)).unwrap().unwrap()).secret_name();
    let mut collided: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": t.ns, "labels": {"app.kubernetes.io/managed-by": "kvinject"},
                     "annotations": {"kvinject.io/reference": inject::reference(&other), "kvinject.io/version": "0123456789abcdef0123456789abcdef"}},
        "type": "Opaque",
        "stringData": {"value": "value-of-another-reference"},
    }))
    .unwrap();
    collided.data = Some(
        [(
            "value".to_owned(),
            k8s_openapi::ByteString(b"value-of-another-reference".to_vec()),
        )]
        .into(),
    );
    collided.string_data = None;
    seal::seal(&signing_keys(&t.client).await, &mut collided);
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns);
    secrets.create(&PostParams::default(), &collided).await.unwrap();
    support::eventually(
        Duration::from_secs(10),
        "kvinject to see the Secret and deny",
        || async {
            let p = pod("wants", &[("X", &inject::reference(&wanted))], json!({}));
            create(&t, &p, true)
                .await
                .is_err_and(|e| e.contains("was made for another reference or identity"))
        },
    )
    .await;
    let err = create(
        &t,
        &pod("wants", &[("X", &inject::reference(&wanted))], json!({})),
        false,
    )
    .await
    .unwrap_err();
    assert!(
        err.contains(&format!(
            "Secret {}/{name} is kvinject's, but it was made for another reference",
            t.ns
        )),
        "{err}"
    );
    assert!(!err.contains("value-of-another-reference"));
}

#[tokio::test]
async fn a_tenants_annotation_cannot_move_it_back_onto_kvinjects_identity() {
    let _vault = support::VAULT.read().await;
    let t = tenant("own-id", &["--default-identity", "workload"]).await;
    let sa: ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": "escapee", "annotations": {"kvinject.io/identity": "kvinject"}}}),
    )
    .unwrap();
    Api::<ServiceAccount>::namespaced(t.client.clone(), &t.ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let name = format!("{}-pub-x", t.run);
    support::seed_secret(&name, &support::distinctive_value()).await;
    let p = as_sa(
        pod("escape", &[("X", &inject::reference(&name))], json!({})),
        "escapee",
    );
    support::eventually(
        Duration::from_secs(10),
        "the policies loaded and the pod denied for its identity",
        || async {
            create(&t, &p, true)
                .await
                .is_err_and(|e| e.contains("asks to read Key Vault as kvinject's own identity"))
        },
    )
    .await;
    let last = create(&t, &p, false)
        .await
        .expect_err("the annotation alone is refused");
    assert!(
        last.contains(&format!("--own-identity-namespace {}", t.ns)),
        "{last}"
    );
    assert!(
        last.contains("ServiceAccount `") && last.contains("/escapee`"),
        "{last}"
    );
    drop(t);

    // The platform's flag allows it, for its namespace: the pod reads as kvinject.
    let t = tenant(
        "own-id",
        &[
            "--default-identity",
            "workload",
            "--own-identity-namespace",
            "{ns}",
        ],
    )
    .await;
    Api::<ServiceAccount>::namespaced(t.client.clone(), &t.ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let name = format!("{}-pub-x", t.run);
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    let p = as_sa(
        pod("allowed", &[("X", &inject::reference(&name))], json!({})),
        "escapee",
    );
    support::eventually(Duration::from_secs(10), "the pod admitted", || async {
        create(&t, &p, true).await.is_ok()
    })
    .await;
    let stored = create(&t, &p, false)
        .await
        .expect("the platform allowed kvinject's identity here");
    let secret = Api::<Secret>::namespaced(t.client.clone(), &t.ns)
        .get(&inject::secret_key_ref(&stored, "X").unwrap())
        .await
        .unwrap();
    assert_eq!(secret.data.unwrap()["value"].0, value.as_bytes());
    assert!(
        !secret
            .metadata
            .annotations
            .unwrap()
            .contains_key("kvinject.io/client-id"),
        "read as kvinject's own identity"
    );
}

/// Key Vault for the scope test: never has anything (the test is about whether kvinject
/// decides at all, not about what it reads).
struct EmptyVault;

#[async_trait::async_trait]
impl kvinject::keyvault::source::SecretSource for EmptyVault {
    async fn fetch(
        &self,
        r: &Reference,
        _: Option<&kvinject::identity::WorkloadIdentity>,
    ) -> Result<kvinject::keyvault::source::Fetched, kvinject::keyvault::source::FetchError> {
        Err(kvinject::keyvault::source::FetchError::NotFound(r.to_string()))
    }
    async fn probe(&self, _: &str) -> Result<(), kvinject::keyvault::source::FetchError> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl kvinject::inject::SecretWriter for EmptyVault {
    async fn create(&self, _: Secret) -> Result<(), kvinject::inject::WriteError> {
        Ok(())
    }
}

/// kvinject's decision in process, with a namespace cache that still holds `stale` (the
/// namespace before its opt-in label: a watch that lags), asking `client` when in doubt.
async fn decide_with_stale_cache(client: Client, stale: Namespace, p: &Pod) -> Result<bool, String> {
    decide_in_process(client, Some(stale), None, p).await
}

/// kvinject's decision in process, as `client`: its namespace cache holds only `cached`
/// (none: the namespace is not in the cache yet), its ServiceAccount cache nothing when
/// `identities` are given (each is read from the apiserver, as for one just created).
pub(crate) async fn decide_in_process(
    client: Client,
    cached: Option<Namespace>,
    identities: Option<kvinject::identity::Settings>,
    p: &Pod,
) -> Result<bool, String> {
    use kube::runtime::{reflector::store::Writer, watcher};
    use kvinject::{
        access::NamespaceLabels,
        inject::{Injector, ServiceAccounts},
        mutate::InjectConfig,
        scope::Scope,
    };
    use std::sync::Arc;
    let ns = p
        .metadata
        .namespace
        .clone()
        .or_else(|| cached.as_ref()?.metadata.name.clone())
        .unwrap();
    let mut namespaces = Writer::<Namespace>::default();
    if let Some(cached) = cached {
        namespaces.apply_watcher_event(&watcher::Event::Apply(cached));
    }
    let config = InjectConfig {
        vaults: [support::testbed().vault_name.clone()].into(),
        ..Default::default()
    };
    let mut injector = Injector::new(
        config,
        Arc::new(EmptyVault),
        Arc::new(EmptyVault),
        Writer::default().as_reader(),
        Duration::from_secs(60),
        Default::default(),
    )
    .with_namespaces(NamespaceLabels::new(namespaces.as_reader(), Some(client.clone())))
    .with_scope(Scope::new("kvinject.test/suite", []).unwrap());
    if let Some(settings) = identities {
        injector = injector.with_identities(ServiceAccounts {
            store: Writer::default().as_reader(),
            client: Some(client),
            settings: Arc::new(settings),
        });
    }
    injector
        .admit(&ns, p, true)
        .await
        .map(|a| a.patch.is_some())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_pod_with_references_is_never_let_through_unchanged_on_a_stale_namespace_cache() {
    // In process: the lagging watch is the fault (the real one lags by milliseconds, too
    // briefly to hit on purpose); the namespace and the apiserver asked are the bed's.
    let client = support::kube().await;
    let ns = support::namespace(&client, "stale", &[("kvinject.test/suite", "x")]).await;
    let _ns = scopeguard(&ns);
    let mut stale = Api::<Namespace>::all(client.clone()).get(&ns).await.unwrap();
    stale.metadata.labels = None;
    let with_reference = pod("app", &[("X", &inject::reference("anything"))], json!({}));
    let err = decide_with_stale_cache(client.clone(), stale.clone(), &with_reference)
        .await
        .expect_err("the apiserver says the namespace opted in: kvinject decides, and the vault has nothing");
    assert!(err.contains("anything"), "{err}");
    // A pod without references is let through from the cache alone.
    let plain = pod("plain", &[("X", "y")], json!({}));
    assert_eq!(
        decide_with_stale_cache(client.clone(), stale.clone(), &plain).await,
        Ok(false)
    );

    // When the apiserver cannot be asked, the pod is denied, never stored with akv:// text.
    let mut config = client_config().await;
    config.cluster_url = "https://127.0.0.1:1".parse().unwrap();
    let unreachable = Client::try_from(config).unwrap();
    let err = decide_with_stale_cache(unreachable, stale, &with_reference)
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!(
            "kvinject could not read namespace {ns} to tell whether it acts there"
        )),
        "{err}"
    );
}

async fn client_config() -> kube::Config {
    let options = kube::config::KubeConfigOptions::default();
    let kubeconfig = kube::config::Kubeconfig::read_from(&support::testbed().kubeconfig).unwrap();
    kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .unwrap()
}

/// Deletes the namespace when dropped.
fn scopeguard(ns: &str) -> impl Drop {
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            support::delete_from_drop::<Namespace>(self.0.clone());
        }
    }
    Guard(ns.to_owned())
}

#[tokio::test]
async fn a_hand_edited_value_is_never_handed_to_a_pod() {
    let _vault = support::VAULT.read().await;
    // No rotation controller here: nothing restores the value, so the webhook's own answer
    // is what is observed.
    let t = tenant("edited", &[]).await;
    let name = format!("{}-pub-edited", t.run);
    support::seed_secret(&name, &support::distinctive_value()).await;
    let p = pod("first", &[("X", &inject::reference(&name))], json!({}));
    support::eventually(
        Duration::from_secs(10),
        "kvinject to load the policies",
        || async { create(&t, &p, true).await.is_ok() },
    )
    .await;
    let stored = create(&t, &p, false).await.unwrap();
    let secret = inject::secret_key_ref(&stored, "X").unwrap();
    let edited = support::distinctive_value();
    let patch = json!({"stringData": {"value": edited}});
    Api::<Secret>::namespaced(t.client.clone(), &t.ns)
        .patch(&secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let next = pod("next", &[("X", &inject::reference(&name))], json!({}));
    support::eventually(Duration::from_secs(10), "kvinject to see the edit", || async {
        create(&t, &next, true).await.is_err()
    })
    .await;
    let err = create(&t, &next, false)
        .await
        .expect_err("the edited value is not handed out");
    assert!(
        err.contains(&format!(
            "Secret {}/{secret} was changed by hand; kvinject does not hand the edited value to a pod",
            t.ns
        )),
        "{err}"
    );
    // A debug container added to the pod that already uses it is judged for what it names
    // itself, not refused over the pod's own Secret.
    let debug =
        json!({"spec": {"ephemeralContainers": [{"name": "debug", "image": "registry.invalid/debug:1"}]}});
    Api::<Pod>::namespaced(t.client.clone(), &t.ns)
        .patch_ephemeral_containers("first", &PatchParams::default(), &Patch::Strategic(debug))
        .await
        .expect("kubectl debug on a pod whose Secret was edited");
    // Named directly, by a pod whose ServiceAccount is granted the reference: the same.
    let direct = raw_pod(
        "direct",
        json!({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": secret, "key": "value"}}}]}),
        json!({}),
        json!({}),
    );
    let err = create(&t, &direct, false)
        .await
        .expect_err("the edited value is not handed out by name either");
    assert!(
        err.contains(&format!("names Secret `{secret}` itself")) && err.contains("changed by hand"),
        "{err}"
    );
    assert!(!err.contains(&edited) && !t.kvinject.logs().contains(&edited));
}

/// The version the Secret holds stays `held` for a few seconds of one-second checks.
async fn keeps_version(secrets: &Api<Secret>, name: &str, held: &str, why: &str) {
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = crate::rotation::version(&secrets.get(name).await.unwrap());
        assert_eq!(now, held, "{why}");
    }
}

#[tokio::test]
async fn the_controller_writes_only_where_admission_would() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let args = crate::rotation::rotation_args(&support::unique("lease"), "1s");
    let t = tenant("deputy", &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let (secret, _) = payment_secret(&t).await;
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns);
    let held = crate::rotation::version(&secrets.get(&secret).await.unwrap());
    let vault_name = format!("{}-pay-key", t.run);

    // 1. The grant moves to another ServiceAccount: the namespace still has a grant for the
    // secret, but not for the one whose pod uses it. The controller stops refreshing it.
    let policies: Api<kvinject::access::policy::AccessPolicy> = Api::all(t.client.clone());
    let to = |sa: &str| json!({"spec": {"serviceAccounts": [sa]}});
    let pay = format!("{}-pay", t.run);
    policies
        .patch(&pay, &PatchParams::default(), &Patch::Merge(&to("someone-else")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let newer = support::seed_secret(&vault_name, &support::distinctive_value()).await;
    keeps_version(
        &secrets,
        &secret,
        &held,
        "refreshed for a ServiceAccount no policy grants it to",
    )
    .await;
    policies
        .patch(&pay, &PatchParams::default(), &Patch::Merge(&to("payment")))
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(20),
        "the refresh once the grant is back",
        || async { crate::rotation::version(&secrets.get(&secret).await.unwrap()) == newer },
    )
    .await;

    // 1b. Pods of two ServiceAccounts use it, and one loses its grant: the other's grant is
    // no reason to write a value the first would read at its next start.
    let to_both = json!({"spec": {"serviceAccounts": ["payment", "billing"]}});
    policies
        .patch(&pay, &PatchParams::default(), &Patch::Merge(&to_both))
        .await
        .unwrap();
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "billing"}})).unwrap();
    Api::<ServiceAccount>::namespaced(t.client.clone(), &t.ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let billing = as_sa(
        pod("billing", &[("KEY", &inject::reference(&vault_name))], json!({})),
        "billing",
    );
    support::eventually(Duration::from_secs(10), "billing granted", || async {
        create(&t, &billing, true).await.is_ok()
    })
    .await;
    let stored = create(&t, &billing, false).await.unwrap();
    assert_eq!(
        inject::secret_key_ref(&stored, "KEY").as_deref(),
        Some(secret.as_str())
    );
    policies
        .patch(&pay, &PatchParams::default(), &Patch::Merge(&to("payment")))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third = support::seed_secret(&vault_name, &support::distinctive_value()).await;
    keeps_version(
        &secrets,
        &secret,
        &newer,
        "refreshed while a ServiceAccount whose pod uses it lost its grant",
    )
    .await;
    Api::<Pod>::namespaced(t.client.clone(), &t.ns)
        .delete("billing", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(20),
        "the refresh once only granted pods use it",
        || async { crate::rotation::version(&secrets.get(&secret).await.unwrap()) == third },
    )
    .await;
    let newer = third;

    // 2. The namespace leaves kvinject's scope (its opt-in label removed): nothing is
    // written there any more, nor brought back when deleted.
    let namespaces: Api<Namespace> = Api::all(t.client.clone());
    let label = |v: Value| json!({"metadata": {"labels": {"kvinject.test/suite": v}}});
    let was = namespaces.get(&t.ns).await.unwrap().metadata.labels.unwrap()["kvinject.test/suite"].clone();
    namespaces
        .patch(&t.ns, &PatchParams::default(), &Patch::Merge(&label(Value::Null)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let newest = support::seed_secret(&vault_name, &support::distinctive_value()).await;
    keeps_version(
        &secrets,
        &secret,
        &newer,
        "refreshed in a namespace kvinject does not act for",
    )
    .await;
    secrets.delete(&secret, &Default::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        secrets.get_opt(&secret).await.unwrap().is_none(),
        "recreated out of scope"
    );
    // Back in scope, the pod's Secret comes back, and is refreshed to the newest version.
    namespaces
        .patch(&t.ns, &PatchParams::default(), &Patch::Merge(&label(json!(was))))
        .await
        .unwrap();
    support::eventually(
        Duration::from_secs(60),
        "the Secret recreated and refreshed once in scope",
        || async {
            secrets
                .get_opt(&secret)
                .await
                .unwrap()
                .is_some_and(|s| crate::rotation::version(&s) == newest)
        },
    )
    .await;
}

#[tokio::test]
async fn sub_path_expr_mounts_of_file_volumes_and_mirror_pods_are_handled_as_documented() {
    let _vault = support::VAULT.read().await;
    let t = tenant("edges", &[]).await;
    let name = format!("{}-pub-file", t.run);
    support::seed_secret(&name, &support::distinctive_value()).await;
    // kubelet never updates a subPathExpr mount either: refused like subPath.
    let p = raw_pod(
        "expr",
        json!({"volumeMounts": [{"name": "creds", "mountPath": "/creds/pw", "subPathExpr": "$(POD_NAME)"}]}),
        json!({"volumes": [{"name": "creds", "csi": {"driver": "kvinject.io", "volumeAttributes": {"pw": inject::reference(&name)}}}]}),
        json!({}),
    );
    let mut last = String::new();
    for _ in 0..20 {
        last = create(&t, &p, true).await.err().unwrap_or_default();
        if last.contains("subPathExpr") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        last.contains("volume `creds`: container `app` mounts it with subPath or subPathExpr"),
        "{last}"
    );
    // A mirror pod (kubelet's copy of a static pod): left unchanged, with a warning.
    let mirror = pod(
        "mirror",
        &[("X", &inject::reference(&name))],
        json!({"kubernetes.io/config.mirror": "abc"}),
    );
    let mut mirror = mirror;
    mirror.spec.as_mut().unwrap().node_name = Some("static-node".into());
    let stored = create(&t, &mirror, true)
        .await
        .expect("a mirror pod is not denied");
    let env = &stored.spec.unwrap().containers[0].env.clone().unwrap()[0];
    assert_eq!(
        env.value.as_deref(),
        Some(inject::reference(&name).as_str()),
        "left unchanged"
    );
}

/// A tenant whose one Secret (for `{run}-pub-<suffix>`, made by a first pod) is marked
/// unreferenced long ago: the tenant, the Secret's name, and the resourceVersion the mark
/// left (what a collector about to delete it would have read).
async fn marked_unreferenced(prefix: &str, suffix: &str) -> (Tenant, String, String) {
    let t = tenant(prefix, &[]).await;
    let name = format!("{}-pub-{suffix}", t.run);
    support::seed_secret(&name, &support::distinctive_value()).await;
    let first = pod("first", &[("X", &inject::reference(&name))], json!({}));
    support::eventually(
        Duration::from_secs(10),
        "kvinject to load the policies",
        || async { create(&t, &first, true).await.is_ok() },
    )
    .await;
    let secret = inject::secret_key_ref(&create(&t, &first, false).await.unwrap(), "X").unwrap();
    let mark =
        json!({"metadata": {"annotations": {"kvinject.io/unreferenced-since": "2020-01-01T00:00:00Z"}}});
    let seen = Api::<Secret>::namespaced(t.client.clone(), &t.ns)
        .patch(&secret, &PatchParams::default(), &Patch::Merge(&mark))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    (t, secret, seen)
}

#[tokio::test]
async fn a_pod_reusing_a_secret_marked_unreferenced_makes_a_delete_in_flight_fail() {
    let _vault = support::VAULT.read().await;
    // No controller: the test plays the collector's part, at the moment it would delete.
    let (t, secret, seen) = marked_unreferenced("gc-race", "race").await;
    let name = format!("{}-pub-race", t.run);
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns);
    support::eventually(
        Duration::from_secs(10),
        "the mark in kvinject's cache, and cleared by a pod",
        || async {
            create(
                &t,
                &pod(
                    &support::unique("p"),
                    &[("X", &inject::reference(&name))],
                    json!({}),
                ),
                false,
            )
            .await
            .is_ok()
                && !secrets
                    .get(&secret)
                    .await
                    .unwrap()
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .contains_key("kvinject.io/unreferenced-since")
        },
    )
    .await;
    let now = secrets.get(&secret).await.unwrap();
    assert_ne!(now.metadata.resource_version.as_deref(), Some(seen.as_str()));
    // The collector's delete, conditional on what it saw: refused, the Secret stays.
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: Some(seen),
            uid: None,
        }),
        ..Default::default()
    };
    let refused = secrets.delete(&secret, &params).await;
    assert!(
        matches!(refused, Err(kube::Error::Api(ref s)) if s.code == 409),
        "{refused:?}"
    );
    assert!(secrets.get_opt(&secret).await.unwrap().is_some());
}

#[tokio::test]
async fn a_template_without_references_keeps_its_namespaces_registry_credential_from_collection() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let mut args = crate::rotation::rotation_args(&support::unique("lease"), "1h");
    args.extend(["--gc-grace-period".to_owned(), "1s".to_owned()]);
    let t = tenant("skeleton", &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let acr = format!("{}-pub-acr", t.run);
    support::seed_secret(&acr, r#"{"auths":{"registry.invalid":{"auth":"dTpw"}}}"#).await;
    // A Deployment that mentions nothing of kvinject's, seen before the namespace gives
    // every pod registry credentials (no replicas: only its template refers to them).
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(t.client.clone(), &t.ns);
    let plain: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "plain"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "plain"}},
                 "template": {"metadata": {"labels": {"app": "plain"}}, "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}]}}}
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &plain).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let namespaces: Api<Namespace> = Api::all(t.client.clone());
    let annotate =
        json!({"metadata": {"annotations": {"kvinject.io/image-pull-secrets": inject::reference(&acr)}}});
    namespaces
        .patch(&t.ns, &PatchParams::default(), &Patch::Merge(&annotate))
        .await
        .unwrap();
    // A pod materializes the credential, then goes away.
    let p = pod("puller", &[], json!({}));
    support::eventually(
        Duration::from_secs(10),
        "kvinject to see the annotation",
        || async {
            create(&t, &p, true)
                .await
                .is_ok_and(|p| p.spec.is_some_and(|s| s.image_pull_secrets.is_some()))
        },
    )
    .await;
    let stored = create(&t, &p, false).await.unwrap();
    let pull = stored.spec.unwrap().image_pull_secrets.unwrap()[0].name.clone();
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.ns);
    pods.delete("puller", &kube::api::DeleteParams::background())
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            secrets.get_opt(&pull).await.unwrap().is_some(),
            "the Deployment's pods will need {pull}: not collected"
        );
    }
}

#[tokio::test]
async fn a_holder_whose_clock_is_behind_keeps_the_lease_while_it_renews() {
    let _rotation = support::ROTATION.lock().await;
    let client = support::kube().await;
    let lease_name = support::unique("lease");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), "default");
    // Another replica holds the lease and renews it every second, but its clock is an hour
    // behind: every renewTime it writes is an hour old by this machine's clock.
    let record = |n: i64| {
        let behind = k8s_openapi::jiff::Timestamp::now().as_second() - 3600;
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": lease_name}, "spec": {
            "holderIdentity": "skewed-holder", "leaseDurationSeconds": 3, "leaseTransitions": 0,
            "renewTime": k8s_openapi::jiff::Timestamp::from_second(behind + n).unwrap().to_string().replace('Z', ".000000Z"),
        }})
    };
    let apply = |n: i64| {
        let leases = leases.clone();
        let body = record(n);
        let name = lease_name.clone();
        async move {
            let params = PatchParams::apply("skewed-holder").force();
            leases.patch(&name, &params, &Patch::Apply(&body)).await.unwrap();
        }
    };
    apply(0).await;
    let args = crate::rotation::rotation_args(&lease_name, "1h");
    let _k = Kvinject::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let holder = || async {
        leases
            .get(&lease_name)
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .unwrap_or_default()
    };
    for n in 1..=8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            holder().await,
            "skewed-holder",
            "taken over from a holder that renews (after {n}s)"
        );
        apply(n).await;
    }
    // It stops renewing: kvinject takes over once the record has stood for its duration.
    support::eventually(Duration::from_secs(15), "kvinject to take the lease", || async {
        holder().await != "skewed-holder"
    })
    .await;
    let _ = leases.delete(&lease_name, &Default::default()).await;
}

#[tokio::test]
async fn restores_a_tenant_causes_count_against_its_namespaces_read_budget() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let mut args = crate::rotation::rotation_args(&support::unique("lease"), "1h");
    // One read, then one every 1000 s.
    args.extend(["--namespace-read-rate", "0.001", "--namespace-read-burst", "1"].map(String::from));
    let t = tenant("budget", &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let name = format!("{}-pub-budget", t.run);
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    let p = pod("app", &[("X", &inject::reference(&name))], json!({}));
    support::eventually(
        Duration::from_secs(10),
        "kvinject to load the policies",
        || async { create(&t, &p, false).await.is_ok() },
    )
    .await;
    let stored = Api::<Pod>::namespaced(t.client.clone(), &t.ns)
        .get("app")
        .await
        .unwrap();
    let secret = inject::secret_key_ref(&stored, "X").unwrap();
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns);
    let held = || async {
        secrets.get(&secret).await.unwrap().data.unwrap()["value"]
            .0
            .clone()
    };
    let edit = |by_hand: String| {
        let secrets = secrets.clone();
        let secret = secret.clone();
        async move {
            let patch = json!({"stringData": {"value": by_hand}});
            secrets
                .patch(&secret, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    // The first edit is restored: the namespace had a read left.
    edit(support::distinctive_value()).await;
    support::eventually(Duration::from_secs(15), "the first edit restored", || async {
        held().await == value.as_bytes()
    })
    .await;
    // The second is not, while the budget is spent: the value stays as edited (and new pods
    // are denied, as for any edited value) rather than the vault being read on demand.
    let again = support::distinctive_value();
    edit(again.clone()).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            held().await,
            again.as_bytes(),
            "restored beyond the namespace's budget"
        );
    }
    assert!(
        t.kvinject
            .logs()
            .contains("restore deferred: the namespace's Key Vault read budget is spent")
    );
}

#[tokio::test]
async fn workloads_that_may_have_started_on_an_edited_value_roll_once_it_is_restored() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let args = crate::rotation::rotation_args(&support::unique("lease"), "1h");
    let t = tenant("restored", &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let name = format!("{}-pub-restored", t.run);
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(t.client.clone(), &t.ns);
    let d: k8s_openapi::api::apps::v1::Deployment =
        crate::rotation::deployment("app", &name, json!({"kvinject.io/rollout-on-rotation": "true"}));
    support::eventually(
        Duration::from_secs(10),
        "kvinject to load the policies",
        || async {
            create(
                &t,
                &pod("probe", &[("X", &inject::reference(&name))], json!({})),
                true,
            )
            .await
            .is_ok()
        },
    )
    .await;
    deployments.create(&PostParams::default(), &d).await.unwrap();
    support::eventually(Duration::from_secs(30), "the versions recorded", || async {
        crate::rotation::stored_hash(&deployments.get("app").await.unwrap()).is_some()
    })
    .await;
    let before = crate::rotation::template_hash(&deployments.get("app").await.unwrap());
    let secret = crate::rotation::secret_of_pod(&t.client, &t.ns, "app=app").await;
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns);
    let patch = json!({"stringData": {"value": support::distinctive_value()}});
    secrets
        .patch(&secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    support::eventually(Duration::from_secs(20), "the value restored", || async {
        secrets.get(&secret).await.unwrap().data.unwrap()["value"].0 == value.as_bytes()
    })
    .await;
    support::eventually(Duration::from_secs(20), "the Deployment rolled", || async {
        crate::rotation::template_hash(&deployments.get("app").await.unwrap()) != before
    })
    .await;
    // Once: the next reconciles change nothing.
    let rolled = crate::rotation::template_hash(&deployments.get("app").await.unwrap());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        crate::rotation::template_hash(&deployments.get("app").await.unwrap()),
        rolled
    );
}

/// The id of the key whose seal `secret` carries.
fn sealed_with(secret: &Secret) -> Option<String> {
    let signature = secret
        .metadata
        .annotations
        .as_ref()?
        .get("kvinject.io/signature")?;
    signature.split(':').nth(1).map(str::to_owned)
}

/// kvinject's Secret for `reference` in `ns`, once there.
async fn materialized(client: &Client, ns: &str, reference: &str) -> Secret {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = secrets
            .list(&kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=kvinject"))
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|s| {
                s.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("kvinject.io/reference"))
                    == Some(&reference.to_owned())
            });
        if let Some(found) = found {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Secret for {reference} in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `k` admits a pod in `ns` that uses `name`, and its message, POSTed directly.
async fn admits(k: &Kvinject, ns: &str, name: &str) -> (bool, String) {
    let answer = support::post_review(k, &support::review(ns, &inject::reference(name))).await;
    let message = answer["response"]["status"]["message"].to_string();
    (answer["response"]["allowed"] == true, message)
}

/// `admits` until it does, for up to ten seconds: the last answer.
async fn admits_eventually(k: &Kvinject, ns: &str, name: &str) -> (bool, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = admits(k, ns, name).await;
        if answer.0 || std::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_signing_key_rotated_in_two_phases_never_makes_one_replicas_seals_foreign_to_another() {
    let _vault = support::VAULT.read().await;
    let client = support::kube().await;
    let key_secret = support::unique("signing-key");
    let flags = [
        "--signing-key-secret",
        key_secret.as_str(),
        "--signing-key-reload-interval",
        "1s",
    ];
    let a = Kvinject::start(&flags).await;
    let keys: Api<Secret> = Api::namespaced(client.clone(), "default");
    let ns = support::namespace(&client, "keyroll", &[("kvinject.test/suite", "keyroll")]).await;
    let _ns = scopeguard(&ns);
    let _grant = support::grant_all(&client, &ns).await;
    let (old, early, late) = (
        support::unique("keyroll-old"),
        support::unique("keyroll-early"),
        support::unique("keyroll-late"),
    );
    for name in [&old, &early, &late] {
        support::seed_secret(name, &support::distinctive_value()).await;
    }
    // Sealed with the first key.
    let (ok, message) = admits_eventually(&a, &ns, &old).await;
    assert!(ok, "{message}");
    let first_key = sealed_with(&materialized(&client, &ns, &inject::reference(&old)).await).unwrap();

    // Phase 1: a second key beside the first, which still signs. Every replica reads it
    // within an interval, with no restart.
    let material = serde_json::to_value(k8s_openapi::ByteString(seal::random_key())).unwrap();
    keys.patch(
        &key_secret,
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k2": material}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Phase 2: the second key signs. A replica started now signs with it at once.
    let current = json!({"metadata": {"annotations": {"kvinject.io/current-key": "k2"}}});
    keys.patch(&key_secret, &PatchParams::default(), &Patch::Merge(current))
        .await
        .unwrap();
    let b = Kvinject::start(&flags).await;
    let (ok, message) = admits_eventually(&b, &ns, &early).await;
    assert!(ok, "B admits: {message}");
    let made_by_b = materialized(&client, &ns, &inject::reference(&early)).await;
    assert_eq!(sealed_with(&made_by_b).as_deref(), Some("k2"));

    // A, running since before either phase, takes B's Secret for kvinject's own.
    let (ok, message) = admits_eventually(&a, &ns, &early).await;
    assert!(ok, "A hands out B's Secret: {message}");
    // And A signs with k2 itself once every replica has had it for three intervals.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (ok, message) = admits(&a, &ns, &late).await;
    assert!(ok, "{message}");
    let made_by_a = materialized(&client, &ns, &inject::reference(&late)).await;
    assert_eq!(sealed_with(&made_by_a).as_deref(), Some("k2"));
    assert!(
        a.logs().contains("signing with a new key"),
        "A switched, and said so"
    );

    // The first key removed (retired, or compromised): what it sealed is no longer
    // kvinject's on any replica, without a restart; what k2 sealed still is.
    let retire = json!({"data": {first_key.clone(): null}});
    keys.patch(&key_secret, &PatchParams::default(), &Patch::Merge(retire))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for k in [&a, &b] {
        let (ok, message) = admits(k, &ns, &old).await;
        assert!(
            !ok && message.contains("was not created by kvinject"),
            "{message}"
        );
        assert!(admits(k, &ns, &early).await.0);
    }
    let _ = keys.delete(&key_secret, &Default::default()).await;
}

#[tokio::test]
async fn a_pod_naming_kvinjects_secret_itself_keeps_it_from_collection() {
    let _vault = support::VAULT.read().await;
    // No controller: what it goes by is observed (the label its pod watch selects, the
    // mark it deletes on). Marked unreferenced (the reference's pod gone), then a pod that
    // names it itself, as a copied spec does.
    let (t, secret, seen) = marked_unreferenced("named-use", "named").await;
    let secrets: Api<Secret> = Api::namespaced(t.client.clone(), &t.ns);
    let mark =
        json!({"metadata": {"annotations": {"kvinject.io/unreferenced-since": "2020-01-01T00:00:00Z"}}});
    let copy = |n: &str| {
        raw_pod(
            n,
            json!({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": secret, "key": "value"}}}]}),
            json!({}),
            json!({}),
        )
    };
    let mut stored = None;
    for i in 0..50 {
        let p = create(&t, &copy(&format!("copy-{i}")), false).await.unwrap();
        let cleared = !secrets
            .get(&secret)
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("kvinject.io/unreferenced-since");
        if cleared {
            stored = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stored = stored.expect("a pod naming the marked Secret clears the mark");
    assert_eq!(
        stored
            .metadata
            .labels
            .unwrap_or_default()
            .get("kvinject.io/injected")
            .map(String::as_str),
        Some("true"),
        "the controller's pod watch sees the pod"
    );
    // The collector's delete, conditional on what it saw: refused.
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: Some(seen),
            uid: None,
        }),
        ..Default::default()
    };
    let refused = secrets.delete(&secret, &params).await;
    assert!(
        matches!(refused, Err(kube::Error::Api(ref s)) if s.code == 409),
        "{refused:?}"
    );
    // A dry run writes nothing.
    let seen = secrets
        .patch(&secret, &PatchParams::default(), &Patch::Merge(&mark))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    create(&t, &copy("dry"), true).await.unwrap();
    assert_eq!(
        secrets.get(&secret).await.unwrap().metadata.resource_version,
        seen.metadata.resource_version
    );
}
