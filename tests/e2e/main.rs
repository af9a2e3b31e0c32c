//! End-to-end tests against the real test bed (tests/testbed): a kube-apiserver, etcd and
//! kube-controller-manager built from their Go modules, and the bed's Key Vault endpoint.

#[path = "../support/mod.rs"]
mod support;

mod access;
mod claims;
mod conformance;
mod disruption;
mod faults;
mod heal;
mod identity;
mod inject;
mod install;
mod installed;
mod isolation;
mod lifecycle;
mod listing;
mod node;
mod outage;
mod reach;
mod rotation;
mod serving;
mod trust;
mod vault;
