//! Small value types of the config format: sizes, durations and CIDR networks.
//! Each parses from the string an operator writes and rejects anything else.

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

/// A duration written as `300ms`, `30s`, `5m`, `1h` or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub Duration);

impl Secs {
    /// The longest duration accepted: every duration ends up as a deadline
    /// `now + d`, which must not overflow (that panics in each session).
    pub const MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

    fn bounded(d: Duration, s: &str) -> Result<Self, String> {
        if d > Self::MAX {
            Err(format!("duration {s:?} is too long (at most 100 years)"))
        } else {
            Ok(Secs(d))
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s or 5m"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
        };
        Self::bounded(d, s)
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
                Secs::bounded(Duration::from_secs(v), &v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secs, E> {
                Secs::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
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
string_schema!(
    Secs,
    "Duration",
    ["string", "integer"],
    "^[0-9]+(ms|s|m|min|h|d)?$",
    "a duration such as 30s, 5m, 250ms, 30d (bare number = seconds)"
);
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
