//! Faults on the apiserver side (reliability issue, part 3): writes that conflict with
//! someone else's, and a Secret creation slower than the admission deadline. (A restarted
//! apiserver has a test binary of its own, tests/restart: it would stop every other test.)

use crate::{
    inject::{create, pod, reference},
    rotation::{deployment, rotation_setup_every, version},
    support::{self, Setup},
};
use axum::{Json, Router, extract::State, routing::post};
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            RuleWithOperations, ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
        },
        apps::v1::{Deployment, ReplicaSet},
        core::v1::{Event, Secret},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The rotation controller's write of a new version conflicts with someone else's: a webhook
/// on Secret updates holds kvinject's write (the one that changes the value) while another
/// writer labels the Secret, so the apiserver answers kvinject 409. Meanwhile yet another
/// writer annotates the Deployment many times a second (as Argo CD and other controllers
/// do). kvinject writes again from the Secret as it is now: the value arrives, the label
/// stays, and the Deployment rolls exactly once and keeps the other writer's annotation.
#[tokio::test]
async fn rotation_writes_that_conflict_are_made_again_from_fresh_state_and_roll_once() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup_every("conflict", "1s", &[]).await;
    let name = support::unique("contended");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment("app", &name, json!({"kvinject.io/rollout-on-rotation": "true"})),
        )
        .await
        .unwrap();
    let secret_name = crate::rotation::secret_of_pod(&s.client, &s.ns, "app=app").await;
    support::eventually(
        Duration::from_secs(20),
        "the baseline on the Deployment",
        || async {
            let d = deployments.get("app").await.unwrap();
            d.metadata
                .annotations
                .is_some_and(|a| a.contains_key("kvinject.io/secret-versions"))
        },
    )
    .await;

    // Holds the first write that changes the Secret's value until the test releases it.
    let armed = Arc::new(AtomicBool::new(true));
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel::<()>();
    let release = Arc::new(tokio::sync::Notify::new());
    let hook: Hook = {
        let (armed, release) = (armed.clone(), release.clone());
        Arc::new(move |review: Value| {
            let request = &review["request"];
            let hold = request["object"]["data"] != request["oldObject"]["data"]
                && armed.swap(false, Ordering::SeqCst);
            let (held_tx, release) = (held_tx.clone(), release.clone());
            Box::pin(async move {
                if hold {
                    let _ = held_tx.send(());
                    let _ = tokio::time::timeout(Duration::from_secs(10), release.notified()).await;
                }
                true
            })
        })
    };
    let _hook = secret_webhook(&s, &["UPDATE"], hook).await;

    // The Deployment's other writer: merge patches, many a second, throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let contender = {
        let (client, ns) = (s.client.clone(), s.ns.clone());
        let (stop, written) = (stop.clone(), written.clone());
        tokio::spawn(async move {
            let deployments: Api<Deployment> = Api::namespaced(client, &ns);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let note = json!({"metadata": {"annotations": {"example.com/synced": n.to_string()}}});
                deployments
                    .patch("app", &PatchParams::default(), &Patch::Merge(&note))
                    .await
                    .expect("the other writer patches the Deployment");
                written.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let new_value = support::distinctive_value();
    let v2 = support::seed_secret(&name, &new_value).await;
    tokio::time::timeout(Duration::from_secs(30), held.recv())
        .await
        .expect("kvinject writes the new value within 30 s");
    // kvinject's write is in the apiserver now; someone else's lands first.
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let label = json!({"metadata": {"labels": {"example.com/owner": "team-a"}}});
    secrets
        .patch(&secret_name, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("the other writer labels the Secret");
    release.notify_one();

    support::eventually(
        Duration::from_secs(30),
        "the Secret to follow the new version",
        || async {
            let now = secrets.get(&secret_name).await.unwrap();
            version(&now) == v2 && now.data.as_ref().unwrap()["value"].0 == new_value.as_bytes()
        },
    )
    .await;
    support::eventually(Duration::from_secs(30), "the Deployment to roll", || async {
        Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns)
            .list(&ListParams::default().labels("app=app"))
            .await
            .unwrap()
            .items
            .len()
            == 2
    })
    .await;
    // Several more reconciles while the Deployment's writer goes on.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    contender.await.unwrap();

    let logs = s.kvinject.strict_logs();
    assert!(
        logs.contains("conflict; writing again on the current Secret"),
        "kvinject's write met the conflict (log: {})",
        s.kvinject.log.display()
    );
    let secret = secrets.get(&secret_name).await.unwrap();
    assert_eq!(
        secret
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("example.com/owner"))
            .map(String::as_str),
        Some("team-a"),
        "the other writer's label stays"
    );
    let rsets = Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns)
        .list(&ListParams::default().labels("app=app"))
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(rsets, 2, "the Deployment rolled exactly once");
    let rollouts = Api::<Event>::namespaced(s.client.clone(), &s.ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("RolloutOnRotation")
                && e.involved_object.name.as_deref() == Some("app")
        })
        .map(|e| e.count.unwrap_or(1))
        .sum::<i32>();
    assert_eq!(rollouts, 1, "one RolloutOnRotation Event for the Deployment");
    let last = written.load(Ordering::SeqCst).to_string();
    let d = deployments.get("app").await.unwrap();
    assert_eq!(
        d.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("example.com/synced")),
        Some(&last),
        "the Deployment's other writer's annotation stays"
    );
}

