//! What the backends announced (SMTP EHLO, POP3 CAPA), parsed without I/O,
//! and the one cache both protocols read it from. Clients are answered
//! (EHLO, CAPA) before any backend connection of their own exists, so what
//! mailgate may advertise end to end comes from this cache: filled by every
//! real backend connection and by probes (`probe.rs`, and the POP3 driver's
//! one-off probe), owned by the gateway and reached through the session
//! context. Keyed by backend name and address, so a reload that points a
//! name elsewhere does not inherit the old server's capabilities.

use super::Backend;
use crate::mail::{Body, MailParams};
use std::collections::HashMap;
use std::sync::RwLock;

/// What an SMTP backend can carry end to end (from its EHLO), which bounds
/// what mailgate advertises and passes on. The default is the conservative
/// assumption until a backend has answered (no 8BITMIME, no SMTPUTF8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmtpCaps {
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub pipelining: bool,
    /// AUTH mechanisms the backend offers (credentials are relayed in one of them).
    pub auth_plain: bool,
    pub auth_login: bool,
    /// The backend's SIZE limit, if it announced one (0 = no limit).
    pub size: Option<u64>,
}

impl SmtpCaps {
    /// The extension a MAIL with `params` needs end to end that these
    /// capabilities lack, if any. A session promises extensions from the
    /// cache (its EHLO is answered before its backend connection exists),
    /// and the connection it then gets may say otherwise: the backend was
    /// reconfigured since, or answers this client's EHLO differently after
    /// XCLIENT. Leaving the parameter out would hand the backend an 8-bit
    /// body or address it never agreed to (RFC 6152 §3, RFC 6531 §3.4).
    pub fn lacks(&self, params: &MailParams) -> Option<&'static str> {
        if params.smtputf8 && !self.smtputf8 {
            return Some("SMTPUTF8");
        }
        if params.body == Some(Body::EightBitMime) && !self.eightbitmime {
            return Some("8BITMIME");
        }
        None
    }
}

/// Everything an EHLO answer tells the backend client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ehlo {
    pub caps: SmtpCaps,
    pub starttls: bool,
    /// SIZE was announced (with or without a limit): MAIL may carry SIZE=.
    pub size_ext: bool,
    /// The XCLIENT attributes, if XCLIENT is offered.
    pub xclient: Option<Vec<String>>,
}

impl Ehlo {
    /// Parses the extension lines of a 250 EHLO answer (the lines after the
    /// first, which is the greeting name).
    pub fn parse<S: AsRef<str>>(extensions: &[S]) -> Ehlo {
        let mut e = Ehlo::default();
        for ext in extensions {
            let mut words = ext.as_ref().split_whitespace();
            match words.next().map(|w| w.to_ascii_uppercase()).as_deref() {
                Some("8BITMIME") => e.caps.eightbitmime = true,
                Some("SMTPUTF8") => e.caps.smtputf8 = true,
                Some("PIPELINING") => e.caps.pipelining = true,
                Some("STARTTLS") => e.starttls = true,
                Some("XCLIENT") => e.xclient = Some(words.by_ref().map(str::to_string).collect()),
                Some(w) if w == "AUTH" || w.starts_with("AUTH=") => {
                    let first = w
                        .strip_prefix("AUTH=")
                        .filter(|m| !m.is_empty())
                        .map(str::to_string);
                    for m in first
                        .into_iter()
                        .chain(words.map(|m| m.to_ascii_uppercase()))
                    {
                        match m.as_str() {
                            "PLAIN" => e.caps.auth_plain = true,
                            "LOGIN" => e.caps.auth_login = true,
                            _ => {}
                        }
                    }
                }
                Some("SIZE") => {
                    e.size_ext = true;
                    e.caps.size = words.next().and_then(|n| n.parse().ok());
                }
                _ => {}
            }
        }
        e
    }
}

/// What a POP3 backend announced in its CAPA answer (RFC 2449), which bounds
/// what mailgate advertises and how it replays a login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pop3Caps {
    /// The backend answered CAPA at all (false: an RFC 1939-only server).
    pub capa: bool,
    pub user: bool,
    pub sasl_plain: bool,
    pub top: bool,
    pub uidl: bool,
    pub pipelining: bool,
    pub resp_codes: bool,
    pub auth_resp_code: bool,
}

impl Pop3Caps {
    /// A server that does not know CAPA: RFC 1939 only. USER/PASS is optional
    /// there but universal, so it is assumed; optional commands are not.
    pub fn rfc1939() -> Self {
        Pop3Caps {
            user: true,
            ..Default::default()
        }
    }

