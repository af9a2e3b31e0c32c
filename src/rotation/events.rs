//! The controller's Events, on kvinject's Secrets and on workloads.

use super::Controller;
use crate::materialize::CachedSecret;
use kube::{
    Resource,
    runtime::events::{Event, EventType, Recorder},
};
use tracing::{debug, warn};

impl Controller {
    /// An Event on one of kvinject's Secrets, as the cache knows it.
    pub(super) async fn secret_event(
        &self,
        secret: &CachedSecret,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        publish(&self.recorder, &secret.object_reference(), type_, reason, note).await;
    }

    pub(super) async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        publish(&self.recorder, &object.object_ref(&()), type_, reason, note).await;
    }
}

pub(super) async fn publish(
    recorder: &Recorder,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Rotate".into(),
        secondary: None,
    };
    match recorder.publish(&event, regarding).await {
        Ok(()) => {}
        // The namespace is being deleted: nothing there needs telling any more.
        Err(kube::Error::Api(status))
            if status
                .details
                .as_ref()
                .is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating")) =>
        {
            debug!(reason, "namespace being deleted; event not recorded");
        }
        Err(e) => warn!(error = %e, reason, "could not record an event"),
    }
}
