//! The webhook's certificates: a private CA and a serving certificate for the Service's DNS
//! names. Everything here is pure and takes `now`: generating, inspecting and deciding
//! whether what a Secret holds must be replaced. `bootstrap` keeps a Secret and the
//! MutatingWebhookConfiguration in line with it; `kvinject certs` writes files.
//!
//! Trust moves before serving does: a new CA joins the bundle next to the old one (which
//! stays until it expires), so a replica still serving the old certificate and one
//! serving the new are both trusted by the apiserver.

pub mod bootstrap;
pub mod cli;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use std::{collections::BTreeSet, fmt, net::IpAddr, time::Duration};
use time::OffsetDateTime;
use x509_parser::{extensions::GeneralName, pem::Pem};

/// Slack for clocks that run behind: certificates are valid from an hour ago.
const BACKDATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("`{0}` is neither a DNS name nor an IP address")]
    BadName(String),
    #[error("{what} is not a readable PEM certificate")]
    BadCert { what: &'static str },
    #[error("{what} is not a readable PEM private key")]
    BadKey { what: &'static str },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The names the serving certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectNames {
    pub dns: BTreeSet<String>,
    pub ips: BTreeSet<IpAddr>,
}

impl SubjectNames {
    /// The names the apiserver uses for a Service `service` in `namespace`, plus `extra`
    /// DNS names or IP addresses (a `url:` registration, a LoadBalancer).
    pub fn for_service(service: &str, namespace: &str, extra: &[String]) -> Result<Self, CertError> {
        let mut names = SubjectNames {
            dns: BTreeSet::new(),
            ips: BTreeSet::new(),
        };
        for label in [service, namespace] {
            if !is_dns_label(label) {
                return Err(CertError::BadName(label.to_owned()));
            }
        }
        for n in [
            service.to_owned(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ] {
            names.dns.insert(n);
        }
        for e in extra.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(ip) = e.parse::<IpAddr>() {
                names.ips.insert(ip);
            } else if e.split('.').all(is_dns_label) {
                names.dns.insert(e.to_ascii_lowercase());
            } else {
                return Err(CertError::BadName(e.to_owned()));
            }
        }
        Ok(names)
    }

    fn sans(&self) -> Vec<SanType> {
        let dns = self
            .dns
            .iter()
            .filter_map(|d| d.clone().try_into().ok())
            .map(SanType::DnsName);
        dns.chain(self.ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect()
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// How long generated certificates live. Each is replaced once less than a third of its
/// lifetime is left.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub ca: Duration,
    pub serving: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Lifetimes {
            ca: Duration::from_secs(10 * 365 * DAY),
            serving: Duration::from_secs(365 * DAY),
        }
    }
}

/// What the Secret holds, all PEM. `ca_bundle` starts with the signing CA and may carry
/// older CAs that are still valid.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    pub ca_bundle: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("ca_bundle", &self.ca_bundle)
            .field("ca_key", &"<redacted>")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Why the certificates are being replaced (logged and put in an Event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    Missing,
    Unreadable(String),
    CaExpiring,
    ServingExpiring,
    NamesChanged,
    NotSignedByCa,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Missing => f.write_str("no certificates yet"),
            Reason::Unreadable(e) => write!(f, "the stored certificates are unusable ({e})"),
            Reason::CaExpiring => f.write_str("the CA is in the last third of its lifetime"),
            Reason::ServingExpiring => {
                f.write_str("the serving certificate is in the last third of its lifetime")
            }
            Reason::NamesChanged => f.write_str("the serving certificate's names differ from the Service's"),
            Reason::NotSignedByCa => f.write_str("the serving certificate is not signed by the current CA"),
        }
    }
}

#[derive(Debug)]
pub enum Plan {
    Keep,
    Replace(Material, Reason),
}

/// A new CA and a serving certificate it signed.
pub fn generate(
    names: &SubjectNames,
    now: OffsetDateTime,
    lifetimes: Lifetimes,
) -> Result<Material, CertError> {
    let (ca_cert, ca_key) = new_ca(now, lifetimes.ca)?;
    let (cert, key) = issue(&ca_cert, &ca_key, names, now, lifetimes.serving)?;
    Ok(Material {
        ca_bundle: ca_cert,
        ca_key,
        cert,
        key,
    })
}

