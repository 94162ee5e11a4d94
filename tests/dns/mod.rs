//! A small authoritative DNS server for the conformance tests: hickory-server
//! on 127.0.0.1 (UDP and TCP on the same port) with a hand-written handler, so
//! that the zone rules of the pyspf test driver (`testspf.py`) can be copied
//! exactly, timeouts included (a timeout is simply no reply).
//!
//! Zone rules (from `tests/data/spf/PROVENANCE.md` and `testspf.py`):
//! * entries of a name are scanned in order; a `TIMEOUT` item times the name
//!   out unless a record of the queried type was seen before it;
//! * `NONE` values are dropped (but a `TXT: NONE` still stops the SPF→TXT copy);
//! * a name without any `TXT` entry serves its `SPF` entries as TXT, appended
//!   after all other entries (so a `TIMEOUT` before them wins);
//! * names not listed: NXDOMAIN, or a timeout for names starting with `error.`;
//! * CNAMEs are followed inside the zone (at most 8 deep), as an authoritative
//!   server with the target in the same zone would answer.

#![allow(dead_code)] // each test binary uses a different part

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SOA, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Type {
    A,
    Aaaa,
    Mx,
    Txt,
    Spf,
    Ptr,
    Cname,
}

impl Type {
    fn parse(s: &str) -> Option<Type> {
        Some(match s.to_ascii_uppercase().as_str() {
            "A" => Type::A,
            "AAAA" => Type::Aaaa,
            "MX" => Type::Mx,
            "TXT" => Type::Txt,
            "SPF" => Type::Spf,
            "PTR" => Type::Ptr,
            "CNAME" => Type::Cname,
            _ => return None,
        })
    }