    /// Parses the lines of a CAPA answer (without the status line and the final dot).
    pub fn from_capa<S: AsRef<str>>(lines: &[S]) -> Self {
        let mut c = Pop3Caps {
            capa: true,
            ..Default::default()
        };
        for l in lines {
            let mut words = l.as_ref().split_ascii_whitespace();
            let Some(tag) = words.next() else { continue };
            match tag.to_ascii_uppercase().as_str() {
                "USER" => c.user = true,
                "TOP" => c.top = true,
                "UIDL" => c.uidl = true,
                "PIPELINING" => c.pipelining = true,
                "RESP-CODES" => c.resp_codes = true,
                "AUTH-RESP-CODE" => c.auth_resp_code = true,
                "SASL" if words.any(|m| m.eq_ignore_ascii_case("PLAIN")) => c.sasl_plain = true,
                _ => {}
            }
        }
        c
    }
}

/// What an IMAP backend announced (its `CAPABILITY` list, RFC 9051 §7.2.2),
/// which decides how a login is replayed and whether it can be at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImapCaps {
    pub imap4rev1: bool,
    pub imap4rev2: bool,
    pub auth_plain: bool,
    /// SASL initial response in AUTHENTICATE (RFC 4959)
    pub sasl_ir: bool,
    /// non-synchronising literals of any size (RFC 7888)
    pub literal_plus: bool,
    /// non-synchronising literals up to 4096 octets (RFC 7888)
    pub literal_minus: bool,
    /// the ID command (RFC 2971), needed for `identity: [imap_id]`
    pub id: bool,
    /// LOGIN (and every plaintext mechanism) refused here
    pub logindisabled: bool,
    pub starttls: bool,
    pub idle: bool,
}

impl ImapCaps {
    /// Parses a capability list (`IMAP4rev1 SASL-IR AUTH=PLAIN …`), case-insensitively.
    pub fn parse(list: &str) -> Self {
        let mut c = ImapCaps::default();
        for w in list.split_ascii_whitespace() {
            match w.to_ascii_uppercase().as_str() {
                "IMAP4REV1" => c.imap4rev1 = true,
                "IMAP4REV2" => c.imap4rev2 = true,
                "AUTH=PLAIN" => c.auth_plain = true,
                "SASL-IR" => c.sasl_ir = true,
                "LITERAL+" => c.literal_plus = true,
                "LITERAL-" => c.literal_minus = true,
                "ID" => c.id = true,
                "LOGINDISABLED" => c.logindisabled = true,
                "STARTTLS" => c.starttls = true,
                "IDLE" => c.idle = true,
                _ => {}
            }
        }
        c
    }
}

/// The last capabilities each backend announced, for both protocols.
#[derive(Default)]
pub struct CapsCache {
    smtp: RwLock<HashMap<String, SmtpCaps>>,
    pop3: RwLock<HashMap<String, Pop3Caps>>,
}

fn key(b: &Backend) -> String {
    format!("{}\0{}", b.name, b.address)
}

fn get<T: Clone>(map: &RwLock<HashMap<String, T>>, b: &Backend) -> Option<T> {
    map.read().ok()?.get(&key(b)).cloned()
}

fn set<T: PartialEq + std::fmt::Debug>(
    map: &RwLock<HashMap<String, T>>,
    b: &Backend,
    caps: T,
    protocol: &str,
) {
    let key = key(b);
    // every new backend connection (and every re-told kept one) reports
    // here, nearly always what is known already: readers do not wait then
    if map.read().is_ok_and(|m| m.get(&key) == Some(&caps)) {
        return;
    }
    if let Ok(mut m) = map.write() {
        if m.get(&key) != Some(&caps) {
            tracing::info!(backend = %b.name, protocol, ?caps, "backend capabilities");
            m.insert(key, caps);
        }
    }
}

impl CapsCache {
    /// What the SMTP backend announced last, or the conservative default.
    pub fn smtp(&self, b: &Backend) -> SmtpCaps {
        get(&self.smtp, b).unwrap_or_default()
    }

    pub fn set_smtp(&self, b: &Backend, caps: SmtpCaps) {
        set(&self.smtp, b, caps, "smtp");
    }

    /// What the POP3 backend announced last time anyone connected, if ever.
    pub fn pop3(&self, b: &Backend) -> Option<Pop3Caps> {
        get(&self.pop3, b)
    }

