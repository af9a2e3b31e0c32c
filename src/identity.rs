//! Which Azure identity reads Key Vault for a pod, pure. By default kvinject's own; a
//! ServiceAccount annotated `kvinject.io/identity: workload` (or every one, with
//! `--default-identity workload`) has its pods' secrets read as the Azure identity federated with it:
//! kvinject mints a token of that ServiceAccount (TokenRequest, audience
//! `api://AzureADTokenExchange`) and exchanges it at Entra ID, so Key Vault's own role
//! assignments decide what each workload may read.

use std::{collections::BTreeMap, fmt};

/// ServiceAccount annotation: `workload` (read as the ServiceAccount's Azure identity) or
/// `kvinject` (read as kvinject); absent: the `--identity` default.
pub const IDENTITY_ANNOTATION: &str = "kvinject.io/identity";
/// The Azure workload identity annotations on a ServiceAccount (the AKS webhook's).
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
pub const TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";
/// The audience Entra ID accepts for federated ServiceAccount tokens.
pub const TOKEN_AUDIENCE: &str = "api://AzureADTokenExchange";

/// `--default-identity`: who reads Key Vault for ServiceAccounts that say nothing.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// kvinject's own identity.
    #[default]
    Kvinject,
    /// The pod's ServiceAccount's federated Azure identity.
    Workload,
}

/// A ServiceAccount's federated Azure identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadIdentity {
    pub namespace: String,
    pub service_account: String,
    pub client_id: String,
    pub tenant_id: String,
}

impl fmt::Display for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ServiceAccount `{}/{}` (client id {})",
            self.namespace, self.service_account, self.client_id
        )
    }
}

impl WorkloadIdentity {
    /// The subject Entra ID's federated credential must name.
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "ServiceAccount `{namespace}/{service_account}` reads Key Vault as its own Azure identity ({IDENTITY_ANNOTATION}: workload) but has no `{CLIENT_ID_ANNOTATION}` annotation: add the client id of the identity whose federated credential names subject system:serviceaccount:{namespace}:{service_account}"
    )]
    MissingClientId {
        namespace: String,
        service_account: String,
    },
    #[error(
        "ServiceAccount `{namespace}/{service_account}` has no `{TENANT_ID_ANNOTATION}` annotation and kvinject has no --azure-tenant-id: add one of them"
    )]
    MissingTenant {
        namespace: String,
        service_account: String,
    },
    #[error(
        "ServiceAccount `{namespace}/{service_account}` asks to read Key Vault as kvinject's own identity (`{IDENTITY_ANNOTATION}: kvinject`), which can read every configured vault; with --default-identity workload only the platform may allow that, for namespace {namespace}: --own-identity-namespace {namespace} (the chart's identity.ownIdentityNamespaces)"
    )]
    OwnIdentityRefused {
        namespace: String,
        service_account: String,
    },
    #[error(
        "ServiceAccount `{namespace}/{service_account}`: `{IDENTITY_ANNOTATION}: {value}` is neither `workload` nor `kvinject`"
    )]
    BadMode {
        namespace: String,
        service_account: String,
        value: String,
    },
    #[error(
        "ServiceAccount `{namespace}/{service_account}` could not be read, so the Azure identity its pods read Key Vault as is unknown: {detail}"
    )]
    Unreadable {
        namespace: String,
        service_account: String,
        detail: String,
    },
}

/// The platform's choices: who reads for ServiceAccounts that say nothing, and where a
/// ServiceAccount may move back onto kvinject's own identity.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub default: Mode,
    /// The tenant of workload identities whose ServiceAccount names none.
    pub tenant: Option<String>,
    /// With `default` workload: the namespaces whose ServiceAccounts may say
    /// `kvinject.io/identity: kvinject` (`--own-identity-namespace`). Anywhere else that
    /// annotation is refused: the built-in `edit` role may set it, and kvinject's identity
    /// reads every vault.
    pub own_identity_namespaces: std::collections::BTreeSet<String>,
}