    fn of(rt: RecordType) -> Option<Type> {
        Some(match rt {
            RecordType::A => Type::A,
            RecordType::AAAA => Type::Aaaa,
            RecordType::MX => Type::Mx,
            RecordType::TXT => Type::Txt,
            RecordType::PTR => Type::Ptr,
            RecordType::CNAME => Type::Cname,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Timeout,
    /// Character-strings of one TXT/SPF record.
    Txt(Vec<Vec<u8>>),
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Mx(u16, String),
    /// PTR or CNAME target.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Timeout,
    Rec(Type, Value),
}

#[derive(Debug, Clone, Default)]
pub struct Zone {
    names: HashMap<String, Vec<Entry>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Records(Vec<(String, Value)>),
    NoData,
    NxDomain,
    Timeout,
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Splits text into ≤255-byte character-strings, as a zone file does.
pub fn txt_strings(text: &[u8]) -> Vec<Vec<u8>> {
    if text.is_empty() {
        return vec![Vec::new()];
    }
    text.chunks(255).map(<[u8]>::to_vec).collect()
}

impl Zone {
    pub fn new() -> Self {
        Zone::default()
    }

    pub fn push(&mut self, name: &str, e: Entry) {
        self.names.entry(norm(name)).or_default().push(e);
    }

    pub fn add_txt(&mut self, name: &str, text: &str) {
        self.push(
            name,
            Entry::Rec(Type::Txt, Value::Txt(txt_strings(text.as_bytes()))),
        );
    }

    pub fn add_a(&mut self, name: &str, ip: Ipv4Addr) {
        self.push(name, Entry::Rec(Type::A, Value::A(ip)));
    }

    /// The `zonedata` map of one pyspf scenario.
    pub fn from_pyspf(zonedata: &serde_yaml::Value) -> Zone {
        let mut z = Zone::new();
        let Some(map) = zonedata.as_mapping() else {
            return z;
        };
        for (name, items) in map {
            let name = yaml_str(name);
            let mut entries = Vec::new();
            let mut generated = Vec::new();
            let mut gen = true;
            for item in items.as_sequence().into_iter().flatten() {
                if yaml_str(item) == "TIMEOUT" {
                    entries.push(Entry::Timeout);
                    continue;
                }
                let Some(m) = item.as_mapping() else { continue };
                for (t, v) in m {
                    let Some(t) = Type::parse(&yaml_str(t)) else {
                        continue;
                    };
                    if t == Type::Txt {
                        gen = false;
                    }
                    let value = match (t, v) {
                        (_, v) if yaml_str(v) == "NONE" => None,
                        (_, v) if yaml_str(v) == "TIMEOUT" => Some(Value::Timeout),
                        (Type::Txt | Type::Spf, serde_yaml::Value::Sequence(parts)) => Some(
                            Value::Txt(parts.iter().map(|p| yaml_str(p).into_bytes()).collect()),
                        ),
                        (Type::Txt | Type::Spf, v) => {
                            Some(Value::Txt(vec![yaml_str(v).into_bytes()]))
                        }
                        (Type::A, v) => yaml_str(v).parse().ok().map(Value::A),
                        (Type::Aaaa, v) => yaml_str(v).parse().ok().map(Value::Aaaa),
                        (Type::Mx, serde_yaml::Value::Sequence(pv)) if pv.len() == 2 => Some(
                            Value::Mx(pv[0].as_u64().unwrap_or(0) as u16, yaml_str(&pv[1])),
                        ),
                        (Type::Ptr | Type::Cname, v) => Some(Value::Name(yaml_str(v))),
                        _ => None,
                    };
                    if t == Type::Spf {
                        if let Some(v) = &value {
                            generated.push(Entry::Rec(Type::Txt, v.clone()));
                        }
                    }
                    if let Some(v) = value {
                        entries.push(Entry::Rec(t, v));
                    }
                }
            }
            if gen {
                entries.extend(generated);
            }
            z.names.entry(norm(&name)).or_default().extend(entries);
        }
        z
    }

    /// A BIND zone fragment with `$ORIGIN` (relative origins allowed), `@`,
    /// comments, and TXT / A / AAAA / MX records: enough for the OpenDMARC
    /// fixture.
    pub fn add_bind(&mut self, text: &str, origin: &str) {
        let mut origin = norm(origin);
        let mut last = origin.clone();
        for raw in text.lines() {
            let line = strip_comment(raw);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(o) = line.trim().strip_prefix("$ORIGIN") {
                let o = o.trim();
                origin = if o.ends_with('.') {
                    norm(o)
                } else {
                    format!("{}.{origin}", norm(o))
                };
                continue;
            }
            let mut toks = tokens(line);
            let name = if line.starts_with(' ') || line.starts_with('\t') {
                last.clone()
            } else {
                let n = toks.remove(0);
                let n = if n == "@" {
                    origin.clone()
                } else if n.ends_with('.') {
                    norm(&n)
                } else {
                    format!("{}.{origin}", n.to_ascii_lowercase())
                };
                last = n.clone();
                n
            };
            // [ttl] [class] type rdata...
            while let Some(t) = toks.first() {
                if t.eq_ignore_ascii_case("IN") || t.bytes().all(|b| b.is_ascii_digit()) {
                    toks.remove(0);
                } else {
                    break;
                }
            }
            if toks.is_empty() {
                continue;
            }
            let rtype = toks.remove(0).to_ascii_uppercase();
            let abs = |n: &str| {
                if n.ends_with('.') {
                    norm(n)
                } else {
                    format!("{}.{origin}", n.to_ascii_lowercase())
                }
            };
            let value = match rtype.as_str() {
                "TXT" => Value::Txt(toks.iter().map(|t| t.as_bytes().to_vec()).collect()),
                "A" => Value::A(toks[0].parse().expect("A")),
                "AAAA" => Value::Aaaa(toks[0].parse().expect("AAAA")),
                "MX" => Value::Mx(toks[0].parse().expect("MX pref"), abs(&toks[1])),
                "CNAME" => Value::Name(abs(&toks[0])),
                _ => continue,
            };
            let t = Type::parse(&rtype).expect("type");
            self.push(&name, Entry::Rec(t, value));
        }
    }

    pub fn query(&self, name: &str, qtype: Type) -> Answer {
        self.query_depth(&norm(name), qtype, 0)
    }

    fn query_depth(&self, name: &str, qtype: Type, depth: usize) -> Answer {
        let Some(entries) = self.names.get(name) else {
            if name.starts_with("error.") {
                return Answer::Timeout;
            }
            // An empty non-terminal (a parent of listed names) exists: NODATA.
            let suffix = format!(".{name}");
            if self.names.keys().any(|k| k.ends_with(&suffix)) {
                return Answer::NoData;
            }
            return Answer::NxDomain;
        };
        let mut seen = false;
        let mut records = Vec::new();
        let mut cname = None;
        for e in entries {
            match e {
                Entry::Timeout => {
                    if !seen {
                        return Answer::Timeout;
                    }
                    break;
                }
                Entry::Rec(t, v) => {
                    if *t == qtype {
                        seen = true;
                    }
                    if *v == Value::Timeout {
                        if *t == qtype {
                            return Answer::Timeout;
                        }
                        continue;
                    }
                    if *t == qtype {
                        records.push((name.to_string(), v.clone()));
                    } else if *t == Type::Cname && cname.is_none() {
                        cname = Some(v.clone());
                    }
                }
            }
        }
        if records.is_empty() {
            if let (Some(Value::Name(target)), true) = (cname, qtype != Type::Cname) {
                let mut out = vec![(name.to_string(), Value::Name(target.clone()))];
                if depth < 8 {
                    match self.query_depth(&norm(&target), qtype, depth + 1) {
                        Answer::Records(r) => out.extend(r),
                        Answer::Timeout => return Answer::Timeout,
                        _ => {}
                    }
                }
                return Answer::Records(out);
            }
            return Answer::NoData;
        }
        Answer::Records(records)
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_q = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_q = !in_q,
            ';' if !in_q => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Whitespace-separated tokens; quoted strings are one token without quotes.
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => {
                        if let Some(n) = chars.next() {
                            s.push(n)
                        }
                    }
                    c => s.push(c),
                }
            }
            out.push(s);
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                s.push(c);
                chars.next();
            }
            out.push(s);
        }
    }
    out
}

