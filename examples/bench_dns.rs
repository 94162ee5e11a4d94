//! The loopback DNS server of `bench/hardening.sh`: authoritative for the
//! generated zones of the hardening figures (issues 11 and 19), UDP and TCP on
//! one port, counting every query it receives.
//!
//! ```text
//! cargo run --release --ignore-rust-version --example bench_dns -- \
//!     --key-file dkim.b64 --count-file count --port-file port [--big-terms 30000] [--lifetime 3600]
//! ```
//! Zones (every other name: NXDOMAIN):
//! * `<anything>._domainkey.<anything>` TXT: `v=DKIM1; k=rsa; p=<key-file>` (a real
//!   public key, so every signature is hashed and then fails);
//! * `<label>.big.example` TXT: `v=spf1` + `--big-terms` ` a` terms (~60 KB:
//!   UDP answers get TC, the resolver retries over TCP); other types NODATA;
//! * `vN.void.example` TXT: `v=spf1 mx:m1.vN.void.example … mx:m10.vN.void.example -all`;
//!   `mK.vN.void.example` MX: ten hosts `hJ.mK.vN.void.example`, which are NXDOMAIN
//!   (void lookups); other types NODATA.
//!
//! The query count is written to `--count-file` (at most every 50 ms, when it
//! changed); the port is written to `--port-file` once both sockets are bound.
//! The server exits by itself after `--lifetime` seconds.

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{MX, SOA, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

enum Answer {
    Txt(String),
    Mx(Vec<String>),
    NoData,
    NxDomain,
}

struct Zones {
    dkim_key: String,
    big_terms: usize,
}

impl Zones {
    fn answer(&self, qname: &str, qtype: RecordType) -> Answer {
        let name = qname.trim_end_matches('.').to_ascii_lowercase();
        let txt = qtype == RecordType::TXT;
        if name.contains("._domainkey.") {
            return if txt {
                Answer::Txt(format!("v=DKIM1; k=rsa; p={}", self.dkim_key))
            } else {
                Answer::NoData
            };
        }
        if let Some(label) = name.strip_suffix(".big.example") {
            if label.contains('.') {
                return Answer::NxDomain;
            }
            return if txt {
                Answer::Txt(format!("v=spf1{}", " a".repeat(self.big_terms)))
            } else {
                Answer::NoData
            };
        }
        if let Some(rest) = name.strip_suffix(".void.example") {
            return match rest.matches('.').count() {
                // hJ.mK.vN.void.example: the MX hosts, NXDOMAIN (void lookups)
                2.. => Answer::NxDomain,
                1 if qtype == RecordType::MX => {
                    Answer::Mx((1..=10).map(|j| format!("h{j}.{name}")).collect())
                }
                1 => Answer::NoData,
                _ if txt => {
                    let mx: String = (1..=10).map(|k| format!(" mx:m{k}.{name}")).collect();
                    Answer::Txt(format!("v=spf1{mx} -all"))
                }
                _ => Answer::NoData,
            };
        }
        Answer::NxDomain
    }
}

struct Handler {
    zones: Zones,
    count: Arc<AtomicU64>,
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
        self.count.fetch_add(1, Ordering::Relaxed);
        let Ok(info) = request.request_info() else {
            return silent();
        };
        let qname = info.query.name().to_string();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let builder = MessageResponseBuilder::new(&request.queries, request.edns.as_ref());
        let owner = Name::from(info.query.name().clone());
        let (records, data_len, soa) = match self.zones.answer(&qname, info.query.query_type()) {
            Answer::Txt(text) => {
                let parts: Vec<&[u8]> = text.as_bytes().chunks(255).collect();
                let rec = Record::from_rdata(owner, 300, RData::TXT(TXT::from_bytes(parts)));
                (vec![rec], text.len() + text.len() / 255 + 1, Vec::new())
            }
            Answer::Mx(hosts) => {
                let recs = hosts
                    .iter()
                    .enumerate()
                    .filter_map(|(i, h)| {
                        let target = Name::from_str_relaxed(format!("{h}.")).ok()?;
                        let data = RData::MX(MX::new(10 + i as u16, target));
                        Some(Record::from_rdata(owner.clone(), 300, data))
                    })
                    .collect();
                (recs, hosts.iter().map(|h| h.len() + 4).sum(), Vec::new())
            }
            negative => {
                if matches!(negative, Answer::NxDomain) {
                    metadata.response_code = ResponseCode::NXDomain;
                }
                // an SOA as a real authoritative server sends (RFC 2308), so
                // that negative answers may be cached
                let n = |s: &str| Name::from_str_relaxed(s).ok();
                let soa = match (n("example."), n("ns.example."), n("hostmaster.example.")) {
                    (Some(o), Some(m), Some(r)) => vec![Record::from_rdata(
                        o,
                        300,
                        RData::SOA(SOA::new(m, r, 1, 3600, 600, 86400, 300)),
                    )],
                    _ => Vec::new(),
                };
                (Vec::new(), 0, soa)
            }
        };
        let size = 12 + 2 * qname.len() + 20 + data_len;
        let udp = request.protocol() == hickory_server::net::xfer::Protocol::Udp;
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

#[tokio::main]
async fn main() {
    let mut key_file = None;
    let mut count_file = None;
    let mut port_file = None;
    let mut big_terms = 30_000;
    let mut lifetime = 3600;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--key-file" => key_file = Some(v),
            "--count-file" => count_file = Some(v),
            "--port-file" => port_file = Some(v),
            "--big-terms" => big_terms = v.parse().expect("--big-terms N"),
            "--lifetime" => lifetime = v.parse().expect("--lifetime SECONDS"),
            other => panic!("unknown argument {other}"),
        }
    }
    let dkim_key = std::fs::read_to_string(key_file.expect("--key-file"))
        .expect("key file")
        .trim()
        .to_string();
    let count_file = count_file.expect("--count-file");
    let count = Arc::new(AtomicU64::new(0));
    let mut server = Server::new(Handler {
        zones: Zones {
            dkim_key,
            big_terms,
        },
        count: count.clone(),
    });
    // UDP and TCP on the same port: take a free UDP port, retry if TCP has it.
    let (udp, tcp) = loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let port = udp.local_addr().unwrap().port();
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64);
    std::fs::write(&count_file, "0\n").expect("count file");
    std::fs::write(port_file.expect("--port-file"), format!("{port}\n")).expect("port file");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(lifetime);
    let mut written = 0;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = count.load(Ordering::Relaxed);
        if n != written {
            // write then rename: a reader never sees a half-written number
            let tmp = format!("{count_file}.tmp");
            std::fs::write(&tmp, format!("{n}\n")).expect("count file");
            std::fs::rename(&tmp, &count_file).expect("count file");
            written = n;
        }
    }
}