fn new_ca(now: OffsetDateTime, lifetime: Duration) -> Result<(String, String), CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("kvinject webhook CA {}", now.unix_timestamp()),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `names` signed by the CA; it never outlives the CA.
fn issue(
    ca_cert: &str,
    ca_key: &str,
    names: &SubjectNames,
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<(String, String), CertError> {
    let ca_key = KeyPair::from_pem(ca_key).map_err(|_| CertError::BadKey { what: "the CA key" })?;
    let ca_not_after = parse_first(ca_cert, "the CA certificate")?.not_after;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, ca_key).map_err(|_| CertError::BadCert {
        what: "the CA certificate",
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        names
            .dns
            .iter()
            .next()
            .cloned()
            .unwrap_or_else(|| "kvinject".into()),
    );
    params.subject_alt_names = names.sans();
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now - BACKDATE;
    params.not_after = (now + lifetime).min(ca_not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What matters about one certificate, read from PEM.
#[derive(Debug)]
struct Inspected {
    not_after: OffsetDateTime,
    dns: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
    spki: Vec<u8>,
    der: Vec<u8>,
}

fn inspect(der: &[u8], what: &'static str) -> Result<Inspected, CertError> {
    let bad = || CertError::BadCert { what };
    let (_, x) = x509_parser::parse_x509_certificate(der).map_err(|_| bad())?;
    let t = |a: x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(a.timestamp()).map_err(|_| bad())
    };
    let mut dns = BTreeSet::new();
    let mut ips = BTreeSet::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => {
                    dns.insert(d.to_ascii_lowercase());
                }
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        ips.insert(IpAddr::from(a));
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        ips.insert(IpAddr::from(a));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Inspected {
        not_after: t(x.validity().not_after)?,
        dns,
        ips,
        spki: x.public_key().raw.to_vec(),
        der: der.to_vec(),
    })
}

fn parse_all(pem: &str, what: &'static str) -> Result<Vec<Inspected>, CertError> {
    let mut out = Vec::new();
    for p in Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.map_err(|_| CertError::BadCert { what })?;
        if p.label != "CERTIFICATE" {
            return Err(CertError::BadCert { what });
        }
        out.push(inspect(&p.contents, what)?);
    }
    if out.is_empty() {
        return Err(CertError::BadCert { what });
    }
    Ok(out)
}

fn parse_first(pem: &str, what: &'static str) -> Result<Inspected, CertError> {
    Ok(parse_all(pem, what)?.remove(0))
}

fn verified_by(cert: &Inspected, ca: &Inspected) -> bool {
    let (Ok((_, c)), Ok((_, a))) = (
        x509_parser::parse_x509_certificate(&cert.der),
        x509_parser::parse_x509_certificate(&ca.der),
    ) else {
        return false;
    };
    c.verify_signature(Some(a.public_key())).is_ok()
}

fn key_matches(key_pem: &str, cert: &Inspected, what: &'static str) -> Result<(), CertError> {
    let key = KeyPair::from_pem(key_pem).map_err(|_| CertError::BadKey { what })?;
    if key.subject_public_key_info() != cert.spki {
        return Err(CertError::BadKey { what });
    }
    Ok(())
}

/// Less than a third of `lifetime` is left at `now` (measured against the configured
/// lifetime, not the certificate's, which is backdated and may be capped by its CA's).
fn expiring(c: &Inspected, now: OffsetDateTime, lifetime: Duration) -> bool {
    c.not_after - now < lifetime / 3
}

