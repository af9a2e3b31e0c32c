//! The admission HTTP layer: it only converts. Body -> AdmissionRequest, decision ->
//! AdmissionResponse, always answered with 200 and an AdmissionReview.

pub mod tls;

use crate::mutate;
use axum::{Router, body::Bytes, extract::DefaultBodyLimit, http::header, response::IntoResponse, routing::post};
use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tracing::{Span, field::Empty, info, instrument};

/// AdmissionReviews for pods are bounded by the apiserver's request size (3 MiB by default).
const MAX_BODY: usize = 8 * 1024 * 1024;

pub fn router() -> Router {
    Router::new().route("/mutate", post(mutate_handler)).layer(DefaultBodyLimit::max(MAX_BODY))
}

#[instrument(skip_all, fields(uid = Empty, namespace = Empty, pod = Empty, result = Empty))]
async fn mutate_handler(body: Bytes) -> impl IntoResponse {
    let response = review(&body);
    let span = Span::current();
    span.record("result", if response.allowed { if response.patch.is_some() { "patched" } else { "allowed" } } else if response.uid.is_empty() { "invalid" } else { "denied" });
    info!("admission");
    ([(header::CONTENT_TYPE, "application/json")], encode_review(response))
}

/// Parses the body and decides; never fails: a body that is not an AdmissionReview for a
/// pod gets an `invalid` response naming what is wrong.
fn review(body: &[u8]) -> AdmissionResponse {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(format!("request body is not an AdmissionReview: {e}")),
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(format!("AdmissionReview carries no usable request: {e}")),
    };
    let span = Span::current();
    span.record("uid", request.uid.as_str());
    span.record("namespace", request.namespace.as_deref().unwrap_or(""));
    let Some(pod) = request.object.as_ref() else {
        return AdmissionResponse::from(&request).deny("the AdmissionReview has no pod object");
    };
    span.record("pod", pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or(""));
    let decision = mutate::mutate(pod);
    let mut response = AdmissionResponse::from(&request);
    if !decision.warnings.is_empty() {
        response.warnings = Some(decision.warnings);
    }
    match decision.patch {
        None => response,
        Some(patch) => match response.clone().with_patch(patch) {
            Ok(r) => r,
            Err(e) => response.deny(format!("kvinject could not encode its patch: {e}")),
        },
    }
}

/// Serializes the review with `patch` in its documented form, a base64 string (the
/// apiserver's `[]byte`); kube-rs would write a JSON array of numbers.
fn encode_review(response: AdmissionResponse) -> Vec<u8> {
    let patch = response.patch.clone();
    let mut doc = serde_json::to_value(response.into_review()).unwrap_or_default();
    if let (Some(bytes), Some(slot)) = (patch, doc.pointer_mut("/response/patch")) {
        *slot = base64::engine::general_purpose::STANDARD.encode(bytes).into();
    }
    serde_json::to_vec(&doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{body::Body, http::Request};
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    async fn post(body: impl Into<Body>) -> (u16, Value) {
        let req = Request::post("/mutate").header("content-type", "application/json").body(body.into()).unwrap();
        let res = router().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn review_of(pod: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE", "namespace": "ns", "userInfo": {}, "dryRun": false,
                "object": pod,
            }
        })
    }

    #[tokio::test]
    async fn patches_a_pod_with_a_base64_json_patch() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let (status, body) = post(review_of(pod.clone()).to_string()).await;
        assert_eq!(status, 200);
        let resp = &body["response"];
        assert_eq!(resp["uid"], "u-1");
        assert_eq!(resp["allowed"], true);
        assert_eq!(resp["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(resp["patch"].as_str().expect("patch is a string")).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut doc = pod;
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc["metadata"]["labels"]["kvinject.io/injected"], "true");
    }

    #[tokio::test]
    async fn garbage_gets_an_invalid_review_not_an_error_status() {
        for body in ["", "not json", "{}", r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#] {
            let (status, review) = post(body.to_owned()).await;
            assert_eq!(status, 200, "body {body:?}");
            assert_eq!(review["response"]["allowed"], false, "body {body:?}");
            assert_eq!(review["response"]["status"]["reason"], "InvalidRequest", "body {body:?}");
            assert!(review["response"]["status"]["message"].as_str().unwrap().contains("AdmissionReview"), "body {body:?}: {review}");
        }
    }

    #[tokio::test]
    async fn a_review_without_a_pod_is_denied_by_uid() {
        let mut r = review_of(Value::Null);
        r["request"].as_object_mut().unwrap().remove("object");
        let (status, body) = post(r.to_string()).await;
        assert_eq!(status, 200);
        assert_eq!(body["response"]["uid"], "u-1");
        assert_eq!(body["response"]["allowed"], false);
    }
}
