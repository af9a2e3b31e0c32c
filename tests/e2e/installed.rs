//! kvinject installed as a platform team installs it: `helm install` of the chart, with
//! kvinject's own image (built here without an engine, tests/testbed/image), running as two
//! pods on the bed's two nodes. The apiserver calls them through the chart's Service (the
//! bed's apiserver routes Service-backed webhooks to the Service's endpoints,
//! --enable-aggregator-routing, as there is no kube-proxy), with the chart's RBAC, policies
//! and certificate bootstrap. Then a labelled namespace, an AccessPolicy and a Deployment
//! with an `akv://` reference, whose container prints what it got; and a drain of one
//! replica under load, with the chart's PodDisruptionBudget.
//!
//! What the bed needs beyond a user's values, each a chart value a user may need too:
//! hostNetwork (the bed has no pod network; pods reach the apiserver and the vault on
//! 127.0.0.1, so KUBERNETES_SERVICE_HOST/PORT point there), the bed's CA (extraVolumes and
//! KVINJECT_AZURE_CA_BUNDLE), a client-secret credential (the bed has no workload identity
//! webhook), and the nodes' taint tolerated.

use crate::{
    install::INSTALL,
    node::{node_deployment, node_template, ready_with_in},
    support,
};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration, apps::v1::Deployment, core::v1::Pod,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

const NS: &str = "kvinject";