/// What a validating webhook on the test namespace's Secrets does with each review: sleep (a
/// slow apiserver), or hold a write while someone else writes; then it allows the write, or
/// refuses it (false), as a policy engine would.
type Hook = Arc<dyn Fn(Value) -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// A validating webhook on Secret CREATE and `operations` in the test namespace, served here;
/// the apiserver runs `hook` within every such write. Deregistered on drop.
struct SecretWebhook {
    seen: Arc<AtomicU64>,
    _server: tokio::task::JoinHandle<()>,
    name: String,
}

impl Drop for SecretWebhook {
    fn drop(&mut self) {
        support::delete_from_drop::<ValidatingWebhookConfiguration>(self.name.clone());
    }
}

async fn validate(
    State((hook, seen)): State<(Hook, Arc<AtomicU64>)>,
    Json(review): Json<Value>,
) -> Json<Value> {
    seen.fetch_add(1, Ordering::SeqCst);
    let uid = review["request"]["uid"].clone();
    let allowed = review["request"]["dryRun"] == json!(true) || hook(review).await;
    Json(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": uid, "allowed": allowed,
                             "status": {"code": 403, "message": "refused by the test's policy"}}}),
    )
}

async fn secret_webhook(s: &Setup, operations: &[&str], hook: Hook) -> SecretWebhook {
    webhook_with_rules(s, operations, vec![], hook).await
}

/// `secret_webhook`, also called for the writes `more` rules select.
async fn webhook_with_rules(
    s: &Setup,
    operations: &[&str],
    more: Vec<RuleWithOperations>,
    hook: Hook,
) -> SecretWebhook {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let bed = support::testbed();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&bed.webhook_cert, &bed.webhook_key)
        .await
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/validate", post(validate))
        .with_state((hook, seen.clone()));
    let server = tokio::spawn(async move {
        let _ = axum_server::from_tcp_rustls(listener, tls)
            .unwrap()
            .serve(app.into_make_service())
            .await;
    });
    let name = support::unique("secret-hook");
    let webhook = ValidatingWebhook {
        name: format!("{name}.kvinject.test"),
        admission_review_versions: vec!["v1".into()],
        client_config: WebhookClientConfig {
            url: Some(format!("https://127.0.0.1:{port}/validate")),
            ca_bundle: Some(ByteString(std::fs::read(&bed.ca).unwrap())),
            service: None,
        },
        rules: Some(
            std::iter::once(RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                // CREATE always: the dry-run probe below finds the webhook registered through it.
                operations: Some(
                    std::iter::once("CREATE")
                        .chain(operations.iter().copied())
                        .map(str::to_owned)
                        .collect(),
                ),
                resources: Some(vec!["secrets".into()]),
                scope: Some("Namespaced".into()),
            })
            .chain(more)
            .collect(),
        ),
        namespace_selector: Some(LabelSelector {
            match_labels: Some([("kvinject.test/suite".to_owned(), s.label.clone())].into()),
            ..Default::default()
        }),
        side_effects: "NoneOnDryRun".into(),
        failure_policy: Some("Fail".into()),
        timeout_seconds: Some(20),
        ..Default::default()
    };
    let mut config = ValidatingWebhookConfiguration::default();
    config.metadata.name = Some(name.clone());
    config.webhooks = Some(vec![webhook]);
    Api::<ValidatingWebhookConfiguration>::all(s.client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
    let hook = SecretWebhook {
        seen,
        _server: server,
        name,
    };
    // Wait until the apiserver calls it: a dry-run Secret creation reaches it.
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let probe: Secret = serde_json::from_value(json!({"metadata": {"name": "hook-probe"}})).unwrap();
    support::eventually(
        Duration::from_secs(20),
        "the Secret webhook to be called",
        || async {
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let _ = secrets.create(&dry, &probe).await;
            hook.seen.load(Ordering::SeqCst) > 0
        },
    )
    .await;
    hook
}

