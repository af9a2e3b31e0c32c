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
    stuck_after: Option<std::time::Duration>,
}

/// The admin routes. `stuck_after`: /livez fails while this replica leads rotation and has
/// not completed a sweep for that long.
pub fn router(ready: Readiness, metrics: Metrics, stuck_after: Option<std::time::Duration>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState {
            ready,
            metrics,
            stuck_after,
        })
}

async fn livez(State(s): State<AdminState>) -> (StatusCode, String) {
    let age = s.metrics.sweep_age(crate::metrics::unix_now());
    match (s.stuck_after, age) {
        (Some(limit), Some(age)) if age > i64::try_from(limit.as_secs()).unwrap_or(i64::MAX) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the rotation controller leads but has not completed a sweep for {age}s (limit {}s)",
                limit.as_secs()
            ),
        ),
        _ => (StatusCode::OK, "ok".into()),
    }
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
            router(r, Metrics::default(), None)
                .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        };
        assert_eq!(status(ready.clone()).await, StatusCode::SERVICE_UNAVAILABLE);
        ready.set_ready();
        assert_eq!(status(ready.clone()).await, StatusCode::OK);
        let live = router(Readiness::default(), Metrics::default(), None)
            .oneshot(Request::get("/livez").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(live.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn livez_fails_while_the_leading_controller_has_not_swept_for_too_long() {
        let metrics = Metrics::default();
        let limit = Some(std::time::Duration::from_secs(600));
        let live = |m: Metrics| async move {
            router(Readiness::default(), m, limit)
                .oneshot(Request::get("/livez").body(Body::empty()).unwrap())
                .await
                .unwrap()
                .status()
        };
        let now = crate::metrics::unix_now();
        assert_eq!(live(metrics.clone()).await, StatusCode::OK, "not leading");
        metrics.last_sweep.store(now - 5, Ordering::Relaxed);
        assert_eq!(live(metrics.clone()).await, StatusCode::OK, "swept 5 s ago");
        metrics.last_sweep.store(now - 601, Ordering::Relaxed);
        assert_eq!(
            live(metrics.clone()).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "stuck"
        );
        metrics.last_sweep.store(0, Ordering::Relaxed);
        assert_eq!(live(metrics.clone()).await, StatusCode::OK, "no longer leading");
    }
}