/// The identity pods of ServiceAccount `namespace/name` (with `annotations`) read as; `None`
/// for kvinject's own. A tenant's annotation never widens what is read: it may move a
/// ServiceAccount onto its own identity, and back onto kvinject's only where the platform
/// allows it.
pub fn resolve(
    namespace: &str,
    name: &str,
    annotations: &BTreeMap<String, String>,
    settings: &Settings,
) -> Result<Option<WorkloadIdentity>, IdentityError> {
    let (default, default_tenant) = (settings.default, settings.tenant.as_deref());
    let mode = match annotations.get(IDENTITY_ANNOTATION).map(|v| v.trim()) {
        None => default,
        Some("workload") => Mode::Workload,
        Some("kvinject")
            if default == Mode::Workload && !settings.own_identity_namespaces.contains(namespace) =>
        {
            return Err(IdentityError::OwnIdentityRefused {
                namespace: namespace.to_owned(),
                service_account: name.to_owned(),
            });
        }
        Some("kvinject") => Mode::Kvinject,
        Some(other) => {
            return Err(IdentityError::BadMode {
                namespace: namespace.to_owned(),
                service_account: name.to_owned(),
                value: other.to_owned(),
            });
        }
    };
    if mode == Mode::Kvinject {
        return Ok(None);
    }
    let who = || (namespace.to_owned(), name.to_owned());
    let client_id = annotations
        .get(CLIENT_ID_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    let Some(client_id) = client_id else {
        let (namespace, service_account) = who();
        return Err(IdentityError::MissingClientId {
            namespace,
            service_account,
        });
    };
    let tenant = annotations
        .get(TENANT_ID_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    let Some(tenant_id) = tenant.or(default_tenant) else {
        let (namespace, service_account) = who();
        return Err(IdentityError::MissingTenant {
            namespace,
            service_account,
        });
    };
    Ok(Some(WorkloadIdentity {
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
        client_id: client_id.to_owned(),
        tenant_id: tenant_id.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(default: Mode, tenant: Option<&str>) -> Settings {
        Settings {
            default,
            tenant: tenant.map(Into::into),
            own_identity_namespaces: Default::default(),
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_service_account_chooses_and_the_flag_is_the_default() {
        let federated = annotations(&[(IDENTITY_ANNOTATION, "workload"), (CLIENT_ID_ANNOTATION, "cid")]);
        let got = resolve("ns", "api", &federated, &settings(Mode::Kvinject, Some("t")))
            .unwrap()
            .unwrap();
        assert_eq!((got.client_id.as_str(), got.tenant_id.as_str()), ("cid", "t"));
        assert_eq!(got.subject(), "system:serviceaccount:ns:api");
        let tenant = annotations(&[(CLIENT_ID_ANNOTATION, "cid"), (TENANT_ID_ANNOTATION, "own")]);
        assert_eq!(
            resolve("ns", "api", &tenant, &settings(Mode::Workload, Some("t")))
                .unwrap()
                .unwrap()
                .tenant_id,
            "own"
        );
        assert_eq!(
            resolve("ns", "api", &tenant, &settings(Mode::Kvinject, Some("t"))).unwrap(),
            None,
            "the default"
        );
        let opt_out = annotations(&[(IDENTITY_ANNOTATION, "kvinject"), (CLIENT_ID_ANNOTATION, "cid")]);
        assert_eq!(
            resolve("ns", "api", &opt_out, &settings(Mode::Kvinject, Some("t"))).unwrap(),
            None,
            "the default already"
        );
    }

    #[test]
    fn a_tenant_cannot_move_back_onto_kvinjects_identity_unless_the_platform_allows_it() {
        let opt_out = annotations(&[(IDENTITY_ANNOTATION, "kvinject"), (CLIENT_ID_ANNOTATION, "cid")]);
        let err = resolve("ns", "api", &opt_out, &settings(Mode::Workload, Some("t"))).unwrap_err();
        assert!(matches!(err, IdentityError::OwnIdentityRefused { .. }), "{err}");
        assert!(err.to_string().contains("--own-identity-namespace ns"), "{err}");
        let mut allowed = settings(Mode::Workload, Some("t"));
        allowed.own_identity_namespaces.insert("ns".into());
        assert_eq!(resolve("ns", "api", &opt_out, &allowed).unwrap(), None);
        let err = resolve("other", "api", &opt_out, &allowed).unwrap_err();
        assert!(
            matches!(err, IdentityError::OwnIdentityRefused { .. }),
            "only the named namespace"
        );
    }

    #[test]
    fn a_workload_identity_without_its_annotations_says_what_to_add() {
        let bare = annotations(&[(IDENTITY_ANNOTATION, "workload")]);
        let err = resolve("ns", "api", &bare, &settings(Mode::Kvinject, Some("t")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no `azure.workload.identity/client-id` annotation"),
            "{err}"
        );
        assert!(err.contains("subject system:serviceaccount:ns:api"), "{err}");
        let no_tenant = annotations(&[(CLIENT_ID_ANNOTATION, "cid")]);
        let err = resolve("ns", "api", &no_tenant, &settings(Mode::Workload, None)).unwrap_err();
        assert!(matches!(err, IdentityError::MissingTenant { .. }), "{err}");
        let bad = annotations(&[(IDENTITY_ANNOTATION, "mine")]);
        assert!(matches!(
            resolve("ns", "api", &bad, &settings(Mode::Kvinject, None)),
            Err(IdentityError::BadMode { .. })
        ));
    }
}