/// Creating the Secret takes longer than the admission deadline: the pod is denied in time,
/// with a message that says so, and the next attempt is admitted, with one Secret for the
/// reference, whether the slow creation went through after all or not.
#[tokio::test]
async fn a_secret_creation_slower_than_the_deadline_denies_in_time_and_the_next_attempt_reuses_it() {
    let _vault = support::VAULT.read().await;
    let s = support::setup(
        "slow-api",
        &[
            "--admission-deadline",
            "3s",
            "--keyvault-timeout",
            "1s",
            "--keyvault-retries",
            "0",
        ],
    )
    .await;
    let name = support::unique("slow-create");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let delay_ms = Arc::new(AtomicU64::new(5000));
    let hook: Hook = {
        let delay_ms = delay_ms.clone();
        Arc::new(move |_| {
            let delay = Duration::from_millis(delay_ms.load(Ordering::SeqCst));
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                true
            })
        })
    };
    let _slow = secret_webhook(&s, &[], hook).await;

    let started = Instant::now();
    let err = create(&s, &pod("first", &[("X", &reference(&name))], json!({})))
        .await
        .expect_err("denied: the Secret could not be created within the deadline");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "denied after {took:?}, near the 3 s deadline"
    );
    assert!(err.contains("could not decide within 3s"), "{err}");

    // The slow creation ends one way or the other; then the apiserver is fast again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    delay_ms.store(0, Ordering::SeqCst);
    let admitted = create(&s, &pod("second", &[("X", &reference(&name))], json!({})))
        .await
        .expect("the next attempt is admitted");
    let used = crate::inject::secret_key_ref(&admitted, "X").expect("rewritten to a secretKeyRef");
    let ours: Vec<Secret> = Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=kvinject"))
        .await
        .unwrap()
        .items;
    assert_eq!(
        ours.iter()
            .map(|x| x.metadata.name.clone().unwrap())
            .collect::<Vec<_>>(),
        vec![used],
        "one Secret for the reference, and the pod uses it"
    );
}

