//! Faults on the Key Vault side (reliability issue, part 2). The bed's vault injects each
//! fault the way a client sees it (tests/testbed/kvstandin.py, `/_testbed/fault`), and for
//! each one:
//! - pods whose references are materialized are admitted, with the outage warning;
//! - a first use is denied within the admission deadline, with a message that names the fault;
//! - nothing panics;
//! - the runtime's task count and the RSS come back to their baseline once the fault ends;
//! - the next admission after recovery succeeds, with no restart.
//!
//! A vault that is slow but answers within `--keyvault-timeout` is not a fault: there, the
//! test checks that everything works as usual, without a warning.

use crate::{inject::reference, support};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// kvinject's Key Vault budget in these tests: two attempts of one second, well inside the
/// admission deadline.
const KV_TIMEOUT: &str = "1s";
const DEADLINE: Duration = Duration::from_secs(6);
/// First uses tried during each fault: a leak of one task per request would show as this many.
const FIRST_USES: usize = 5;

/// Sets a vault fault, ended when the guard is dropped (however the test ends).
async fn fault_on(fault: Value) -> support::EndVaultFaults {
    support::vault_fault(Some(fault)).await;
    support::EndVaultFaults
}

/// What a fault must do to kvinject.
struct Expect {
    /// Whether the vault counts as down (materialized pods get the outage warning, first
    /// uses are denied).
    outage: bool,
    /// Fragments the denial of a first use (and the warning) must contain.
    names: &'static [&'static str],
    /// kvinject's own token is lost meanwhile (a restart), so that Entra ID is asked.
    restart_during: bool,
}

fn manifest(ns: &str, name: &str, r: &str) -> String {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {"containers": [{"name": "app", "image": "registry.invalid/a", "env": [{"name": "X", "value": r}]}]}})
    .to_string()
}

/// Creates a pod with kubectl, which prints admission warnings: (admitted, stderr, time taken).
fn kubectl_create(ns: &str, name: &str, r: &str) -> (bool, String, Duration) {
    let started = Instant::now();
    let (ok, _, stderr) = support::kubectl(&["create", "-f", "-"], Some(&manifest(ns, name, r)));
    (ok, stderr, started.elapsed())
}

async fn vault_up(k: &support::Kvinject) -> Option<f64> {
    k.metric_if_exported("kvinject_keyvault_up", &[]).await
}

async fn survive(fault: Value, expect: Expect) {
    let _vault = support::VAULT.write().await; // no other test may use the vault meanwhile
    let mut s = support::setup(
        "fault",
        &["--keyvault-timeout", KV_TIMEOUT, "--keyvault-retries", "1"],
    )
    .await;
    let known = support::unique("fault-known");
    support::seed_secret(&known, &support::distinctive_value()).await;
    let firsts: Vec<String> = (0..=FIRST_USES)
        .map(|i| support::unique(&format!("fault-first{i}")))
        .collect();
    for f in &firsts {
        support::seed_secret(f, &support::distinctive_value()).await;
    }
    let (ok, stderr, _) = kubectl_create(&s.ns, "before", &reference(&known));
    assert!(ok, "admitted while the vault is fine: {stderr}");

    let _fault = fault_on(fault.clone()).await;
    if expect.restart_during {
        // A rescheduled replica: it has no token, so it must ask Entra ID.
        s.kvinject
            .restart(&["--keyvault-timeout", KV_TIMEOUT, "--keyvault-retries", "1"])
            .await;
    }
    // Baseline: the process as it serves, after a few admissions of each kind, fault on.
    for i in 0..3 {
        kubectl_create(&s.ns, &format!("warm{i}"), &reference(&known));
    }
    let tasks = s
        .kvinject
        .strict_metric("kvinject_runtime_alive_tasks", &[])
        .await;
    let rss = s
        .kvinject
        .strict_metric("kvinject_process_resident_memory_bytes", &[])
        .await;

    if expect.outage {
        support::eventually(
            Duration::from_secs(20),
            &format!("kvinject to see {fault} as an outage"),
            || async { vault_up(&s.kvinject).await == Some(0.0) },
        )
        .await;
    }
    let (ok, stderr, _) = kubectl_create(&s.ns, "during", &reference(&known));
    assert!(ok, "{fault}: a materialized reference is admitted: {stderr}");
    if expect.outage {
        assert!(
            stderr.contains("Warning:") && stderr.contains("Key Vault is unreachable"),
            "{fault}: kubectl shows the outage warning: {stderr}"
        );
        for name in expect.names {
            assert!(
                stderr.contains(name),
                "{fault}: the warning names the fault ({name}): {stderr}"
            );
        }
    } else {
        assert!(!stderr.contains("Warning:"), "{fault}: no warning: {stderr}");
    }

    for (i, first) in firsts[..FIRST_USES].iter().enumerate() {
        let (ok, stderr, took) = kubectl_create(&s.ns, &format!("first{i}"), &reference(first));
        assert!(
            took < DEADLINE,
            "{fault}: answered in {took:?}, within the deadline {DEADLINE:?}"
        );
        if expect.outage {
            assert!(!ok, "{fault}: a first use is denied");
            for name in expect.names {
                assert!(
                    stderr.contains(name),
                    "{fault}: the denial names the fault ({name}): {stderr}"
                );
            }
            assert!(
                stderr.contains(first.as_str()),
                "{fault}: the denial names the reference: {stderr}"
            );
        } else {
            assert!(ok, "{fault}: a first use is admitted: {stderr}");
        }
    }

    support::vault_fault(None).await;
    // The very next admission, with no restart: a first use (it reads Key Vault).
    let (ok, stderr, _) = kubectl_create(&s.ns, "after", &reference(&firsts[FIRST_USES]));
    assert!(
        ok,
        "{fault}: the next admission after recovery is admitted: {stderr}"
    );
    assert!(
        !stderr.contains("Warning:"),
        "{fault}: no warning after recovery: {stderr}"
    );

    // Tasks: the webhook's connections from the apiserver are tasks too, and the apiserver
    // keeps a few idle ones; a task left behind by each failed request would be 5 more.
    let until = Instant::now() + Duration::from_secs(15);
    let mut now_tasks = s
        .kvinject
        .strict_metric("kvinject_runtime_alive_tasks", &[])
        .await;
    while now_tasks > tasks + 2.0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        now_tasks = s
            .kvinject
            .strict_metric("kvinject_runtime_alive_tasks", &[])
            .await;
    }
    assert!(
        now_tasks <= tasks + 2.0,
        "{fault}: {now_tasks} tasks after the fault, {tasks} before it (log: {})",
        s.kvinject.log.display()
    );
    let after = s
        .kvinject
        .strict_metric("kvinject_process_resident_memory_bytes", &[])
        .await;
    assert!(
        after <= rss + 4.0 * 1024.0 * 1024.0,
        "{fault}: RSS {after} came back near its baseline {rss} (within 4 MiB)"
    );
    let logs = s.kvinject.strict_logs();
    assert!(
        !logs.contains("panicked"),
        "{fault}: nothing panicked: {}",
        s.kvinject.log.display()
    );
}

