//! The whole admission decision, request bytes to response bytes, through the webhook's
//! router. Key Vault and the apiserver are in-process doubles here (a fuzz target cannot
//! reach the real ones). Invariants beyond "no panic":
//! - every answer is a 200 with a well-formed AdmissionReview that echoes the request's uid;
//! - a patch applies to the input pod, and admitting the patched pod again patches nothing;
//! - no value the doubles hand out appears in a denial.
#![no_main]
use async_trait::async_trait;
use axum::{Router, body::Body, http::Request};
use base64::Engine;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::store::Writer;
use kvinject::{
    identity::WorkloadIdentity,
    inject::{Injector, SecretWriter, WriteError},
    keyvault::{
        SecretValue,
        source::{FetchError, Fetched, SecretSource},
    },
    metrics::Metrics,
    mutate::InjectConfig,
    reference::Reference,
    webhook::{WebhookState, router},
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};
use tower::ServiceExt;

const MARK: &str = "FUZZ-SECRET-MARK";

/// Answers every reference with a marked value (a docker config, so registry annotations
/// pass too), except names starting with `missing`.
struct Vault;

#[async_trait]
impl SecretSource for Vault {
    async fn fetch(&self, r: &Reference, _: Option<&WorkloadIdentity>) -> Result<Fetched, FetchError> {
        if r.name.starts_with("missing") {
            return Err(FetchError::NotFound(r.to_string()));
        }
        let value = format!(r#"{{"auths":{{"r.example":{{"auth":"{MARK}"}}}},"mark":"{MARK}"}}"#);
        Ok(Fetched {
            value: SecretValue::new(value),
            version: "0123456789abcdef0123456789abcdef".into(),
        })
    }
    async fn probe(&self, _: &str) -> Result<(), FetchError> {
        Ok(())
    }
}

struct Discard;

#[async_trait]
impl SecretWriter for Discard {
    async fn create(&self, _: Secret) -> Result<(), WriteError> {
        Ok(())
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    })
}

fn app() -> Router {
    let config = InjectConfig {
        vaults: ["main".to_owned()].into(),
        ..Default::default()
    };
    let store = Writer::<kvinject::materialize::CachedSecret>::default().as_reader();
    let injector = Injector::new(
        config,
        Arc::new(Vault),
        Arc::new(Discard),
        store,
        Duration::from_secs(60),
        Metrics::default(),
    );
    router(WebhookState::new(Arc::new(injector), Duration::from_secs(5)))
}

async fn answer(app: &Router, body: Vec<u8>) -> Value {
    let req = Request::post("/mutate")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200, "every answer is a 200");
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&bytes).expect("the answer is JSON");
    assert_eq!(review["kind"], "AdmissionReview");
    review
}

fuzz_target!(|input: &[u8]| {
    runtime().block_on(async {
        let app = app();
        let review = answer(&app, input.to_vec()).await;
        // The same review again may be answered from the decision memo: the same answer.
        assert_eq!(answer(&app, input.to_vec()).await, review, "the answer changed when asked again");
        let response = &review["response"];
        assert!(response["allowed"].is_boolean(), "{review}");
        let request: Option<Value> = serde_json::from_slice::<Value>(input).ok().map(|v| v["request"].clone());
        if let Some(uid) = request.as_ref().and_then(|r| r["uid"].as_str())
            && response["status"]["reason"] != "InvalidRequest"
        {
            assert_eq!(response["uid"], uid, "the uid is echoed");
        }
        let message = response["status"]["message"].as_str().unwrap_or_default();
        assert!(!message.contains(MARK), "a denial carried a value: {message}");
        let Some(patch) = response["patch"].as_str() else { return };
        let patch = base64::engine::general_purpose::STANDARD.decode(patch).expect("the patch is base64");
        let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("the patch is a JSON patch");
        // serde_json skips an unknown field without converting its numbers, so a review can
        // parse as a typed AdmissionReview and still not as a Value (e.g. `1e999` somewhere
        // kvinject ignores). Then there is no input pod here to apply the patch to.
        let Some(mut request) = request else { return };
        let mut pod = request["object"].clone();
        json_patch::patch(&mut pod, &patch).expect("the patch applies to the input pod");
        // Reinvocation: the patched pod needs nothing more.
        request["object"] = pod;
        let again = serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request});
        let second = answer(&app, serde_json::to_vec(&again).unwrap()).await;
        assert!(second["response"]["patch"].is_null(), "admitting the patched pod again patches it again: {second}");
    });
});
