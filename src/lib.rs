//! kvinject: Azure Key Vault references in pod specs, materialized as native Kubernetes
//! Secrets by a mutating admission webhook.

pub mod access;
pub mod accounts;
pub mod admin;
pub mod app;
pub mod certs;
pub mod config;
pub mod duration;
pub mod generation;
pub mod identity;
pub mod inject;
pub mod keyvault;
pub mod limit;
pub mod lint;
pub mod materialize;
pub mod metrics;
pub mod mutate;
pub mod reference;
pub mod rotation;
pub mod scope;
pub mod telemetry;
pub mod webhook;
