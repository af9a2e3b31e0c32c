//! Rotation checks from the vault's listing (performance issue, part 3), on a vault of the
//! test's own (`other`: the bed's vault keeps each host's secrets apart, as Azure does), so
//! that the listing holds this test's secrets and no one else's.

use crate::{
    inject::{create, pod},
    rotation::{rotation_setup_every, version},
    support,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::ListParams};
use serde_json::json;
use std::time::Duration;

const REFERENCES: usize = 30;

fn other_url() -> String {
    support::vault_url_of("other")
}

async fn seed_other(name: &str, value: &str) {
    support::seed_secret_in(&other_url(), name, value).await;
}

/// GETs the bed's vault answered for `names`, summed.
async fn gets_of(names: &[String]) -> u64 {
    let c = support::vault_counters().await;
    names
        .iter()
        .map(|n| c["secrets_get_by_name"][n.to_lowercase()].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test]
async fn a_vault_with_many_references_is_checked_from_its_listing_and_only_changes_are_read() {
    let _vault = support::VAULT.read().await;
    let _rotation = support::ROTATION.lock().await;
    let vault_flag = format!("other={}", other_url());
    let s = rotation_setup_every("listing", "1s", &["--vault", &vault_flag]).await;
    let _grant = support::access_policy(
        &s.client,
        &format!("other-{}", s.ns),
        json!({"vault": "other", "secrets": ["*"], "namespaces": {"names": [s.ns]}}),
    )
    .await;
    let run = support::unique("listed");
    let names: Vec<String> = (0..REFERENCES).map(|i| format!("{run}-{i}")).collect();
    for n in &names {
        seed_other(n, &support::distinctive_value()).await;
    }
    // One pod using all of them, asking for a check every second.
    let env: Vec<(String, String)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("S{i}"), format!("akv://other/{n}")))
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    create(
        &s,
        &pod("many", &env, json!({"kvinject.io/refresh-interval": "1s"})),
    )
    .await
    .expect("admitted");

    // The first listing sweep reads each reference once; later ones read nothing unchanged.
    support::eventually(Duration::from_secs(20), "a sweep from the listing", || async {
        s.kvinject
            .metric_if_exported("kvinject_keyvault_list_pages_total", &[])
            .await
            .is_some_and(|p| p > 0.0)
    })
    .await;
    // Settled: the sweep that learns what the listing shows of each reference is done.
    let mut gets = gets_of(&names).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = gets_of(&names).await;
        if now == gets {
            break;
        }
        gets = now;
    }
    let pages = s
        .kvinject
        .strict_metric("kvinject_keyvault_list_pages_total", &[])
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let more_pages = s
        .kvinject
        .strict_metric("kvinject_keyvault_list_pages_total", &[])
        .await
        - pages;
    assert!(
        more_pages >= 2.0,
        "a listing about every second: {more_pages} pages in 4 s"
    );
    assert_eq!(
        gets_of(&names).await - gets,
        0,
        "no GET of an unchanged secret while the listing vouches for it"
    );

    // A new version of one: read, and rotated; the others still not read.
    let changed = names[7].clone();
    let others: Vec<String> = names.iter().filter(|n| **n != changed).cloned().collect();
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later second than the last read
    let (others_before, changed_before) = (
        gets_of(&others).await,
        gets_of(std::slice::from_ref(&changed)).await,
    );
    let new_value = support::distinctive_value();
    seed_other(&changed, &new_value).await;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let reference = format!("akv://other/{changed}");
    support::eventually(
        Duration::from_secs(20),
        "the changed secret to be rotated",
        || async {
            secrets
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .any(|x| {
                    x.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.get("kvinject.io/reference") == Some(&reference))
                        && x.data
                            .as_ref()
                            .is_some_and(|d| d["value"].0 == new_value.as_bytes())
                        && !version(x).is_empty()
                })
        },
    )
    .await;
    assert!(
        gets_of(std::slice::from_ref(&changed)).await > changed_before,
        "the changed secret was read"
    );
    assert_eq!(
        gets_of(&others).await,
        others_before,
        "the unchanged ones were not"
    );
    // In all: each unchanged secret was read twice, at its first use (the webhook) and by the
    // first sweep (which learns what the listing shows of it).
    assert!(
        others_before <= 2 * others.len() as u64,
        "at most two reads per unchanged secret in all: {others_before}"
    );
    let client = support::secret_client_of(&other_url());
    for n in &names {
        let _ = client.delete_secret(n, None).await; // keeps the `other` vault small
    }
}