#[tokio::test]
async fn a_vault_slower_than_the_timeout_is_an_outage_named_as_a_timeout() {
    survive(
        json!({"latency": 1.3}),
        Expect {
            outage: true,
            names: &["did not answer within"],
            restart_during: false,
        },
    )
    .await;
}

#[tokio::test]
async fn a_vault_slow_but_within_the_timeout_is_not_a_fault() {
    survive(
        json!({"latency": 0.7}),
        Expect {
            outage: false,
            names: &[],
            restart_during: false,
        },
    )
    .await;
}

#[tokio::test]
async fn a_throttling_vault_is_named_with_its_retry_after() {
    survive(
        json!({"status": 429, "retry_after": 7}),
        Expect {
            outage: true,
            names: &["throttling", "429", "retry after 7s"],
            restart_during: false,
        },
    )
    .await;
}

#[tokio::test]
async fn a_vault_answering_500_is_an_outage() {
    survive(
        json!({"status": 500}),
        Expect {
            outage: true,
            names: &["HTTP 500"],
            restart_during: false,
        },
    )
    .await;
}

#[tokio::test]
async fn a_vault_answering_503_is_an_outage() {
    survive(
        json!({"status": 503}),
        Expect {
            outage: true,
            names: &["HTTP 503"],
            restart_during: false,
        },
    )
    .await;
}

#[tokio::test]
async fn a_connection_reset_mid_answer_is_an_outage() {
    survive(
        json!({"reset": true}),
        Expect {
            outage: true,
            names: &["could not be reached"],
            restart_during: false,
        },
    )
    .await;
}

#[tokio::test]
async fn a_vault_certificate_the_ca_did_not_sign_is_refused() {
    survive(
        json!({"untrusted_cert": true}),
        Expect {
            outage: true,
            names: &["could not be reached", "UnknownIssuer"],
            restart_during: false,
        },
    )
    .await;
}

#[tokio::test]
async fn a_token_endpoint_that_is_down_is_an_authentication_outage() {
    survive(
        json!({"token": "down"}),
        Expect {
            outage: true,
            names: &["could not authenticate"],
            restart_during: true,
        },
    )
    .await;
}

#[tokio::test]
async fn a_token_endpoint_answering_500_is_an_authentication_outage() {
    survive(
        json!({"token": 500}),
        Expect {
            outage: true,
            names: &["could not authenticate", "500"],
            restart_during: true,
        },
    )
    .await;
}
