//! `policies.NAME.triage:` → [`triage::TriageSpec`]: the serde shapes and
//! their validation (zones are DNS names, codes parse, weights, threshold
//! and durations bounded), errors located at the offending value.

use super::load::Source;
use super::{defaults, ConfigError};
use crate::triage::{CodeRange, PregreetSpec, TriageAction, TriageSpec, ZoneSpec};
use crate::units::Secs;
use schemars::JsonSchema;
use serde::Deserialize;
use std::time::Duration;

/// Postscreen-style tests before the SMTP greeting (README, "Triage").
/// SMTP listeners only: a POP3 or IMAP listener ignores it (`check` warns).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriageFile {
    /// DNS block lists (positive weight) and allow lists (negative weight),
    /// all queried in parallel at connect.
    #[serde(default)]
    pub dnsbl: Vec<DnsblFile>,
    /// The sum of the weights of the zones listing the client at which
    /// `action` applies.
    pub threshold: Option<i32>,
    /// What a score at or above `threshold` does: `reject` (`554 5.7.1`,
    /// naming the lists), `tempfail` (`421 4.7.0`), `shadow` (log and count)
    /// or `ban` (as reject, and the client is banned on every listener for
    /// `ban_for`).
    pub action: Option<TriageAction>,
    /// How long `action: ban` bans (required with it, 1s to 30d).
    pub ban_for: Option<Secs>,
    /// Hold the final `220 ` greeting line and treat clients that talk before it.
    pub pregreet: Option<PregreetFile>,
    /// How long a client (address) that passed every test is not tested
    /// again (no held greeting, no DNS queries); 0 disables the cache.
    pub cache: Option<Secs>,
    /// Addresses the cache holds at most.
    pub cache_size: Option<usize>,
    /// How long after connect the lists' answers are awaited; a list that
    /// has not answered by then (or answered with an error) counts as not listing.
    pub timeout: Option<Secs>,
}

/// `{ zone: zen.spamhaus.org, weight: 3, codes: ["127.0.0.2-127.0.0.11"] }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsblFile {
    /// The list's DNS zone; the client is looked up as `<reversed address>.<zone>`.
    pub zone: String,
    /// Added to the score when the zone lists the client (−100 … 100; negative: an allow list).
    pub weight: Option<i32>,
    /// Answers that count as a listing: addresses or `first-last` ranges in
    /// 127.0.0.0/8. Absent: any 127.0.0.0/8 answer but 127.255.255.0/24.
    #[serde(default)]
    pub codes: Vec<String>,
}

/// `{ wait: 2s, action: reject }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PregreetFile {
    /// How long the final `220 ` line is held after the `220-` line(s).
    pub wait: Option<Secs>,
    /// What a client that talks first gets: `reject`, `tempfail`, `shadow`
    /// or `ban` (as reject, and banned on every listener for `ban_for`).
    pub action: Option<TriageAction>,
    /// How long `action: ban` bans (required with it, 1s to 30d).
    pub ban_for: Option<Secs>,
}

/// Zones per policy: each is one query per new client.
pub const MAX_ZONES: usize = 16;
/// Weights are small integers, as in postscreen.
pub const MAX_WEIGHT: i32 = 100;
/// The longest pregreet wait: every good client's first connection waits it.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// The longest `timeout` (the greeting is held until the answers are in).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `cache` lifetime.
pub const MAX_CACHE: Duration = Duration::from_secs(30 * 86_400);
/// Codes per zone.
const MAX_CODES: usize = 64;