/// The apiserver refuses kvinject's write of a new version once (a policy webhook says no):
/// the write is made again at a coming sweep, seconds later, not at the next check a whole
/// refresh interval (here 30 s) away.
#[tokio::test]
async fn a_refused_rotation_write_is_retried_within_seconds() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let s = rotation_setup_every("refused", "1h", &[]).await;
    let name = support::unique("refused");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let mut d = deployment("app", &name, json!({}));
    d.spec
        .as_mut()
        .unwrap()
        .template
        .metadata
        .as_mut()
        .unwrap()
        .annotations
        .as_mut()
        .unwrap()
        .insert("kvinject.io/refresh-interval".into(), "30s".into());
    Api::<Deployment>::namespaced(s.client.clone(), &s.ns)
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let secret_name = crate::rotation::secret_of_pod(&s.client, &s.ns, "app=app").await;

    let armed = Arc::new(AtomicBool::new(true));
    let (refused_tx, mut refused) = tokio::sync::mpsc::unbounded_channel::<()>();
    let hook: Hook = {
        let armed = armed.clone();
        Arc::new(move |review: Value| {
            let request = &review["request"];
            let refuse = request["object"]["data"] != request["oldObject"]["data"]
                && armed.swap(false, Ordering::SeqCst);
            if refuse {
                let _ = refused_tx.send(());
            }
            Box::pin(async move { !refuse })
        })
    };
    let _hook = secret_webhook(&s, &["UPDATE"], hook).await;
    let v2 = support::seed_secret(&name, &support::distinctive_value()).await;
    tokio::time::timeout(Duration::from_secs(45), refused.recv())
        .await
        .expect("kvinject writes the new value at its first check (within 30 s)");
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let refused_at = Instant::now();
    support::eventually(
        Duration::from_secs(10),
        "the refused write made again within seconds",
        || async { version(&secrets.get(&secret_name).await.unwrap()) == v2 },
    )
    .await;
    eprintln!("written {:?} after the refusal", refused_at.elapsed());
    assert!(
        s.kvinject
            .strict_logs()
            .contains("could not update the Secret; retrying at the next sweep"),
        "the refusal is logged: {}",
        s.kvinject.log.display()
    );
}

/// The leader updates a Secret to a new version, then cannot roll the Deployment (a policy
/// webhook refuses its patch) and crashes (SIGKILL). The next leader finds the versions the
/// Deployment records older than its Secrets' and rolls it, once.
#[tokio::test]
async fn a_rollout_lost_to_a_crash_is_made_by_the_next_leader() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let lease = support::unique("lease");
    let args = crate::rotation::rotation_args(&lease, "1h");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut s = support::setup("crash", &args).await;
    let name = support::unique("crash");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    deployments
        .create(
            &PostParams::default(),
            &deployment("app", &name, json!({"kvinject.io/rollout-on-rotation": "true"})),
        )
        .await
        .unwrap();
    let secret_name = crate::rotation::secret_of_pod(&s.client, &s.ns, "app=app").await;
    support::eventually(Duration::from_secs(20), "the baseline", || async {
        crate::rotation::stored_hash(&deployments.get("app").await.unwrap()).is_some()
    })
    .await;

    // Refuses every change of the Deployment's pod template while armed.
    let armed = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicU64::new(0));
    let hook: Hook = {
        let (armed, refused) = (armed.clone(), refused.clone());
        Arc::new(move |review: Value| {
            let request = &review["request"];
            let refuse = request["kind"]["kind"] == "Deployment"
                && request["object"]["spec"]["template"] != request["oldObject"]["spec"]["template"]
                && armed.load(Ordering::SeqCst);
            if refuse {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            Box::pin(async move { !refuse })
        })
    };
    let deployment_updates = RuleWithOperations {
        api_groups: Some(vec!["apps".into()]),
        api_versions: Some(vec!["v1".into()]),
        operations: Some(vec!["UPDATE".into()]),
        resources: Some(vec!["deployments".into()]),
        scope: Some("Namespaced".into()),
    };
    let _hook = webhook_with_rules(&s, &[], vec![deployment_updates], hook).await;
    let v2 = support::seed_secret(&name, &support::distinctive_value()).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    support::eventually(
        Duration::from_secs(20),
        "the Secret updated and the rollout refused",
        || async {
            version(&secrets.get(&secret_name).await.unwrap()) == v2 && refused.load(Ordering::SeqCst) > 0
        },
    )
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &s.kvinject.pid().to_string()])
        .status();
    armed.store(false, Ordering::SeqCst);
    assert_eq!(
        Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns)
            .list(&ListParams::default().labels("app=app"))
            .await
            .unwrap()
            .items
            .len(),
        1,
        "nothing rolled before the crash"
    );

    // The next leader, on the same Lease (after it expires).
    s.kvinject.restart(&args).await;
    support::eventually(
        Duration::from_secs(30),
        "the rollout by the next leader",
        || async {
            Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns)
                .list(&ListParams::default().labels("app=app"))
                .await
                .unwrap()
                .items
                .len()
                == 2
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns)
            .list(&ListParams::default().labels("app=app"))
            .await
            .unwrap()
            .items
            .len(),
        2,
        "rolled once"
    );
}
