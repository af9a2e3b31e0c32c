//! `akv://<vault>/<secret>[/<version>][#<field>]` references: parsing, validation and the
//! deterministic name of the Secret each one is materialized as. Pure.

use sha2::{Digest, Sha256};
use std::fmt;

pub const SCHEME: &str = "akv://";

/// A reference to one Key Vault secret, optionally pinned to a version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    pub vault: String,
    pub name: String,
    pub version: Option<String>,
    /// One field of a JSON secret (`#a.b`: key `b` of the object under key `a`; a number
    /// indexes an array); `None`: the whole value.
    pub field: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("`{0}` has no vault: write akv://<vault>/<secret>[/<version>][#<field>]")]
    MissingVault(String),
    #[error("`{0}` has no secret name: write akv://<vault>/<secret>[/<version>][#<field>]")]
    MissingSecret(String),
    #[error("`{0}` has too many parts: write akv://<vault>/<secret>[/<version>][#<field>]")]
    TooManyParts(String),
    #[error("vault name `{0}` may hold only letters, digits and '-'")]
    BadVault(String),
    #[error("secret name `{0}` must be 1 to 127 characters of 0-9, a-z, A-Z and '-'")]
    BadSecretName(String),
    #[error("version `{0}` is not a Key Vault version id (32 hexadecimal characters)")]
    BadVersion(String),
    #[error(
        "field `{0}` must be names or array indexes of letters, digits, '_' and '-', joined by '.' (#a.b)"
    )]
    BadField(String),
}

impl Reference {
    /// Parses a whole env value. `None` when the value is not a reference at all.
    pub fn parse(value: &str) -> Option<Result<Reference, ReferenceError>> {
        let rest = value.strip_prefix(SCHEME)?;
        Some(Self::parse_rest(value, rest))
    }

    fn parse_rest(whole: &str, rest: &str) -> Result<Reference, ReferenceError> {
        let (rest, field) = match rest.split_once('#') {
            Some((rest, field)) => (rest, Some(field)),
            None => (rest, None),
        };
        let field = match field {
            None => None,
            Some(f)
                if f.len() <= 256
                    && f.split('.').all(|seg| {
                        !seg.is_empty()
                            && seg
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    }) =>
            {
                Some(f.to_owned())
            }
            Some(f) => return Err(ReferenceError::BadField(f.to_owned())),
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (vault, name, version) = match parts.as_slice() {
            [v, n] => (*v, *n, None),
            [v, n, ver] => (*v, *n, Some(*ver)),
            [_] => return Err(ReferenceError::MissingSecret(whole.to_owned())),
            _ => return Err(ReferenceError::TooManyParts(whole.to_owned())),
        };
        if vault.is_empty() {
            return Err(ReferenceError::MissingVault(whole.to_owned()));
        }
        if name.is_empty() {
            return Err(ReferenceError::MissingSecret(whole.to_owned()));
        }
        if !vault.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ReferenceError::BadVault(vault.to_owned()));
        }
        // Names go unescaped into the request path: this check is what keeps `..`, `?`
        // and `%2F` out of it.
        if name.len() > 127 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ReferenceError::BadSecretName(name.to_owned()));
        }
        let version = match version {
            None | Some("") => None,
            Some(v) if v.len() == 32 && v.chars().all(|c| c.is_ascii_hexdigit()) => Some(v.to_owned()),
            Some(v) => return Err(ReferenceError::BadVersion(v.to_owned())),
        };
        Ok(Reference {
            vault: vault.to_owned(),
            name: name.to_owned(),
            version,
            field,
        })
    }

    /// The Key Vault secret (and version) this reference reads, without its field: what is
    /// fetched and cached, once for every field of one secret.
    pub fn secret(&self) -> Reference {
        Reference {
            field: None,
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.vault, self.name)?;
        if let Some(v) = &self.version {
            write!(f, "/{v}")?;
        }
        if let Some(field) = &self.field {
            write!(f, "#{field}")?;
        }
        Ok(())
    }
}

/// Parses a comma-separated list of references (the pull-secret annotation).
pub fn parse_list(value: &str) -> Result<Vec<Reference>, ReferenceError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| Reference::parse(s).unwrap_or_else(|| Err(ReferenceError::MissingVault(s.to_owned()))))
        .collect()
}

/// Hex characters of the name hash: 64 bits, so that nobody can search for a reference
/// whose name meets another's.
pub const HASH_HEX: usize = 16;
/// What names had before: 40 bits. Secrets under such names keep serving the pods that
/// use them until they are collected (docs, users/references.md).
pub const LEGACY_HASH_HEX: usize = 10;

/// A deterministic, collision-free DNS-1123 name of at most 63 characters:
/// `<prefix>-<readable part>-<16 hex of sha256(identity)>`. The readable part is
/// lower-cased and cut to fit; the hash is over the exact identity, so `DB` and `db`,
/// or two long names that share a prefix, never meet.
pub fn object_name(prefix: &str, readable: &[&str], identity: &str) -> String {
    object_name_with(prefix, readable, identity, HASH_HEX)
}

