//! `kvinject access check` and `kvinject crd`: the access decision for platform teams,
//! from the cluster in the kubeconfig, with the same code the webhook runs.

use super::{
    grant::{Index, Subject},
    policy::{self, AccessPolicy},
};
use crate::{config::AccessCheckArgs, reference::Reference};
use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client, api::ListParams};

/// Prints whether `args.reference` is granted, and by which policy; true when it is.
pub async fn check(args: &AccessCheckArgs) -> anyhow::Result<bool> {
    let reference = match Reference::parse(&args.reference) {
        Some(parsed) => parsed?,
        None => bail!(
            "`{}` is not a reference: write akv://<vault>/<secret>[/<version>][#<field>]",
            args.reference
        ),
    };
    let client = Client::try_default()
        .await
        .context("connecting to the cluster in the kubeconfig")?;
    let policies = Api::<AccessPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing AccessPolicy objects (is the kvinject CRD installed?)")?;
    let namespace = Api::<Namespace>::all(client)
        .get_opt(&args.namespace)
        .await
        .with_context(|| format!("reading namespace {}", args.namespace))?;
    if namespace.is_none() {
        eprintln!(
            "note: namespace {} does not exist; deciding by its name alone",
            args.namespace
        );
    }
    let labels = namespace.and_then(|n| n.metadata.labels).unwrap_or_default();
    let index = Index::new(&policies.items);
    let subject = Subject {
        namespace: &args.namespace,
        labels: &labels,
        service_account: &args.service_account,
    };
    match index.decide(&subject, &reference, args.use_) {
        Ok(policy) => {
            println!(
                "allowed: {reference} for {} by ServiceAccount `{}` in namespace `{}`",
                args.use_.as_str(),
                args.service_account,
                args.namespace
            );
            println!("granted by AccessPolicy {policy}");
            Ok(true)
        }
        Err(why) => {
            println!("denied: {}", why.detail());
            Ok(false)
        }
    }
}

/// Prints the CustomResourceDefinition.
pub fn crd() {
    print!("{}", policy::crd_yaml());
}