/// Decides whether `existing` can stay, or what replaces it and why.
pub fn plan(
    existing: Option<&Material>,
    names: &SubjectNames,
    now: OffsetDateTime,
    lifetimes: Lifetimes,
) -> Result<Plan, CertError> {
    let Some(m) = existing else {
        return Ok(Plan::Replace(generate(names, now, lifetimes)?, Reason::Missing));
    };
    let checked = (|| {
        let cas = parse_all(&m.ca_bundle, "ca.crt")?;
        key_matches(&m.ca_key, &cas[0], "ca.key")?;
        let serving = parse_first(&m.cert, "tls.crt")?;
        key_matches(&m.key, &serving, "tls.key")?;
        Ok::<_, CertError>((cas, serving))
    })();
    let (cas, serving) = match checked {
        Ok(v) => v,
        Err(e) => {
            return Ok(Plan::Replace(
                generate(names, now, lifetimes)?,
                Reason::Unreadable(e.to_string()),
            ));
        }
    };
    // Older CAs stay trusted while they are valid: replicas may still serve their certificates.
    let keep_old = |from: usize| -> String {
        cas.iter()
            .skip(from)
            .filter(|c| c.not_after > now)
            .map(|c| pem_cert(&c.der))
            .collect()
    };
    if expiring(&cas[0], now, lifetimes.ca) {
        let (ca_cert, ca_key) = new_ca(now, lifetimes.ca)?;
        let (cert, key) = issue(&ca_cert, &ca_key, names, now, lifetimes.serving)?;
        let ca_bundle = format!("{ca_cert}{}", keep_old(0));
        return Ok(Plan::Replace(
            Material {
                ca_bundle,
                ca_key,
                cert,
                key,
            },
            Reason::CaExpiring,
        ));
    }
    let reason = if serving.dns != names.dns || serving.ips != names.ips {
        Reason::NamesChanged
    } else if !verified_by(&serving, &cas[0]) {
        Reason::NotSignedByCa
    } else if expiring(&serving, now, lifetimes.serving) {
        Reason::ServingExpiring
    } else {
        return Ok(Plan::Keep);
    };
    let (cert, key) = issue(&m.ca_bundle, &m.ca_key, names, now, lifetimes.serving)?;
    let ca_bundle = format!("{}{}", pem_cert(&cas[0].der), keep_old(1));
    Ok(Plan::Replace(
        Material {
            ca_bundle,
            ca_key: m.ca_key.clone(),
            cert,
            key,
        },
        reason,
    ))
}

/// Expiry (Unix seconds) of the first certificate in `pem`, for the expiry gauge.
pub fn not_after(pem: &str) -> Option<i64> {
    parse_first(pem, "certificate")
        .ok()
        .map(|c| c.not_after.unix_timestamp())
}