fn helm(args: &[&str]) -> (bool, String) {
    let bed = support::testbed();
    let out = Command::new(crate::install::helm_bin())
        .args(args)
        .arg("--kubeconfig")
        .arg(&bed.kubeconfig)
        .current_dir(crate::install::repo())
        .output()
        .expect("running helm");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn port_of(url: &str) -> &str {
    url.trim_end_matches('/').rsplit(':').next().unwrap()
}

/// The values a platform team would write, plus what the bed needs (see the header).
fn chart_values() -> String {
    let bed = support::testbed();
    let apiserver_port = std::env::var("KVINJECT_TESTBED_APISERVER")
        .ok()
        .or_else(|| {
            std::fs::read_to_string(bed.dir.join("apiserver.port"))
                .ok()
                .map(|p| format!("https://127.0.0.1:{}", p.trim()))
        })
        .unwrap();
    json!({
        "vaults": [format!("{}={}", bed.vault_name, bed.vault_url)],
        "image": {"repository": "localhost/kvinject", "tag": "bed", "pullPolicy": "Never"},
        "replicaCount": 2,
        "hostNetwork": true,
        "tolerations": [{"key": "kvinject.test/node", "operator": "Exists", "effect": "NoSchedule"}],
        "azure": {
            "credential": "client-secret", "workloadIdentity": false,
            "tenantId": "testbed-tenant", "clientId": "kvinject-tests",
            "clientSecretRef": "kvinject-azure", "authorityHost": bed.authority,
        },
        // The apiserver calls from the nodes' addresses (the bed enforces no policy).
        "networkPolicy": {"from": [{"ipBlock": {"cidr": "10.244.76.0/24"}}]},
        "keyVault": {"probeInterval": "2s"},
        "extraEnv": [
            {"name": "KVINJECT_AZURE_CA_BUNDLE", "value": "/etc/kvinject/bed-ca/ca.crt"},
            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": port_of(&apiserver_port)},
        ],
        "extraVolumes": [{"name": "bed-ca", "configMap": {"name": "bed-ca"}}],
        "extraVolumeMounts": [{"name": "bed-ca", "mountPath": "/etc/kvinject/bed-ca", "readOnly": true}],
    })
    .to_string()
}

/// Removes the release and whatever the other install tests applied of the chart, so that
/// helm owns every object it installs (and the next install test starts clean).
fn remove_chart(values: &Path) {
    let _ = helm(&["uninstall", "kvinject", "-n", NS, "--wait", "--timeout", "60s"]);
    let (ok, rendered) = helm(&[
        "template",
        "kvinject",
        "deploy/helm/kvinject",
        "-n",
        NS,
        "-f",
        values.to_str().unwrap(),
    ]);
    assert!(ok, "helm template: {rendered}");
    let _ = support::kubectl(
        &["delete", "--ignore-not-found", "--wait=true", "-f", "-"],
        Some(&rendered),
    );
    let _ = support::kubectl(
        &[
            "delete",
            "namespace",
            NS,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=90s",
        ],
        None,
    );
}

struct Uninstall(PathBuf);
impl Drop for Uninstall {
    fn drop(&mut self) {
        remove_chart(&self.0);
    }
}

/// Builds and imports the image, and installs the chart as a platform team would (the
/// caller holds VAULT, ROTATION and INSTALL); uninstalls when dropped.
async fn install_chart() -> Uninstall {
    let bed = support::testbed();
    let out = Command::new(crate::install::repo().join("tests/testbed/image"))
        .output()
        .expect("running tests/testbed/image");
    assert!(
        out.status.success(),
        "building and importing kvinject's image:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let values = bed.dir.join("installed-values.json");
    std::fs::write(&values, chart_values()).unwrap();
    remove_chart(&values);
    let uninstall = Uninstall(values.clone());
    // What the platform team prepares: the namespace, the credential's Secret and (here)
    // the bed's CA.
    let (ok, out, err) = support::kubectl(&["create", "namespace", NS], None);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = support::kubectl(
        &[
            "-n",
            NS,
            "create",
            "secret",
            "generic",
            "kvinject-azure",
            "--from-literal=AZURE_CLIENT_SECRET=testbed-client-secret",
        ],
        None,
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = support::kubectl(
        &[
            "-n",
            NS,
            "create",
            "configmap",
            "bed-ca",
            &format!("--from-file=ca.crt={}", bed.ca.display()),
        ],
        None,
    );
    assert!(ok, "{out}{err}");

    let (ok, out) = helm(&[
        "install",
        "kvinject",
        "deploy/helm/kvinject",
        "-n",
        NS,
        "-f",
        values.to_str().unwrap(),
        "--wait",
        "--timeout",
        "180s",
    ]);
    if !ok {
        let (_, describe, _) = support::kubectl(&["-n", NS, "describe", "pods"], None);
        let (_, logs, _) = support::kubectl(&["-n", NS, "logs", "deploy/kvinject", "--tail=40"], None);
        panic!("helm install:\n{out}\n{describe}\n{logs}");
    }

    uninstall
}

/// kvinject's pods, by name.
async fn kvinject_pods(client: &kube::Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels("app.kubernetes.io/name=kvinject"))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn helm_install_runs_kvinjects_image_on_the_nodes_and_a_deployment_gets_its_value() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let _install = INSTALL.lock().await;
    let _uninstall = install_chart().await;
    let client = support::kube().await;
    assert!(support::testbed().nodes.len() >= 2, "the bed runs two nodes");
    // kvinject runs as two pods of its own image, one on each node (the chart spreads them).
    let ours = kvinject_pods(&client).await;
    assert_eq!(ours.len(), 2, "two replicas");
    let mut on: Vec<String> = ours
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone().unwrap())
        .collect();
    on.sort();
    assert_eq!(on, support::testbed().nodes, "one replica on each node");
    for p in &ours {
        let image = p.spec.as_ref().unwrap().containers[0].image.as_deref();
        assert_eq!(image, Some("localhost/kvinject:bed"));
    }
    // The webhook is registered through the Service, with the CA the bootstrap made.
    let mwc = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get("kvinject")
        .await
        .unwrap();
    let config = &mwc.webhooks.as_ref().unwrap()[0].client_config;
    assert!(config.url.is_none() && config.service.is_some(), "{config:?}");
    assert!(config.ca_bundle.is_some(), "the bootstrap set the caBundle");

    // A team's namespace opts in; its AccessPolicy grants; its Deployment starts with the value.
    let ns = support::namespace(&client, "installed", &[("kvinject.io/injection", "enabled")]).await;
    let _ns = support::NamespaceGuard(ns.clone());
    let _policy = support::grant_all(&client, &ns).await;
    let name = support::unique("installed");
    let value = support::distinctive_value();
    support::seed_secret(&name, &value).await;
    let template = node_template("app", &name, json!({}), json!({}));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    // The webhook's caBundle and the Service's endpoints reach the apiserver within seconds.
    support::eventually(
        Duration::from_secs(30),
        "the Deployment to be created",
        || async {
            deployments
                .create(
                    &PostParams::default(),
                    &node_deployment("app", 1, template.clone(), json!({})),
                )
                .await
                .is_ok()
        },
    )
    .await;
    let pods = ready_with_in(&client, &ns, "app", 1, &value, Duration::from_secs(90)).await;
    let env = &pods[0].spec.as_ref().unwrap().containers[0].env.as_ref().unwrap()[0];
    assert!(
        env.value.is_none() && env.value_from.as_ref().unwrap().secret_key_ref.is_some(),
        "the reference was rewritten by the installed webhook"
    );
}

/// The Dockerfile's runtime stage, as the lines that shape the image.
struct Runtime {
    files: Vec<String>,
    env: Vec<String>,
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

fn dockerfile_runtime() -> Runtime {
    let text = std::fs::read_to_string(crate::install::repo().join("Dockerfile")).unwrap();
    let stage = text.rsplit("\nFROM ").next().unwrap();
    assert!(stage.starts_with("scratch"), "the runtime stage is FROM scratch");
    let mut r = Runtime {
        files: vec![],
        env: vec![],
        user: String::new(),
        entrypoint: vec![],
        cmd: vec![],
    };
    let exec_form = |s: &str| serde_json::from_str::<Vec<String>>(s.trim()).expect("exec form");
    for line in stage.lines() {
        let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
        match op {
            "COPY" => r.files.push(rest.split_whitespace().last().unwrap().to_owned()),
            "ENV" => r.env.push(rest.trim().to_owned()),
            "USER" => r.user = rest.trim().to_owned(),
            "ENTRYPOINT" => r.entrypoint = exec_form(rest),
            "CMD" => r.cmd = exec_form(rest),
            _ => {}
        }
    }
    r
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

#[tokio::test]
async fn the_image_built_here_is_what_the_dockerfile_describes() {
    let out = Command::new(crate::install::repo().join("tests/testbed/image"))
        .arg("--no-import")
        .output()
        .expect("running tests/testbed/image");
    assert!(
        out.status.success(),
        "building kvinject's image:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layout = crate::install::repo().join("target/image/kvinject-oci");
    let read = |p: PathBuf| serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap();
    let index = read(layout.join("index.json"));
    let manifest = read(blob(&layout, index["manifests"][0]["digest"].as_str().unwrap()));
    let config = read(blob(&layout, manifest["config"]["digest"].as_str().unwrap()));
    let want = dockerfile_runtime();
    let c = &config["config"];
    assert_eq!(c["User"], json!(want.user));
    assert_eq!(c["Entrypoint"], json!(want.entrypoint));
    assert_eq!(c["Cmd"], json!(want.cmd));
    let env: Vec<String> = serde_json::from_value(c["Env"].clone()).unwrap();
    assert_eq!(
        env, want.env,
        "the image's environment is the Dockerfile's ENV, nothing more"
    );

    // The layers hold exactly the files the Dockerfile copies (and their directories).
    let mut files = vec![];
    for layer in manifest["layers"].as_array().unwrap() {
        let list = Command::new("tar")
            .arg("-tzf")
            .arg(blob(&layout, layer["digest"].as_str().unwrap()))
            .output()
            .unwrap();
        assert!(list.status.success());
        files.extend(
            String::from_utf8_lossy(&list.stdout)
                .lines()
                .filter(|l| *l != "." && !l.ends_with('/'))
                .map(|l| format!("/{}", l.trim_start_matches("./"))),
        );
    }
    files.sort();
    let mut expected = want.files.clone();
    expected.sort();
    assert_eq!(files, expected);

    // The binary is static: it needs nothing from an empty base.
    let binary = crate::install::repo().join("target/image/x86_64-unknown-linux-gnu/dist/kvinject");
    let ldd = Command::new("ldd").arg(&binary).output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(
        said.contains("statically linked") || said.contains("not a dynamic executable"),
        "{said}"
    );
}

/// The chart's PodDisruptionBudget's status, for a message: generation seen, healthy pods,
/// evictions allowed, pods being disrupted.
async fn budget(client: &kube::Client) -> (bool, i32, i32, usize) {
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
        .get("kvinject")
        .await
        .unwrap();
    let status = pdb.status.unwrap_or_default();
    (
        status.observed_generation >= pdb.metadata.generation,
        status.current_healthy,
        status.disruptions_allowed,
        status.disrupted_pods.map_or(0, |d| d.len()),
    )
}

#[tokio::test]
async fn a_drained_replica_is_replaced_while_the_other_keeps_admitting_and_the_budget_holds() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let _install = INSTALL.lock().await;
    let _uninstall = install_chart().await;
    let client = support::kube().await;
    let ns = support::namespace(&client, "drained", &[("kvinject.io/injection", "enabled")]).await;
    let _ns = support::NamespaceGuard(ns.clone());
    let _policy = support::grant_all(&client, &ns).await;
    let name = support::unique("drained");
    support::seed_secret(&name, &support::distinctive_value()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let reference = crate::inject::reference(&name);
    let pod = move |i: usize| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("load-{i}")},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                      "env": [{"name": "X", "value": reference}]}]}
        }))
        .unwrap()
    };
    // The first admission materializes; then a steady load of pod creations.
    support::eventually(Duration::from_secs(30), "the first pod admitted", || async {
        pods.create(&PostParams::default(), &pod(0)).await.is_ok()
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (pods, stop) = (pods.clone(), stop.clone());
        let pod = pod.clone();
        async move {
            let (mut ok, mut failed) = (0usize, vec![]);
            let mut i = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match pods.create(&PostParams::default(), &pod(i)).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                i += 1;
            }
            (ok, failed)
        }
    });

    // What `kubectl drain` meets: both replicas Ready, and the budget's status computed by
    // the disruption controller (the eviction API judges by that status, and refuses with
    // 429 while it is not yet computed, which drain retries).
    support::eventually(
        Duration::from_secs(60),
        "the budget to allow one eviction",
        || async {
            let ready = kvinject_pods(&client)
                .await
                .iter()
                .filter(|p| crate::node::is_ready(p))
                .count();
            ready == 2 && budget(&client).await == (true, 2, 1, 0)
        },
    )
    .await;
    let ours: Vec<String> = kvinject_pods(&client)
        .await
        .iter()
        .filter(|p| crate::node::is_ready(p))
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    // Each eviction's own answer: kube's client would retry the 429 until it is allowed.
    let ours_api: Api<Pod> = Api::namespaced(support::kube_without_retry().await, NS);
    let evict = |name: String| {
        let api = ours_api.clone();
        async move { api.evict(&name, &Default::default()).await }
    };
    let (first, second) = (ours[0].clone(), ours[1].clone());
    // A drain evicts one replica: allowed (two healthy, the budget keeps one).
    evict(first.clone()).await.expect("the first eviction is allowed");
    // The other may not go while the first is being replaced: the budget refuses it.
    match evict(second.clone()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 429, "refused by the budget: {}", s.message),
        other => panic!(
            "the second eviction must be refused, got {other:?}; the budget (observed, healthy, allowed, disrupted): {:?}",
            budget(&client).await
        ),
    }
    // The replacement becomes Ready (on the node the evicted replica left).
    support::eventually(Duration::from_secs(90), "a Ready replacement", || async {
        let now = kvinject_pods(&client).await;
        now.iter()
            .filter(|p| p.metadata.name.as_deref() != Some(first.as_str()))
            .filter(|p| crate::node::is_ready(p))
            .count()
            == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} admissions failed during the drain: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok >= 20, "a load was running: {ok} pods admitted");
    eprintln!("{ok} pods admitted during the drain, none refused");
}