    pub fn set_pop3(&self, b: &Backend, caps: Pop3Caps) {
        set(&self.pop3, b, caps, "pop3");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, address: &str) -> Backend {
        Backend {
            name: name.into(),
            address: address.into(),
            helo_name: "gw.test".into(),
            xclient: false,
            proxy_v2: false,
            tls: None,
            identity_optional: false,
            imap_id: false,
            reuse: Default::default(),
        }
    }

    #[test]
    fn imap_capability_lists() {
        let c = ImapCaps::parse(
            "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ auth=plain AUTH=LOGIN",
        );
        assert!(c.imap4rev1 && !c.imap4rev2 && c.sasl_ir && c.id && c.idle);
        assert!(c.literal_plus && !c.literal_minus && c.auth_plain);
        assert!(!c.logindisabled && !c.starttls);
        let d = ImapCaps::parse("imap4rev2 STARTTLS LOGINDISABLED LITERAL- AUTH=PLAINX");
        assert!(d.imap4rev2 && d.starttls && d.logindisabled && d.literal_minus);
        assert!(!d.auth_plain && !d.literal_plus);
        assert_eq!(ImapCaps::parse(""), ImapCaps::default());
    }

    #[test]
    fn ehlo_extensions() {
        let e = Ehlo::parse(&[
            "8bitmime",
            "SIZE 1000",
            "PIPELINING",
            "AUTH=LOGIN",
            "AUTH plain cram-md5",
            "STARTTLS",
            "XCLIENT NAME ADDR HELO",
        ]);
        assert!(e.caps.eightbitmime && e.caps.pipelining && !e.caps.smtputf8);
        assert!(e.caps.auth_plain && e.caps.auth_login);
        assert_eq!(e.caps.size, Some(1000));
        assert!(e.size_ext && e.starttls);
        assert_eq!(
            e.xclient.as_deref(),
            Some(&["NAME", "ADDR", "HELO"].map(String::from)[..])
        );
        let bare = Ehlo::parse(&["SIZE"]);
        assert!(bare.size_ext && bare.caps.size.is_none() && bare.xclient.is_none());
    }

    #[test]
    fn capa_lines() {
        let c = Pop3Caps::from_capa(&["user", "sasl login cram-md5", ""]);
        assert!(c.capa && c.user && !c.sasl_plain);
        assert!(Pop3Caps::from_capa(&["SASL PLAIN"]).sasl_plain);
        assert!(Pop3Caps::rfc1939().user && !Pop3Caps::rfc1939().capa);
    }

    /// What a MAIL needs of the connection it goes over: BODY=7BIT and SIZE
    /// need nothing (left out where not offered), 8BITMIME and SMTPUTF8 do.
    #[test]
    fn a_mail_lacks_only_the_extensions_its_parameters_need() {
        let none = SmtpCaps::default();
        let all = SmtpCaps {
            eightbitmime: true,
            smtputf8: true,
            ..Default::default()
        };
        let p = |body, smtputf8| MailParams {
            size: Some(10),
            body,
            smtputf8,
        };
        assert_eq!(none.lacks(&p(None, false)), None);
        assert_eq!(none.lacks(&p(Some(Body::SevenBit), false)), None);
        assert_eq!(
            none.lacks(&p(Some(Body::EightBitMime), false)),
            Some("8BITMIME")
        );
        assert_eq!(none.lacks(&p(None, true)), Some("SMTPUTF8"));
        assert_eq!(all.lacks(&p(Some(Body::EightBitMime), true)), None);
    }

    /// One cache for both protocols; an address change is another backend.
    #[test]
    fn one_cache_keyed_by_name_and_address() {
        let cache = CapsCache::default();
        let a = backend("b", "127.0.0.1:25");
        assert_eq!(cache.smtp(&a), SmtpCaps::default());
        assert_eq!(cache.pop3(&a), None);
        let caps = SmtpCaps {
            eightbitmime: true,
            ..Default::default()
        };
        cache.set_smtp(&a, caps.clone());
        cache.set_pop3(&a, Pop3Caps::rfc1939());
        assert_eq!(cache.smtp(&a), caps);
        assert_eq!(cache.pop3(&a), Some(Pop3Caps::rfc1939()));
        let moved = backend("b", "127.0.0.1:26");
        assert_eq!(cache.smtp(&moved), SmtpCaps::default());
        assert_eq!(cache.pop3(&moved), None);
    }
}