/// One DER certificate as PEM, 64 characters a line (as rcgen writes it).
pub fn pem_cert(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn names() -> SubjectNames {
        SubjectNames::for_service("kvinject", "kvinject", &["127.0.0.1".into()]).unwrap()
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    /// A rustls client that trusts `bundle` connects to a server presenting `m`'s pair for
    /// `name` only if the chain really verifies; this is what the apiserver does.
    fn verifies(bundle: &str, m: &Material, name: &str, at: OffsetDateTime) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(m.cert.as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let t = UnixTime::since_unix_epoch(Duration::from_secs(at.unix_timestamp() as u64));
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                t,
            )
            .is_ok()
    }

    #[test]
    fn names_cover_the_service_and_reject_garbage() {
        let n = names();
        assert!(
            n.dns.contains("kvinject.kvinject.svc") && n.dns.contains("kvinject.kvinject.svc.cluster.local")
        );
        assert!(n.ips.contains(&"127.0.0.1".parse().unwrap()));
        for bad in ["bad name", "a/b", "-x.example", ""] {
            let extra = if bad.is_empty() {
                vec![]
            } else {
                vec![bad.to_owned()]
            };
            let r =
                SubjectNames::for_service(if bad.is_empty() { "Bad_Svc" } else { "kvinject" }, "ns", &extra);
            assert!(matches!(r, Err(CertError::BadName(_))), "{bad:?}: {r:?}");
        }
    }

    #[test]
    fn generated_pair_verifies_for_every_service_name_and_keeps() {
        let m = generate(&names(), now(), Lifetimes::default()).unwrap();
        for name in [
            "kvinject.kvinject.svc",
            "kvinject.kvinject.svc.cluster.local",
            "127.0.0.1",
        ] {
            assert!(verifies(&m.ca_bundle, &m, name, now()), "{name}");
        }
        assert!(!verifies(&m.ca_bundle, &m, "other.kvinject.svc", now()));
        assert!(matches!(
            plan(Some(&m), &names(), now() + 200 * DAY, Lifetimes::default()).unwrap(),
            Plan::Keep
        ));
    }

    #[test]
    fn serving_certificate_is_renewed_in_its_last_third_by_the_same_ca() {
        let m = generate(&names(), now(), Lifetimes::default()).unwrap();
        let later = now() + 250 * DAY;
        let Plan::Replace(r, reason) = plan(Some(&m), &names(), later, Lifetimes::default()).unwrap() else {
            panic!("not renewed")
        };
        assert_eq!(reason, Reason::ServingExpiring);
        assert_eq!(
            r.ca_bundle, m.ca_bundle,
            "same CA, so the caBundle does not change"
        );
        assert_eq!(r.ca_key, m.ca_key);
        assert_ne!(r.cert, m.cert);
        assert!(verifies(&m.ca_bundle, &r, "kvinject.kvinject.svc", later));
        assert!(matches!(
            plan(Some(&r), &names(), later, Lifetimes::default()).unwrap(),
            Plan::Keep
        ));
    }

    #[test]
    fn ca_rotation_keeps_the_old_ca_trusted_until_it_expires() {
        let m = generate(&names(), now(), Lifetimes::default()).unwrap();
        let later = now() + 7 * 365 * DAY;
        let Plan::Replace(r, reason) = plan(Some(&m), &names(), later, Lifetimes::default()).unwrap() else {
            panic!("not renewed")
        };
        assert_eq!(reason, Reason::CaExpiring);
        assert_ne!(r.ca_key, m.ca_key);
        // The new bundle trusts both the new certificate and one a slower replica still
        // serves (signed by the old CA a few days ago).
        assert!(verifies(&r.ca_bundle, &r, "kvinject.kvinject.svc", later));
        let (cert, key) = issue(
            &m.ca_bundle,
            &m.ca_key,
            &names(),
            later - 5 * DAY,
            Lifetimes::default().serving,
        )
        .unwrap();
        let slow = Material {
            cert,
            key,
            ..m.clone()
        };
        assert!(verifies(&r.ca_bundle, &slow, "kvinject.kvinject.svc", later));
        assert!(
            !verifies(
                &r.ca_bundle[..r.ca_bundle.find("-----END CERTIFICATE-----").unwrap() + 26],
                &slow,
                "kvinject.kvinject.svc",
                later
            ),
            "the new CA alone must not trust it"
        );
        assert_eq!(parse_all(&r.ca_bundle, "b").unwrap().len(), 2);
        // Once the old CA has expired it leaves the bundle.
        let much_later = now() + 11 * 365 * DAY;
        let Plan::Replace(r2, _) = plan(Some(&r), &names(), much_later, Lifetimes::default()).unwrap() else {
            panic!("not renewed")
        };
        assert_eq!(parse_all(&r2.ca_bundle, "b").unwrap().len(), 1);
    }

    #[test]
    fn changed_names_foreign_certs_and_broken_material_are_replaced() {
        let m = generate(&names(), now(), Lifetimes::default()).unwrap();
        let other = SubjectNames::for_service("kvinject", "platform", &[]).unwrap();
        let Plan::Replace(r, reason) = plan(Some(&m), &other, now(), Lifetimes::default()).unwrap() else {
            panic!()
        };
        assert_eq!(reason, Reason::NamesChanged);
        assert!(verifies(&r.ca_bundle, &r, "kvinject.platform.svc", now()));

        let foreign = generate(&names(), now(), Lifetimes::default()).unwrap();
        let mixed = Material {
            cert: foreign.cert.clone(),
            key: foreign.key.clone(),
            ..m.clone()
        };
        let Plan::Replace(_, reason) = plan(Some(&mixed), &names(), now(), Lifetimes::default()).unwrap()
        else {
            panic!()
        };
        assert_eq!(reason, Reason::NotSignedByCa);

        for broken in [
            Material {
                cert: "junk".into(),
                ..m.clone()
            },
            Material {
                key: foreign.key.clone(),
                ..m.clone()
            },
            Material {
                ca_key: String::new(),
                ..m.clone()
            },
        ] {
            let Plan::Replace(r, reason) =
                plan(Some(&broken), &names(), now(), Lifetimes::default()).unwrap()
            else {
                panic!()
            };
            assert!(matches!(reason, Reason::Unreadable(_)), "{reason:?}");
            assert!(verifies(&r.ca_bundle, &r, "kvinject.kvinject.svc", now()));
        }
    }

    #[test]
    fn debug_redacts_keys() {
        let m = generate(&names(), now(), Lifetimes::default()).unwrap();
        let d = format!("{m:?}");
        assert!(!d.contains("PRIVATE KEY") && d.contains("<redacted>"), "{d}");
    }
}
