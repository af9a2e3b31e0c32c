//! A secret's value as kvinject carries it, pure: redacted in every Debug and Display, and
//! what a read from Key Vault returns (the value and the version it came from).

use std::fmt;

/// A secret's value. It never prints: Debug and Display show `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A value read from Key Vault, with the version it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub value: SecretValue,
    pub version: String,
}
