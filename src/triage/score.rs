//! The sans-IO half of DNSBL/DNSWL scoring: the query name of a client in a
//! zone, what an answer means (`codes`, the 127.255.255.0/24 refusals), the
//! score over all zones and the verdict. Nothing here awaits; `lookup.rs`
//! fetches the answers this file judges.

use super::{TriageAction, TriageSpec, TriageVerdict, Triaged, ZoneSpec};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

/// The name queried for `ip` in `zone`: IPv4 octets reversed
/// (`2.0.0.127.zen.example.`), IPv6 as 32 reversed nibbles (RFC 5782 §2.1,
/// §2.4), fully qualified so that no search domain applies.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{zone}.")
        }
        IpAddr::V6(v6) => {
            let mut out = String::with_capacity(64 + zone.len() + 1);
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    out.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                    out.push('.');
                }
            }
            out.push_str(zone);
            out.push('.');
            out
        }
    }
}

/// One `codes` entry: an address (`127.0.0.2`) or an inclusive range
/// (`127.0.0.2-127.0.0.11`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl CodeRange {
    /// Parses one entry; the error says why (reply-free text for config errors).
    pub fn parse(s: &str) -> Result<CodeRange, String> {
        let addr = |t: &str| {
            t.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| format!("{t:?} is not an IPv4 address"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (addr(a)?, addr(b)?),
            None => {
                let a = addr(s)?;
                (a, a)
            }
        };
        if first > last {
            return Err(format!("{s:?}: the range ends before it starts"));
        }
        if first.octets()[0] != 127 || last.octets()[0] != 127 {
            return Err(format!(
                "{s:?}: DNSBL answers are in 127.0.0.0/8 (RFC 5782 §2.1)"
            ));
        }
        Ok(CodeRange { first, last })
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&a)
    }
}

impl fmt::Display for CodeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// What a zone's DNS said about the client, as `lookup.rs` got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A records (possibly several codes).
    Records(Vec<Ipv4Addr>),
    /// NXDOMAIN or no A record: not listed.
    NotFound,
    /// Timeout, SERVFAIL or any other failure: counted as not listed.
    Failed,
}

/// What an answer means for the score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneResult {
    Listed,
    NotListed,
    /// An answer in 127.255.255.0/24: the list refuses the query (for
    /// example Spamhaus through a public resolver); never a hit.
    ListRefused,
    /// No answer in time, or a DNS error: not listed.
    Failed,
}

impl ZoneResult {
    /// Metric label and log word.
    pub fn as_str(self) -> &'static str {
        match self {
            ZoneResult::Listed => "listed",
            ZoneResult::NotListed => "not_listed",
            ZoneResult::ListRefused => "list_refused",
            ZoneResult::Failed => "failed",
        }
    }
}

/// Judges one zone's answer. Answers outside 127.0.0.0/8 are not a listing
/// (RFC 5782 §2.1: a list answers with loopback codes; anything else is a
/// wildcard or a hijacking resolver). With `codes`, only the given codes list.
pub fn judge(zone: &ZoneSpec, answer: &Answer) -> ZoneResult {
    let records = match answer {
        Answer::Records(r) => r,
        Answer::NotFound => return ZoneResult::NotListed,
        Answer::Failed => return ZoneResult::Failed,
    };
    let refused = |a: &Ipv4Addr| a.octets()[..3] == [127, 255, 255];
    let listing = |a: &Ipv4Addr| {
        a.octets()[0] == 127
            && !refused(a)
            && (zone.codes.is_empty() || zone.codes.iter().any(|c| c.contains(*a)))
    };
    if records.iter().any(listing) {
        ZoneResult::Listed
    } else if records.iter().any(refused) {
        ZoneResult::ListRefused
    } else {
        ZoneResult::NotListed
    }
}

/// The sum of the weights of the listing zones, and which zones those are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Score {
    pub total: i32,
    /// Listing zones of positive weight (block lists), in `dnsbl` order.
    pub listed: Vec<String>,
    /// Listing zones of negative (or zero) weight (allow lists).
    pub allowed: Vec<String>,
}

/// Scores the results of `spec`'s zones (in `spec.dnsbl` order).
pub fn score(spec: &TriageSpec, results: &[ZoneResult]) -> Score {
    let mut s = Score::default();
    for (z, r) in spec.dnsbl.iter().zip(results) {
        if *r == ZoneResult::Listed {
            s.total = s.total.saturating_add(z.weight);
            if z.weight > 0 {
                s.listed.push(z.zone.clone());
            } else {
                s.allowed.push(z.zone.clone());
            }
        }
    }
    s
}