pub(super) fn build_triage(
    s: &Source,
    policy: &str,
    f: &TriageFile,
) -> Result<TriageSpec, ConfigError> {
    let at = |needle: &str, msg: String| {
        s.err(
            &["policies", policy, "triage", needle],
            format!("policies.{policy}.triage{msg}"),
        )
    };
    if f.dnsbl.is_empty() && f.pregreet.is_none() {
        return Err(at(
            "",
            ": name at least one test (dnsbl: [...] or pregreet: {...})".into(),
        ));
    }
    if f.dnsbl.len() > MAX_ZONES {
        return Err(at(
            "dnsbl",
            format!(".dnsbl: at most {MAX_ZONES} zones (each is a query per new client)"),
        ));
    }
    let mut dnsbl: Vec<ZoneSpec> = Vec::with_capacity(f.dnsbl.len());
    for (i, z) in f.dnsbl.iter().enumerate() {
        let field = format!(".dnsbl[{}]", i + 1);
        let zone = z.zone.trim_end_matches('.').to_ascii_lowercase();
        if !valid_zone(&zone) {
            return Err(at(
                &z.zone,
                format!("{field}.zone: {:?} is not a DNS name", z.zone),
            ));
        }
        if dnsbl.iter().any(|o| o.zone == zone) {
            return Err(at(&z.zone, format!("{field}: zone {zone} is named twice")));
        }
        let weight = z.weight.unwrap_or(defaults::TRIAGE_WEIGHT);
        if weight == 0 || weight.abs() > MAX_WEIGHT {
            return Err(at(
                &z.zone,
                format!("{field}.weight: between -{MAX_WEIGHT} and {MAX_WEIGHT}, not 0"),
            ));
        }
        if z.codes.len() > MAX_CODES {
            return Err(at(&z.zone, format!("{field}.codes: at most {MAX_CODES}")));
        }
        let mut codes = Vec::with_capacity(z.codes.len());
        for c in &z.codes {
            codes.push(CodeRange::parse(c).map_err(|e| at(c, format!("{field}.codes: {e}")))?);
        }
        dnsbl.push(ZoneSpec {
            zone,
            weight,
            codes,
        });
    }
    let threshold = f.threshold.unwrap_or(defaults::TRIAGE_THRESHOLD);
    if threshold <= 0 {
        return Err(at(
            "threshold",
            ".threshold: must be at least 1 (allow lists subtract from the score)".into(),
        ));
    }
    let pregreet = match &f.pregreet {
        None => None,
        Some(p) => {
            let wait = p.wait.map_or(defaults::TRIAGE_PREGREET_WAIT, |w| w.0);
            if wait.is_zero() || wait > MAX_WAIT {
                return Err(at(
                    "wait",
                    format!(".pregreet.wait: between 1ms and {}s", MAX_WAIT.as_secs()),
                ));
            }
            let action = p.action.unwrap_or(defaults::TRIAGE_ACTION);
            Some(PregreetSpec {
                wait,
                action,
                ban_for: ban_for(action, p.ban_for, &|n, m| at(n, format!(".pregreet{m}")))?,
            })
        }
    };
    let cache = f.cache.map_or(defaults::TRIAGE_CACHE, |c| c.0);
    if cache > MAX_CACHE {
        return Err(at(
            "cache",
            format!(".cache: at most {}d", MAX_CACHE.as_secs() / 86_400),
        ));
    }
    let timeout = f.timeout.map_or(defaults::TRIAGE_TIMEOUT, |t| t.0);
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(at(
            "timeout",
            format!(".timeout: between 1ms and {}s", MAX_TIMEOUT.as_secs()),
        ));
    }
    let action = f.action.unwrap_or(defaults::TRIAGE_ACTION);
    let ban_for = ban_for(action, f.ban_for, &|n, m| at(n, m))?;
    Ok(TriageSpec {
        dnsbl,
        threshold,
        action,
        ban_for,
        pregreet,
        cache,
        cache_size: f
            .cache_size
            .unwrap_or(defaults::TRIAGE_CACHE_SIZE)
            .clamp(16, 10_000_000),
        timeout,
    })
}