pub fn yaml_str(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Null => String::new(),
        other => format!("{other:?}"),
    }
}

struct Handler {
    zone: Arc<RwLock<Zone>>,
    log: Arc<Mutex<Vec<(String, RecordType)>>>,
}

fn rdata(v: &Value) -> Option<RData> {
    let name = |s: &str| Name::from_str_relaxed(format!("{}.", norm(s))).ok();
    Some(match v {
        Value::Txt(parts) => RData::TXT(TXT::from_bytes(parts.iter().map(Vec::as_slice).collect())),
        Value::A(ip) => RData::A(A(*ip)),
        Value::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
        Value::Mx(p, n) => RData::MX(MX::new(*p, name(n)?)),
        Value::Name(n) => RData::PTR(PTR(name(n)?)),
        Value::Timeout => return None,
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let silent = || {
            ResponseInfo::from(Header {
                metadata: Metadata::response_from_request(&request.metadata),
                counts: HeaderCounts::default(),
            })
        };
        let Ok(info) = request.request_info() else {
            return silent();
        };
        // the name as asked (A-labels): hickory's Display shows U-labels
        let qname = info.query.name().to_ascii();
        let rtype = info.query.query_type();
        self.log.lock().unwrap().push((norm(&qname), rtype));
        let answer = match Type::of(rtype) {
            Some(t) => self.zone.read().unwrap().query(&qname, t),
            None => Answer::NoData,
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let builder = MessageResponseBuilder::new(&request.queries, request.edns.as_ref());
        let records: Vec<Record> = match answer {
            Answer::Timeout => return silent(),
            Answer::NxDomain => {
                metadata.response_code = ResponseCode::NXDomain;
                Vec::new()
            }
            Answer::NoData => Vec::new(),
            Answer::Records(rs) => rs
                .iter()
                .filter_map(|(owner, v)| {
                    let owner = Name::from_str_relaxed(format!("{owner}.")).ok()?;
                    let data = match (v, Type::of(rtype)) {
                        // a CNAME in the chain of a non-CNAME query
                        (Value::Name(n), Some(t)) if t != Type::Ptr => RData::CNAME(CNAME(
                            Name::from_str_relaxed(format!("{}.", norm(n))).ok()?,
                        )),
                        (v, _) => rdata(v)?,
                    };
                    Some(Record::from_rdata(owner, 300, data))
                })
                .collect(),
        };
        // UDP answers that would not fit: truncate, the resolver retries over TCP.
        let size: usize = 12
            + qname.len()
            + 6
            + records
                .iter()
                .map(|r| r.name.to_string().len() + 12 + rdata_len(&r.data))
                .sum::<usize>();
        let udp = request.protocol() == hickory_server::net::xfer::Protocol::Udp;
        // Negative answers carry an SOA (RFC 2308) like a real authoritative
        // server's, so that resolvers and mail-auth may cache them; names
        // with a `nosoa` label get none (uncacheable, as some servers answer).
        let soa_less = qname.split('.').any(|l| l.eq_ignore_ascii_case("nosoa"));
        let soa: Vec<Record> = if records.is_empty() && !soa_less {
            let apex = qname
                .trim_end_matches('.')
                .rsplit('.')
                .next()
                .unwrap_or("test");
            let n = |s: &str| Name::from_str_relaxed(s).ok();
            match (n(&format!("{apex}.")), n("ns.test."), n("hostmaster.test.")) {
                (Some(owner), Some(m), Some(r)) => {
                    vec![Record::from_rdata(
                        owner,
                        300,
                        RData::SOA(SOA::new(m, r, 1, 3600, 600, 86400, 300)),
                    )]
                }
                _ => Vec::new(),
            }
        } else {
            Vec::new()
        };
        let response = if udp && size + 64 > usize::from(request.max_payload()) {
            metadata.truncation = true;
            builder.build(metadata, &[], &[], &[], &[])
        } else {
            builder.build(metadata, records.iter(), &[], soa.iter(), &[])
        };
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => silent(),
        }
    }
}

fn rdata_len(d: &RData) -> usize {
    match d {
        RData::TXT(t) => t.txt_data.iter().map(|s| s.len() + 1).sum(),
        RData::A(_) => 4,
        RData::AAAA(_) => 16,
        _ => 64,
    }
}

/// The signer of the DKIM vectors in `tests/data/dkim/dkimpy`:
/// football.example.com's SPF (127.0.0.0/8, so loopback passes), its DKIM key
/// `test` and DMARC `p=reject`.
pub fn football() -> Zone {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let mut z = Zone::new();
    z.add_txt("football.example.com", "v=spf1 ip4:127.0.0.0/8 -all");
    let key = std::fs::read_to_string(format!("{data}/dkim/dkimpy/test.txt")).unwrap();
    z.add_txt("test._domainkey.football.example.com", key.trim());
    z.add_txt("_dmarc.football.example.com", "v=DMARC1; p=reject");
    z
}

/// A running test DNS server.
pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<RwLock<Zone>>,
    pub log: Arc<Mutex<Vec<(String, RecordType)>>>,
    _server: Server<Handler>,
}

impl TestDns {
    pub async fn start(zone: Zone) -> TestDns {
        let zone = Arc::new(RwLock::new(zone));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut server = Server::new(Handler {
            zone: zone.clone(),
            log: log.clone(),
        });
        // UDP and TCP on the same port: take a free UDP port, retry if TCP has it.
        let (udp, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = tokio::net::TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        TestDns {
            addr,
            zone,
            log,
            _server: server,
        }
    }

    pub fn set_zone(&self, zone: Zone) {
        *self.zone.write().unwrap() = zone;
    }

    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }
}
