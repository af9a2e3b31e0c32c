//! The plaintext admin port: /livez, /readyz, /metrics.

use crate::metrics::Metrics;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// Flipped to ready once everything the webhook needs has started (and, later, synced).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn set_not_ready(&self) {
        self.0.store(false, Ordering::Release);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AdminState {
    ready: Readiness,
    metrics: Metrics,
}

pub fn router(ready: Readiness, metrics: Metrics) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { ready, metrics })
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.ready.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{body::Body, http::Request};
    use tower::ServiceExt;

    #[tokio::test]
    async fn readyz_follows_readiness() {
        let ready = Readiness::default();
        let status = |r: Readiness| async move {
            router(r, Metrics::default())
                .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        };
        assert_eq!(status(ready.clone()).await, StatusCode::SERVICE_UNAVAILABLE);
        ready.set_ready();
        assert_eq!(status(ready.clone()).await, StatusCode::OK);
        let live = router(Readiness::default(), Metrics::default())
            .oneshot(Request::get("/livez").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(live.status(), StatusCode::OK);
    }
}
