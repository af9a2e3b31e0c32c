//! A no-op mutating webhook: the baseline of the warm-admission benchmark
//! (`tests/reliability warm`). The same stack as kvinject's webhook port (axum 0.8,
//! axum-server 0.9, rustls 0.23 with aws-lc-rs, a multi-threaded tokio runtime): it parses
//! the body as JSON and answers `allowed` with the request's uid, and does nothing else.
//! Given PATCH_FILE (a base64 JSON patch), it answers every review with that patch: the
//! pods bench (`tests/reliability pods`) gives it kvinject's, to measure what the apiserver
//! spends on applying it.
//!
//! `cargo run --release --example noop_webhook -- LISTEN_ADDR CERT_PEM KEY_PEM [PATCH_FILE]`

use axum::{Router, body::Bytes, http::header, routing::post};
use axum_server::tls_rustls::RustlsConfig;
use serde_json::{Value, json};

static PATCH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn mutate(body: Bytes) -> impl axum::response::IntoResponse {
    let review: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut answer = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                            "response": {"uid": review["request"]["uid"], "allowed": true}});
    if let Some(patch) = PATCH.get() {
        answer["response"]["patch"] = json!(patch);
        answer["response"]["patchType"] = json!("JSONPatch");
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(&answer).unwrap_or_default(),
    )
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, cert, key) = match args.as_slice() {
        [listen, cert, key] => (listen, cert, key),
        [listen, cert, key, patch_file] => {
            let patch = std::fs::read_to_string(patch_file).expect("PATCH_FILE");
            let _ = PATCH.set(patch.trim().to_owned());
            (listen, cert, key)
        }
        _ => {
            eprintln!("usage: noop_webhook LISTEN_ADDR CERT_PEM KEY_PEM [PATCH_FILE]");
            std::process::exit(2);
        }
    };
    let addr: std::net::SocketAddr = listen.parse().expect("LISTEN_ADDR");
    let tls = RustlsConfig::from_pem_file(cert, key)
        .await
        .expect("the certificate and key");
    let app = Router::new().route("/mutate", post(mutate));
    axum_server::bind_rustls(addr, tls)
        .serve(app.into_make_service())
        .await
        .expect("serving");
}