/// `ban_for` beside an `action`: required with `ban` (as for limit rules,
/// 1s to 30d), an error without it.
fn ban_for(
    action: TriageAction,
    ban_for: Option<Secs>,
    at: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<Duration>, ConfigError> {
    use super::policy::{BAN_FOR_MAX, BAN_FOR_MIN};
    match (action, ban_for.map(|d| d.0)) {
        (TriageAction::Ban, None) => Err(at(
            "ban",
            ".action: ban needs ban_for (how long, 1s to 30d)".into(),
        )),
        (TriageAction::Ban, Some(d)) if !(BAN_FOR_MIN..=BAN_FOR_MAX).contains(&d) => {
            Err(at("ban_for", ".ban_for: from 1s to 30d".into()))
        }
        (TriageAction::Ban, Some(d)) => Ok(Some(d)),
        (_, Some(_)) => Err(at("ban_for", ".ban_for needs action: ban".into())),
        (_, None) => Ok(None),
    }
}

/// A DNS name of at least two labels: letters, digits, `-` and `_`
/// (some lists use `_` labels), each label 1–63 octets, not starting or
/// ending with `-`, at most 200 octets so that the reversed IPv6 address
/// (64 octets) still fits a name's 253.
fn valid_zone(z: &str) -> bool {
    z.len() <= 200
        && z.contains('.')
        && z.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use crate::config::fixtures::*;
    use crate::triage::TriageAction;
    use std::time::Duration;

    fn with(triage: &str) -> String {
        format!("{POLICY_BASE}    triage:\n{triage}")
    }

    #[test]
    fn the_contract_example_loads() {
        let c = load_str(
            "t.yaml",
            &with(concat!(
                "      dnsbl:\n",
                "        - { zone: zen.spamhaus.org, weight: 3, codes: [\"127.0.0.2-127.0.0.11\"] }\n",
                "        - { zone: bl.example.net, weight: 1 }\n",
                "        - { zone: list.dnswl.org, weight: -2 }\n",
                "      threshold: 3\n",
                "      action: reject\n",
                "      pregreet: { wait: 2s, action: reject }\n",
                "      cache: 24h\n",
            )),
        )
        .unwrap();
        let t = &c.triage["p"];
        assert_eq!(t.dnsbl.len(), 3);
        assert_eq!(t.dnsbl[0].codes.len(), 1);
        assert_eq!(t.dnsbl[2].weight, -2);
        assert_eq!(t.threshold, 3);
        assert_eq!(t.action, TriageAction::Reject);
        assert_eq!(t.pregreet.unwrap().wait, Duration::from_secs(2));
        assert_eq!(t.cache, Duration::from_secs(86_400));
        assert_eq!(t.timeout, Duration::from_secs(2));
        let d = t.describe();
        assert!(
            d.contains("zen.spamhaus.org (+3, codes 127.0.0.2-127.0.0.11)"),
            "{d}"
        );
        assert!(d.contains("list.dnswl.org (-2)"), "{d}");
        assert!(
            d.contains("pregreet: final 220 line held 2000ms action=reject"),
            "{d}"
        );
    }

    /// The commented-out block of the shipped `policies/` loads as written.
    #[test]
    fn the_shipped_example_loads_once_uncommented() {
        let text = include_str!("../../policies/20-policies.yaml");
        let block: String = text
            .lines()
            .skip_while(|l| l.trim() != "# triage:")
            .skip(1)
            .take_while(|l| l.trim_start().starts_with("#   "))
            .map(|l| format!("    {}\n", l.trim_start().trim_start_matches("# ")))
            .collect();
        assert!(block.contains("zen.spamhaus.org"), "{block}");
        let c = load_str("t.yaml", &with(&block)).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let t = &c.triage["p"];
        assert_eq!((t.dnsbl.len(), t.threshold), (3, 3));
        assert_eq!(t.action, TriageAction::Shadow);
    }

    #[test]
    fn bad_values_are_refused_at_their_line() {
        let cases = [
            (
                "      dnsbl: [ { zone: \"bad zone\" } ]\n",
                "is not a DNS name",
            ),
            ("      dnsbl: [ { zone: nodot } ]\n", "is not a DNS name"),
            (
                "      dnsbl: [ { zone: bl.test, codes: [\"127.0.0.9-127.0.0.2\"] } ]\n",
                "ends before it starts",
            ),
            (
                "      dnsbl: [ { zone: bl.test, codes: [\"10.0.0.1\"] } ]\n",
                "127.0.0.0/8",
            ),
            (
                "      dnsbl: [ { zone: bl.test, weight: 500 } ]\n",
                "weight",
            ),
            ("      dnsbl: [ { zone: bl.test, weight: 0 } ]\n", "weight"),
            (
                "      dnsbl: [ { zone: bl.test } ]\n      threshold: 0\n",
                "threshold",
            ),
            ("      pregreet: { wait: 1m }\n", "pregreet.wait"),
            (
                "      dnsbl: [ { zone: bl.test } ]\n      cache: 365d\n",
                ".cache",
            ),
            (
                "      dnsbl: [ { zone: bl.test } ]\n      timeout: 0s\n",
                ".timeout",
            ),
            (
                "      dnsbl: [ { zone: bl.test }, { zone: BL.test. } ]\n",
                "named twice",
            ),
            ("      cache: 1h\n", "at least one test"),
            (
                "      dnsbl: [ { zone: bl.test } ]\n      action: ban\n",
                "action: ban needs ban_for",
            ),
            (
                "      dnsbl: [ { zone: bl.test } ]\n      ban_for: 1h\n",
                "ban_for needs action: ban",
            ),
            (
                "      pregreet: { wait: 1s, action: ban, ban_for: 31d }\n",
                ".pregreet.ban_for: from 1s to 30d",
            ),
        ];
        for (yaml, want) in cases {
            let e = err(&with(yaml));
            // POLICY_BASE is 8 lines; `triage:` is line 9, its fields follow
            let line: usize = e
                .split(':')
                .nth(1)
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            assert!(
                e.starts_with("bad.yaml:") && (9..=11).contains(&line),
                "{yaml}: {e}"
            );
            assert!(e.contains(want), "{yaml}: {e}");
        }
        let c = load_str(
            "t.yaml",
            &with("      dnsbl: [ { zone: bl.test } ]\n      action: ban\n      ban_for: 1h\n      pregreet: { wait: 1s, action: ban, ban_for: 10m }\n"),
        )
        .unwrap();
        let t = &c.triage["p"];
        assert_eq!(
            (t.action, t.ban_for),
            (TriageAction::Ban, Some(Duration::from_secs(3600)))
        );
        assert_eq!(t.pregreet.unwrap().ban_for, Some(Duration::from_secs(600)));
        assert!(t
            .describe()
            .contains("action=ban for 3600s (every listener)"));
        let e = err(&with("      dnsbl: [ { zone: bl.test, wieght: 1 } ]\n"));
        assert!(e.contains("unknown field"), "{e}");
    }
}
