//! The plaintext admin port: /livez, /readyz.

use axum::{Router, extract::State, http::StatusCode, routing::get};
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

pub fn router(ready: Readiness) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(ready)
}

async fn readyz(State(ready): State<Readiness>) -> (StatusCode, &'static str) {
    if ready.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
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
            router(r).oneshot(Request::get("/readyz").body(Body::empty()).unwrap()).await.unwrap().status()
        };
        assert_eq!(status(ready.clone()).await, StatusCode::SERVICE_UNAVAILABLE);
        ready.set_ready();
        assert_eq!(status(ready.clone()).await, StatusCode::OK);
        let live = router(Readiness::default()).oneshot(Request::get("/livez").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(live.status(), StatusCode::OK);
    }
}
