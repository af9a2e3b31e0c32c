//! Checking references for new versions from the vault's listing: one paged list per vault
//! (25 secrets a request) instead of one GET per referenced secret. Pure decisions; the
//! controller makes the calls.

use std::time::Duration;

/// What a vault's listing shows of one secret: its current version's attributes, never a
/// value. `updated` (Unix seconds) changes with every new version and every attribute change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listed {
    pub updated: Option<i64>,
    pub enabled: bool,
    pub expires: Option<i64>,
}

/// What kvinject knows of one reference since it last read it with a GET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Known {
    /// `updated` in the listing taken just before that read (`None`: there was none).
    pub updated: Option<i64>,
    /// When that read happened, in Unix seconds.
    pub read_at: i64,
}

/// Whether a reference must be read with a GET, given what the vault's listing shows now.
/// The listing shows only the current version's attributes, and `updated` in whole
/// seconds; so a GET is made for: a reference never read since a listing; one missing from
/// the listing (deleted: the GET says so); a changed `updated` (a new version, or changed
/// attributes); an `updated` in the very second of the last read (a version set later in
/// that second would show the same); a disabled or expired secret (the GET's answer is
/// what kvinject reports); and, as a safety net, every `full_refresh`.
pub fn needs_read(known: Option<&Known>, listed: Option<&Listed>, now: i64, full_refresh: Duration) -> bool {
    let (Some(known), Some(listed)) = (known, listed) else {
        return true;
    };
    let Some(updated) = listed.updated else {
        return true;
    };
    known.updated != Some(updated)
        || updated >= known.read_at
        || !listed.enabled
        || listed.expires.is_some_and(|exp| exp <= now)
        || now.saturating_sub(known.read_at) >= i64::try_from(full_refresh.as_secs()).unwrap_or(i64::MAX)
}

/// Whether listing a vault costs less than reading its `references` one by one: when its
/// last listing took at most half as many pages as there are references, or, before any
/// listing, when at least a page's worth (25) are referenced.
pub fn worth_listing(references: usize, last_pages: Option<usize>) -> bool {
    match last_pages {
        Some(pages) => pages.max(1) * 2 <= references,
        None => references >= 25,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn listed(updated: i64) -> Listed {
        Listed {
            updated: Some(updated),
            enabled: true,
            expires: None,
        }
    }

    #[test]
    fn an_unchanged_listing_spares_the_read_until_the_safety_net() {
        let known = Known {
            updated: Some(100),
            read_at: 200,
        };
        assert!(!needs_read(Some(&known), Some(&listed(100)), 300, HOUR));
        assert!(
            needs_read(Some(&known), Some(&listed(100)), 200 + 3600, HOUR),
            "safety net"
        );
    }

    #[test]
    fn anything_the_listing_cannot_vouch_for_is_read() {
        let known = Known {
            updated: Some(100),
            read_at: 200,
        };
        assert!(needs_read(None, Some(&listed(100)), 300, HOUR), "never read");
        assert!(needs_read(Some(&known), None, 300, HOUR), "gone from the listing");
        assert!(
            needs_read(Some(&known), Some(&listed(250)), 300, HOUR),
            "a new version"
        );
        let same_second = Known {
            updated: Some(100),
            read_at: 100,
        };
        assert!(
            needs_read(Some(&same_second), Some(&listed(100)), 300, HOUR),
            "read in the second the version was set"
        );
        let no_listing = Known {
            updated: None,
            read_at: 200,
        };
        assert!(needs_read(Some(&no_listing), Some(&listed(100)), 300, HOUR));
        let disabled = Listed {
            enabled: false,
            ..listed(100)
        };
        assert!(needs_read(Some(&known), Some(&disabled), 300, HOUR));
        let expired = Listed {
            expires: Some(250),
            ..listed(100)
        };
        assert!(needs_read(Some(&known), Some(&expired), 300, HOUR));
        assert!(
            !needs_read(Some(&known), Some(&expired), 240, HOUR),
            "not yet expired"
        );
    }

    #[test]
    fn a_vault_is_listed_when_that_costs_less_than_its_reads() {
        assert!(!worth_listing(24, None));
        assert!(worth_listing(25, None));
        assert!(worth_listing(1000, Some(40)));
        assert!(!worth_listing(30, Some(4000)), "a huge vault with few references");
        assert!(worth_listing(2, Some(1)));
    }
}
