//! The preconditions of every write the controller makes into a tenant's Secret (a
//! refresh, a restore, a recreation), the same as admission's: the namespace is one
//! kvinject acts for, the access policies have been listed, and a policy grants the
//! reference to the ServiceAccount whose pods use it. The controller holds kvinject's
//! strong permissions, so it fails closed: when it cannot tell, it does not write.

use super::Controller;
use crate::{
    access::grant::{Subject, use_of},
    mutate::Needed,
    scope::Scope,
};
use kube::runtime::reflector::ObjectRef;

/// Why the controller does not write a Secret now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Not yet: the policies have not been listed since the controller started, or the
    /// namespace is out of scope (a label may come back; a Secret its pods use is then
    /// made again).
    Wait(&'static str),
    /// Not while things stay as they are (the namespace out of scope, no grant).
    Refuse(String),
}

impl Controller {
    /// Acts only for the namespaces `scope` selects, as the webhook does.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// Bounds the Key Vault reads a tenant can cause per namespace (restores, recreations).
    pub fn with_read_limit(mut self, limit: crate::limit::ReadLimit) -> Self {
        self.reads = crate::limit::ReadBuckets::new(limit);
        self
    }

    /// Whether the controller may write the Secret `needed` in namespace `ns` (`None`) or
    /// why not. Every pod that uses it must run as a ServiceAccount that reads as the
    /// Secret's identity and is granted the reference; a Secret read as a workload identity
    /// also needs a grant to that identity's ServiceAccount, and one read as kvinject that no
    /// pod uses, a grant to some ServiceAccount of the namespace.
    pub(super) fn hold(&self, ns: &str, needed: &Needed) -> Option<Hold> {
        let namespace = self.caches.namespaces.get(&ObjectRef::new(ns));
        let labels = namespace
            .as_ref()
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        if let Some(scope) = &self.scope
            && (namespace.is_none() || !scope.includes(ns, &labels))
        {
            return Some(Hold::Wait(
                "kvinject does not act for the namespace (not selected by its namespace selector, or excluded)",
            ));
        }
        // Every pod that uses it reads as the identity it was read with: a ServiceAccount
        // moved off kvinject's identity (or onto another client id) since is not written for.
        let pods = self.caches.pods.state();
        let users: Vec<_> = pods
            .iter()
            // A finished pod (a Job's) reads nothing more: it holds no write back.
            .filter(|p| p.namespace == ns && !p.finished && p.uses(&needed.secret_name))
            .collect();
        let reads_as_needed = |service_account: &str| {
            self.identity_of(ns, service_account).ok().as_ref() == Some(&needed.identity)
        };
        let same_identity = users.iter().all(|p| reads_as_needed(&p.service_account))
            && needed
                .identity
                .as_ref()
                .is_none_or(|i| reads_as_needed(&i.service_account));
        if !same_identity {
            return Some(Hold::Refuse(
                "a ServiceAccount whose pods use it no longer reads Key Vault as the identity it was read with"
                    .to_owned(),
            ));
        }
        let Some(policies) = &self.access else {
            return None;
        };
        let Some(index) = policies.loaded() else {
            return Some(Hold::Wait("the access policies have not been listed yet"));
        };
        let (reference, use_) = (needed.source.reference(), use_of(&needed.source));
        let granted = |service_account: &str| {
            let subject = Subject {
                namespace: ns,
                labels: &labels,
                service_account,
            };
            index.check(&subject, reference, use_).is_ok()
        };
        // Each ServiceAccount whose pods use it is granted it: one that lost its grant keeps
        // what it has, and gets nothing new.
        let users_granted = users.iter().all(|p| granted(&p.service_account));
        let ok = users_granted
            && match &needed.identity {
                Some(identity) => granted(&identity.service_account),
                None if users.is_empty() => index.grants_namespace(ns, &labels, reference, use_),
                None => true,
            };
        (!ok).then(|| {
            Hold::Refuse(format!(
                "no AccessPolicy grants {reference} for {} to every ServiceAccount whose pods use it",
                use_.as_str()
            ))
        })
    }
}