/// The verdict of one connection's tests and the action taken on it (`None`
/// for a pass). A pregreet hit whose action is enforced wins over the score
/// (the client is refused for what it did, whatever the lists say); an
/// enforced DNSBL verdict wins over a pregreet hit only shadowed.
pub fn decide(
    spec: &TriageSpec,
    score: &Score,
    pregreet: bool,
) -> (TriageVerdict, Option<TriageAction>) {
    let pregreet_action = spec.pregreet.map(|p| p.action);
    let listed = spec.threshold <= score.total;
    let listed_zones = || TriageVerdict::Listed {
        score: score.total,
        zones: score.listed.clone(),
    };
    match (pregreet, pregreet_action, listed) {
        (true, Some(a), _) if a != TriageAction::Shadow => (TriageVerdict::Pregreet, Some(a)),
        (_, _, true) => (listed_zones(), Some(spec.action)),
        (true, Some(a), false) => (TriageVerdict::Pregreet, Some(a)),
        _ => (TriageVerdict::Pass { score: score.total }, None),
    }
}

/// The whole judgement of one connection: the zones' results (in `dnsbl`
/// order) and whether the client talked first → [`Triaged`].
pub fn triage(spec: &TriageSpec, results: &[ZoneResult], pregreet: bool) -> Triaged {
    let score = score(spec, results);
    let (verdict, action) = decide(spec, &score, pregreet);
    let mut hits = Vec::new();
    if let (true, Some(p)) = (pregreet, spec.pregreet) {
        hits.push(("pregreet", p.action == TriageAction::Shadow));
    }
    if spec.threshold <= score.total {
        hits.push(("dnsbl", spec.action == TriageAction::Shadow));
    }
    // the test that decided bans for its own `ban_for`
    let ban_for = match (action, &verdict) {
        (Some(TriageAction::Ban), TriageVerdict::Pregreet) => spec.pregreet.and_then(|p| p.ban_for),
        (Some(TriageAction::Ban), _) => spec.ban_for,
        _ => None,
    };
    Triaged {
        verdict,
        action,
        score,
        pregreet,
        hits,
        ban_for,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triage::PregreetSpec;
    use std::time::Duration;

    fn zone(name: &str, weight: i32, codes: &[&str]) -> ZoneSpec {
        ZoneSpec {
            zone: name.into(),
            weight,
            codes: codes.iter().map(|c| CodeRange::parse(c).unwrap()).collect(),
        }
    }

    fn spec(zones: Vec<ZoneSpec>, threshold: i32) -> TriageSpec {
        TriageSpec {
            dnsbl: zones,
            threshold,
            action: TriageAction::Reject,
            ban_for: None,
            pregreet: None,
            cache: Duration::from_secs(3600),
            cache_size: 100,
            timeout: Duration::from_secs(2),
        }
    }

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn query_names_reverse_octets_and_nibbles() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "zen.example."),
            "99.2.0.192.zen.example."
        );
        assert_eq!(
            query_name("127.0.0.2".parse().unwrap(), "bl.test"),
            "2.0.0.127.bl.test."
        );
        // RFC 5782 §2.4's example
        assert_eq!(
            query_name(
                "2001:db8:1:2:3:4:567:89ab".parse().unwrap(),
                "ugly.example.com"
            ),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
        assert_eq!(
            query_name("::1".parse().unwrap(), "z.test")
                .split('.')
                .count(),
            32 + 3
        );
    }

    #[test]
    fn codes_parse_ranges_and_single_addresses() {
        let r = CodeRange::parse("127.0.0.2-127.0.0.11").unwrap();
        assert!(r.contains(a("127.0.0.2")) && r.contains(a("127.0.0.11")));
        assert!(!r.contains(a("127.0.0.12")) && !r.contains(a("127.0.0.1")));
        assert_eq!(r.to_string(), "127.0.0.2-127.0.0.11");
        let one = CodeRange::parse("127.0.0.4").unwrap();
        assert!(one.contains(a("127.0.0.4")) && !one.contains(a("127.0.0.5")));
        assert_eq!(one.to_string(), "127.0.0.4");
        for bad in [
            "127.0.0.9-127.0.0.2",
            "10.0.0.2",
            "127.0.0.x",
            "127.0.0.1-",
            "",
        ] {
            assert!(CodeRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_are_judged_against_codes_and_refusals() {
        let any = zone("bl.test", 1, &[]);
        let zen = zone("zen.test", 3, &["127.0.0.2-127.0.0.11"]);
        let rec = |v: &[&str]| Answer::Records(v.iter().map(|s| a(s)).collect());
        assert_eq!(judge(&any, &rec(&["127.0.0.2"])), ZoneResult::Listed);
        assert_eq!(judge(&any, &Answer::NotFound), ZoneResult::NotListed);
        assert_eq!(judge(&any, &Answer::Failed), ZoneResult::Failed);
        assert_eq!(
            judge(&any, &rec(&["127.255.255.254"])),
            ZoneResult::ListRefused
        );
        assert_eq!(
            judge(&zen, &rec(&["127.255.255.252"])),
            ZoneResult::ListRefused
        );
        assert_eq!(judge(&zen, &rec(&["127.0.0.10"])), ZoneResult::Listed);
        assert_eq!(judge(&zen, &rec(&["127.0.1.2"])), ZoneResult::NotListed);
        // several codes: one in range lists
        assert_eq!(
            judge(&zen, &rec(&["127.0.1.2", "127.0.0.4"])),
            ZoneResult::Listed
        );
        // not loopback: a wildcarding resolver, not a listing
        assert_eq!(judge(&any, &rec(&["192.0.2.1"])), ZoneResult::NotListed);
    }

    #[test]
    fn weights_add_up_and_allow_lists_subtract() {
        let s = spec(
            vec![
                zone("one.test", 1, &[]),
                zone("two.test", 2, &[]),
                zone("wl.test", -2, &[]),
            ],
            3,
        );
        use ZoneResult::*;
        let both = score(&s, &[Listed, Listed, NotListed]);
        assert_eq!(both.total, 3);
        let (v, act) = decide(&s, &both, false);
        assert_eq!(
            v,
            TriageVerdict::Listed {
                score: 3,
                zones: vec!["one.test".into(), "two.test".into()]
            }
        );
        assert_eq!(act, Some(TriageAction::Reject));
        let one = score(&s, &[NotListed, Listed, Failed]);
        assert_eq!(
            decide(&s, &one, false),
            (TriageVerdict::Pass { score: 2 }, None)
        );
        let allowed = score(&s, &[Listed, Listed, Listed]);
        assert_eq!(allowed.total, 1);
        assert_eq!(allowed.allowed, vec!["wl.test".to_string()]);
        assert_eq!(decide(&s, &allowed, false).1, None);
        let refused = score(&s, &[ListRefused, ListRefused, NotListed]);
        assert_eq!(refused.total, 0);
    }

    /// `action: ban` bans for the `ban_for` of the test that decided; a
    /// pass or a shadowed hit bans nothing.
    #[test]
    fn ban_takes_the_deciding_tests_ban_for() {
        let mut s = spec(vec![zone("one.test", 3, &[])], 3);
        s.action = TriageAction::Ban;
        s.ban_for = Some(Duration::from_secs(3600));
        s.pregreet = Some(PregreetSpec {
            wait: Duration::from_secs(1),
            action: TriageAction::Ban,
            ban_for: Some(Duration::from_secs(60)),
        });
        let listed = triage(&s, &[ZoneResult::Listed], false);
        assert_eq!(listed.action, Some(TriageAction::Ban));
        assert_eq!(listed.ban_for, Some(Duration::from_secs(3600)));
        let early = triage(&s, &[ZoneResult::NotListed], true);
        assert_eq!(early.verdict, TriageVerdict::Pregreet);
        assert_eq!(early.ban_for, Some(Duration::from_secs(60)));
        assert_eq!(triage(&s, &[ZoneResult::NotListed], false).ban_for, None);
        s.pregreet = Some(PregreetSpec {
            wait: Duration::from_secs(1),
            action: TriageAction::Shadow,
            ban_for: None,
        });
        let shadowed = triage(&s, &[ZoneResult::NotListed], true);
        assert_eq!((shadowed.mode(), shadowed.ban_for), ("shadow", None));
    }

    #[test]
    fn pregreet_verdicts_by_action() {
        let mut s = spec(vec![zone("one.test", 3, &[])], 3);
        s.pregreet = Some(PregreetSpec {
            wait: Duration::from_secs(1),
            action: TriageAction::Reject,
            ban_for: None,
        });
        let listed = score(&s, &[ZoneResult::Listed]);
        let clean = Score::default();
        assert_eq!(
            decide(&s, &listed, true),
            (TriageVerdict::Pregreet, Some(TriageAction::Reject))
        );
        assert_eq!(
            decide(&s, &clean, true),
            (TriageVerdict::Pregreet, Some(TriageAction::Reject))
        );
        s.pregreet = Some(PregreetSpec {
            wait: Duration::from_secs(1),
            action: TriageAction::Shadow,
            ban_for: None,
        });
        // an enforced DNSBL verdict wins over a shadowed pregreet hit
        assert_eq!(decide(&s, &listed, true).1, Some(TriageAction::Reject));
        assert_eq!(
            decide(&s, &clean, true),
            (TriageVerdict::Pregreet, Some(TriageAction::Shadow))
        );
        assert_eq!(decide(&s, &clean, false).1, None);
        // both tests failed, each in its own mode
        let t = triage(&s, &[ZoneResult::Listed], true);
        assert_eq!(t.hits, vec![("pregreet", true), ("dnsbl", false)]);
        assert_eq!((t.mode(), t.passed()), ("enforced", false));
        let t = triage(&s, &[ZoneResult::NotListed], false);
        assert_eq!(
            (t.verdict.as_str(), t.mode(), t.passed()),
            ("pass", "none", true)
        );
        assert!(t.hits.is_empty());
    }
}