/// The name `object_name` gave before the hash grew to 64 bits.
pub fn legacy_object_name(prefix: &str, readable: &[&str], identity: &str) -> String {
    object_name_with(prefix, readable, identity, LEGACY_HASH_HEX)
}

/// Whether `name` has the shape of a name `object_name` (or its legacy form) gives with
/// `prefix`: the prefix, and a hash of 16 (or 10) lower-case hex characters at the end.
pub fn looks_like_object_name(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    [HASH_HEX, LEGACY_HASH_HEX].into_iter().any(|n| {
        rest.len() >= n
            && rest.is_char_boundary(rest.len() - n)
            && rest[rest.len() - n..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && (rest.len() == n || rest.as_bytes()[rest.len() - n - 1] == b'-')
    })
}

fn object_name_with(prefix: &str, readable: &[&str], identity: &str, hash_hex: usize) -> String {
    const MAX: usize = 63;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let room = MAX.saturating_sub(prefix.len() + hash_hex + 2);
    // The readable parts joined by '-', each character lower-cased or made a '-' (so one
    // byte each), cut to `room`. One buffer: this runs for every reference of every
    // admission.
    let mut body = String::with_capacity(room);
    'parts: for (i, part) in readable.iter().enumerate() {
        if i > 0 {
            if body.len() == room {
                break;
            }
            body.push('-');
        }
        for c in part.chars() {
            if body.len() == room {
                break 'parts;
            }
            body.push(if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            });
        }
    }
    let body = body.trim_matches('-');
    let mut name = String::with_capacity(MAX);
    name.push_str(prefix);
    name.push('-');
    if !body.is_empty() {
        // collapse runs of '-' so the name stays readable
        let mut last_dash = false;
        for c in body.chars() {
            if c == '-' && last_dash {
                continue;
            }
            last_dash = c == '-';
            name.push(c);
        }
        name.push('-');
    }
    for b in Sha256::digest(identity.as_bytes()).iter().take(hash_hex / 2) {
        name.push(HEX[usize::from(b >> 4)] as char);
        name.push(HEX[usize::from(b & 0xf)] as char);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(v: &str, n: &str, ver: Option<&str>) -> Reference {
        Reference {
            vault: v.into(),
            name: n.into(),
            version: ver.map(Into::into),
            field: None,
        }
    }

    #[test]
    fn parses_references() {
        let ver = "0123456789abcdef0123456789ABCDEF";
        let pinned = format!("akv://main/db/{ver}");
        let cases: Vec<(&str, Option<Result<Reference, ReferenceError>>)> = vec![
            ("akv://main/db-password", Some(Ok(r("main", "db-password", None)))),
            (&pinned, Some(Ok(r("main", "db", Some(ver))))),
            ("akv://main/db/", Some(Ok(r("main", "db", None)))),
            ("plain", None),
            ("see akv://main/db", None),
            (
                "akv://",
                Some(Err(ReferenceError::MissingSecret("akv://".into()))),
            ),
            (
                "akv://main",
                Some(Err(ReferenceError::MissingSecret("akv://main".into()))),
            ),
            (
                "akv://main/",
                Some(Err(ReferenceError::MissingSecret("akv://main/".into()))),
            ),
            (
                "akv:///db",
                Some(Err(ReferenceError::MissingVault("akv:///db".into()))),
            ),
            (
                "akv://main/db/v/x",
                Some(Err(ReferenceError::TooManyParts("akv://main/db/v/x".into()))),
            ),
            (
                "akv://ma.in/db",
                Some(Err(ReferenceError::BadVault("ma.in".into()))),
            ),
            (
                "akv://main/db_password",
                Some(Err(ReferenceError::BadSecretName("db_password".into()))),
            ),
            (
                "akv://main/..",
                Some(Err(ReferenceError::BadSecretName("..".into()))),
            ),
            (
                "akv://main/a%2Fb",
                Some(Err(ReferenceError::BadSecretName("a%2Fb".into()))),
            ),
            (
                "akv://main/db?x=1",
                Some(Err(ReferenceError::BadSecretName("db?x=1".into()))),
            ),
            (
                "akv://main/db/latest",
                Some(Err(ReferenceError::BadVersion("latest".into()))),
            ),
            (
                "akv://main/db#a.b",
                Some(Ok(Reference {
                    field: Some("a.b".into()),
                    ..r("main", "db", None)
                })),
            ),
            (
                "akv://main/db#items.0",
                Some(Ok(Reference {
                    field: Some("items.0".into()),
                    ..r("main", "db", None)
                })),
            ),
            ("akv://main/db#", Some(Err(ReferenceError::BadField("".into())))),
            (
                "akv://main/db#a..b",
                Some(Err(ReferenceError::BadField("a..b".into()))),
            ),
            (
                "akv://main/db#a b",
                Some(Err(ReferenceError::BadField("a b".into()))),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Reference::parse(input), want, "input {input:?}");
        }
        let long = "a".repeat(128);
        assert_eq!(
            Reference::parse(&format!("akv://v/{long}")),
            Some(Err(ReferenceError::BadSecretName(long)))
        );
        assert!(
            Reference::parse(&format!("akv://v/{}", "a".repeat(127)))
                .unwrap()
                .is_ok()
        );
    }

    #[test]
    fn displays_as_parsed() {
        for s in [
            "akv://main/db",
            "akv://main/db/0123456789abcdef0123456789abcdef",
            "akv://main/db#a.b",
            "akv://main/db/0123456789abcdef0123456789abcdef#password",
        ] {
            assert_eq!(Reference::parse(s).unwrap().unwrap().to_string(), s);
        }
    }

    #[test]
    fn parses_lists() {
        assert_eq!(
            parse_list("akv://a/x, akv://b/y,").unwrap(),
            vec![r("a", "x", None), r("b", "y", None)]
        );
        assert_eq!(
            parse_list("akv://a/x,nope"),
            Err(ReferenceError::MissingVault("nope".into()))
        );
    }

    /// Names are how kvinject finds the Secrets it made: a faster way to compute them must
    /// give every existing (legacy, 40-bit) name exactly as before. This is the previous
    /// implementation.
    fn object_name_before(prefix: &str, readable: &[&str], identity: &str) -> String {
        const MAX: usize = 63;
        let hash = Sha256::digest(identity.as_bytes());
        let hash: String = hash.iter().take(5).map(|b| format!("{b:02x}")).collect();
        let mut body: String = readable
            .iter()
            .map(|p| {
                p.to_ascii_lowercase()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("-");
        let room = MAX - prefix.len() - hash.len() - 2;
        body.truncate(room);
        let body = body.trim_matches('-');
        let mut name = String::with_capacity(MAX);
        name.push_str(prefix);
        name.push('-');
        if !body.is_empty() {
            // collapse runs of '-' so the name stays readable
            let mut last_dash = false;
            for c in body.chars() {
                if c == '-' && last_dash {
                    continue;
                }
                last_dash = c == '-';
                name.push(c);
            }
            name.push('-');
        }
        name.push_str(&hash);
        name
    }
    #[test]
    fn names_are_exactly_what_the_previous_implementation_gave() {
        let long = "x".repeat(80);
        let parts: [&[&str]; 9] = [
            &["main", "DB-Password"],
            &["main", "db_password", "user"],
            &["main", &long],
            &["ÜBER-vault", "naïve--secret"],
            &["--weird--", "", "-"],
            &[],
            &["registry.example.com:5000"],
            &["a", "b", "c", "d"],
            &[&long, &long],
        ];
        for prefix in ["kvi", "kvi-pull"] {
            for p in parts {
                for identity in ["", "akv://main/x", "akv://main/x\nsa\nclient\ntenant"] {
                    assert_eq!(
                        legacy_object_name(prefix, p, identity),
                        object_name_before(prefix, p, identity),
                        "{prefix} {p:?} {identity:?}"
                    );
                    let (new, old) = (
                        object_name(prefix, p, identity),
                        legacy_object_name(prefix, p, identity),
                    );
                    assert_ne!(new, old);
                    assert!(new.len() <= 63, "{new}");
                    assert!(looks_like_object_name(prefix, &new) && looks_like_object_name(prefix, &old));
                }
            }
        }
    }

    #[test]
    fn object_names_are_dns_1123_bounded_and_distinct() {
        let is_dns1123 = |s: &str| {
            s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !s.starts_with('-')
                && !s.ends_with('-')
                && !s.contains("--")
        };
        let long = "Very-Long-Secret-Name-".repeat(6);
        let names = [
            object_name("kvi", &["main", "DB-Password"], "akv://main/DB-Password"),
            object_name("kvi", &["main", "db-password"], "akv://main/db-password"),
            object_name("kvi", &["main", &long], &format!("akv://main/{long}")),
            object_name("kvi", &["main", &long], &format!("akv://main/{long}x")),
            object_name("kvi-pull", &["main", "--weird--"], "akv://main/--weird--"),
        ];
        for n in &names {
            assert!(is_dns1123(n), "{n} is not a DNS-1123 label");
        }
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(
            names[1],
            object_name("kvi", &["main", "db-password"], "akv://main/db-password"),
            "deterministic"
        );
        assert!(names[1].starts_with("kvi-main-db-password-"), "{}", names[1]);
        let hash = names[1].rsplit('-').next().unwrap();
        assert_eq!(hash.len(), 16, "64 bits of hash: {}", names[1]);
    }

    #[test]
    fn only_names_of_kvinjects_shape_look_like_its_own() {
        for (name, want) in [
            ("kvi-main-db-0123456789abcdef", true),
            ("kvi-main-db-0123456789", true),
            ("kvi-0123456789abcdef", true),
            ("kvi-pull-r-example-0123456789", true),
            ("kvi-main-db", false),
            ("kvi-main-db-0123456789ABCDEF", false),
            ("kvi-main-db-x0123456789", false),
            ("kvimain-db-0123456789", false),
            ("app-secret", false),
        ] {
            assert_eq!(looks_like_object_name("kvi", name), want, "{name}");
        }
    }
}
