//! Small value types of the config format: sizes, durations, rates and CIDR
//! networks, and the canonical form of addresses. Each parses from the string
//! an operator writes and rejects anything else. A leaf: config parses into
//! these, and policy, auth and transport use them without depending on config.

use serde::{de, Deserialize, Deserializer};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// A size in bytes, written as an integer or with a unit: `25MiB`, `512KiB`, `10MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected e.g. 25MiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "KiB" | "K" | "k" => 1024,
            "MB" => 1_000_000,
            "MiB" | "M" => 1024 * 1024,
            "GB" => 1_000_000_000,
            "GiB" | "G" => 1024 * 1024 * 1024,
            other => return Err(format!("invalid size unit {other:?} in {s:?}")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 25MiB or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The one unit table of durations and rate periods: a duration (`30s`,
/// `1hour`) and a rate's period (`5/15minutes`, `20/m`) accept the same
/// spellings, because both are read by [`parse_time`].
const TIME_UNITS: &[(&[&str], u64)] = &[
    (&["ms"], 1),
    (&["s", "sec", "second", "seconds"], 1000),
    (&["m", "min", "minute", "minutes"], 60_000),
    (&["h", "hour", "hours"], 3_600_000),
    (&["d", "day", "days"], 86_400_000),
];

/// `NUMBER [UNIT]` or `UNIT` (one of it): `30s`, `15 minutes`, `hour`; a bare
/// number is seconds. At most [`Secs::MAX`].
fn parse_time(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let unit = unit.trim();
    let n: u64 = match num {
        "" if !unit.is_empty() => 1,
        "" => return Err(format!("invalid duration {s:?}: expected e.g. 30s or 5m")),
        // more digits than u64 holds: longer than any bound anyway
        num => num.parse().unwrap_or(u64::MAX),
    };
    let millis = match unit {
        "" => 1000,
        unit => TIME_UNITS
            .iter()
            .find(|(names, _)| names.contains(&unit))
            .map(|(_, ms)| *ms)
            .ok_or_else(|| {
                format!("invalid duration unit {unit:?} in {s:?} (ms, s, m, h, d or second, minute, hour, day)")
            })?,
    };
    let d = Duration::from_millis(n.saturating_mul(millis));
    if d > Secs::MAX {
        return Err(format!("duration {s:?} is too long (at most 100 years)"));
    }
    Ok(d)
}

/// The unit names of [`TIME_UNITS`] as a regex alternation, for the schema.
fn time_unit_pattern() -> String {
    let names: Vec<&str> = TIME_UNITS
        .iter()
        .flat_map(|(n, _)| n.iter().copied())
        .collect();
    format!("(?:{})", names.join("|"))
}

/// A duration written as `300ms`, `30s`, `5m`, `1h`, `1hour` or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub Duration);

impl Secs {
    /// The longest duration accepted: every duration ends up as a deadline
    /// `now + d`, which must not overflow (that panics in each session). Rate
    /// periods share it (the limiter holds them in nanoseconds as a u64).
    pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

    pub fn parse(s: &str) -> Result<Self, String> {
        parse_time(s).map(Secs)
    }
}

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Secs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 30s, 5m or 250ms")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Secs, E> {
                Secs::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secs, E> {
                Secs::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A rate or a window: `COUNT/PERIOD` such as `20/minute`, `5/15minutes`,
/// `500/1hour`, `10/2s`. The period is a duration ([`Secs`] spellings; a bare
/// unit is one of it) of more than zero; the count is at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (n, per) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected COUNT/PERIOD, e.g. 20/minute"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: count must be a positive number"))?;
        if count == 0 {
            return Err(format!("{s:?}: count must be at least 1"));
        }
        let period = parse_time(per).map_err(|e| format!("{s:?}: bad period: {e}"))?;
        if period.is_zero() {
            return Err(format!("{s:?}: period must be positive"));
        }
        Ok(Rate { count, period })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a rate such as 20/minute or 5/15minutes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                Rate::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Whether a mail domain, as written (U-labels allowed), may be a DNS name:
/// at most 253 code points, labels of at most 63 (a U-label has no more
/// code points than its A-label has octets). Asked before IDNA, whose
/// Punycode costs the square of a label's length (idna takes labels of up
/// to 1000 code points): nothing longer can be signed for or looked up.
/// The full stops UTS 46 maps to `.` end labels too.
pub fn dns_sized(domain: &str) -> bool {
    let labels = || domain.split(['.', '\u{3002}', '\u{ff0e}', '\u{ff61}']);
    domain.chars().count() <= 253 && labels().all(|l| l.chars().count() <= 63)
}

/// The one form of an address that is matched and counted: an IPv4-mapped
/// IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket or a TCP6 PROXY
/// header shows for an IPv4 client) is that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// [`canonical`] for a socket address (PROXY headers).
pub fn canonical_socket(a: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(canonical(a.ip()), a.port())
}

/// An IP network such as `192.0.2.0/24` or `2001:db8::/32`; a bare address is a /32 or /128.
/// A network inside `::ffff:0:0/96` is stored as the IPv4 network it maps
/// (`::ffff:192.0.2.0/120` = `192.0.2.0/24`); wider IPv6 networks stay IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("invalid network {s:?}: expected e.g. 192.0.2.0/24"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("invalid prefix length in {s:?}"))?,
        };
        match canonical(addr) {
            v4 @ IpAddr::V4(_) if addr.is_ipv6() && prefix >= 96 => Ok(Cidr {
                addr: v4,
                prefix: prefix - 96,
            }),
            _ => Ok(Cidr { addr, prefix }),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map_err(de::Error::custom)
    }
}

// JSON Schema: these are strings (or integers) an editor can check by pattern.
macro_rules! string_schema {
    ($t:ty, $name:literal, $types:expr, $pattern:literal, $desc:literal) => {
        impl schemars::JsonSchema for $t {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": $types, "pattern": $pattern, "description": $desc })
            }
        }
    };
}
string_schema!(
    ByteSize,
    "ByteSize",
    ["string", "integer"],
    "^[0-9]+ ?([kK]|KB|kB|KiB|M|MB|MiB|G|GB|GiB|B)?$",
    "a size: bytes, or with a unit such as 25MiB"
);
impl schemars::JsonSchema for Secs {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let u = time_unit_pattern();
        schemars::json_schema!({
            "type": ["string", "integer"],
            "pattern": format!("^ *(?:[0-9]+ *{u}?|{u}) *$"),
            "description": "a duration such as 30s, 5m, 250ms, 1hour, 30d (bare number = seconds)"
        })
    }
}
impl schemars::JsonSchema for Rate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let u = time_unit_pattern();
        schemars::json_schema!({
            "type": "string",
            "pattern": format!("^ *[0-9]+ */ *(?:[0-9]+ *{u}?|{u}) *$"),
            "description": "COUNT/PERIOD such as 20/minute, 5/15minutes, 500/1hour (the period is a duration)"
        })
    }
}
string_schema!(
    Cidr,
    "Network",
    "string",
    "^[0-9a-fA-F:.]+(/[0-9]{1,3})?$",
    "an IP network such as 192.0.2.0/24 or 2001:db8::/32"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("25MiB").unwrap().0, 25 * 1024 * 1024);
        assert_eq!(ByteSize::parse("1000").unwrap().0, 1000);
        assert_eq!(ByteSize::parse("10 KB").unwrap().0, 10_000);
        assert!(ByteSize::parse("10 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999999999999GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(Secs::parse("5m").unwrap().0, Duration::from_secs(300));
        assert_eq!(Secs::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Secs::parse("7").unwrap().0, Duration::from_secs(7));
        assert_eq!(Secs::parse("2d").unwrap().0, Duration::from_secs(172_800));
        assert!(Secs::parse("5 weeks").is_err());
    }

    /// Issue 12.6: durations and rate periods share one unit table, so
    /// `1hour` is a duration as `5/1hour` is a rate, and `5/15m` a rate as
    /// `15m` is a duration.
    #[test]
    fn durations_and_rates_share_their_units() {
        let hour = Duration::from_secs(3600);
        assert_eq!(Secs::parse("1hour").unwrap().0, hour);
        assert_eq!(Secs::parse("1 h").unwrap().0, hour);
        assert_eq!(
            Secs::parse("15minutes").unwrap().0,
            Duration::from_secs(900)
        );
        assert_eq!(
            Secs::parse("2 days").unwrap().0,
            Duration::from_secs(172_800)
        );
        let rate = |s: &str| Rate::parse(s).map(|r| (r.count, r.period));
        assert_eq!(rate("5/1hour"), Ok((5, hour)));
        assert_eq!(rate("5/hour"), Ok((5, hour)));
        assert_eq!(rate("5/1h"), Ok((5, hour)));
        assert_eq!(rate("20/minute"), Ok((20, Duration::from_secs(60))));
        assert_eq!(rate("5/15minutes"), Ok((5, Duration::from_secs(900))));
        assert_eq!(rate("5/15m"), Ok((5, Duration::from_secs(900))));
        assert_eq!(rate("500/hour"), Ok((500, hour)));
        assert_eq!(rate("1000/day"), Ok((1000, Duration::from_secs(86_400))));
        assert_eq!(rate("10/2s"), Ok((10, Duration::from_secs(2))));
        assert_eq!(rate(" 5 / 15 minutes "), Ok((5, Duration::from_secs(900))));
        for (names, _) in TIME_UNITS {
            for n in *names {
                let d = Secs::parse(&format!("3{n}")).unwrap().0;
                assert_eq!(rate(&format!("7/3{n}")), Ok((7, d)), "{n}");
            }
        }
        for bad in [
            "0/hour",
            "5/fortnight",
            "5",
            "x/minute",
            "5/0s",
            "5/",
            "/minute",
            "5/36600days",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert!(Secs::parse("").is_err());
        assert!(Secs::parse("36600d").is_err());
    }

    #[test]
    fn cidrs() {
        let n = Cidr::parse("192.0.2.0/24").unwrap();
        assert!(n.contains("192.0.2.77".parse().unwrap()));
        assert!(!n.contains("192.0.3.1".parse().unwrap()));
        assert!(n.contains("::ffff:192.0.2.1".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("banana").is_err());
        assert_eq!(Cidr::parse("10.1.2.3").unwrap().prefix, 32);
    }

    #[test]
    fn mapped_cidrs_are_ipv4() {
        let one = Cidr::parse("::ffff:192.0.2.1/128").unwrap();
        assert!(one.contains("192.0.2.1".parse().unwrap()));
        assert!(one.contains("::ffff:192.0.2.1".parse().unwrap()));
        assert!(!one.contains("192.0.2.2".parse().unwrap()));
        assert_eq!(one.to_string(), "192.0.2.1/32");
        let net = Cidr::parse("::ffff:192.0.2.0/120").unwrap();
        assert_eq!(net.to_string(), "192.0.2.0/24");
        assert!(net.contains("192.0.2.200".parse().unwrap()));
        assert!(Cidr::parse("192.0.2.1")
            .unwrap()
            .contains("::ffff:192.0.2.1".parse().unwrap()));
        // a wider IPv6 network stays IPv6: "all of IPv6" is not "all of IPv4"
        assert!(!Cidr::parse("::/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        assert_eq!(
            canonical("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
