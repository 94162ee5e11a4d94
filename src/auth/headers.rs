//! Header fields, as pure functions of the outcomes.
//!
//! * [`authentication_results`]: RFC 8601, one result per folded line.
//! * [`received_spf`]: RFC 7208 §9.1.
//! * [`strip_forged`]: removes `Authentication-Results` and
//!   `ARC-Authentication-Results` fields that claim our authserv-id (RFC 8601
//!   §5: such fields arriving from outside can only be forgeries), keeps
//!   every other byte of the message.
//!
//! **ARC.** An `ARC-Authentication-Results` field is covered by the ARC-Seal
//! of its instance, so removing one breaks that chain for everyone after us.
//! It is still right: mailgate never seals, so a set carrying our authserv-id
//! was made by someone else pretending to be us, and a chain with a forged
//! instance must not be trusted downstream. ARC validation runs on the
//! message as received, before this function (see the module comment of
//! `auth`), so our own `arc=` result is not affected.
//!
//! **DKIM.** Only the removed fields change; other fields and the body are
//! copied byte for byte, so existing signatures stay valid unless a signer
//! signed a forged A-R field of ours, which RFC 8601 §5 tells us to remove anyway.

use super::verify::{sanitize, AuthResult, MessageOutcome, SpfIdentity, SpfOutcome};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::ops::Range;

/// Longest value we write into a header (names are ≤ 255, addresses ≤ 320).
const MAX_VALUE: usize = 320;

/// The `Authentication-Results:` field, CRLF-terminated, one result per
/// line. Checks that did not run are left out; nothing at all gives `none`.
pub fn authentication_results(
    authserv_id: &str,
    spf: Option<&SpfOutcome>,
    message: Option<&MessageOutcome>,
) -> String {
    let mut results: Vec<String> = Vec::new();
    if let Some(s) = spf {
        let mut r = format!("spf={}", s.result);
        push_reason(&mut r, s.result, s.reason.as_deref());
        match s.identity {
            SpfIdentity::MailFrom => {
                r.push_str(" smtp.mailfrom=");
                push_addr_pvalue(&mut r, &s.sender);
            }
            SpfIdentity::Helo => {
                r.push_str(" smtp.helo=");
                push_pvalue(&mut r, &s.helo);
            }
        }
        results.push(r);
    }
    if let Some(m) = message {
        if let Some(sigs) = &m.dkim {
            if sigs.is_empty() {
                results.push("dkim=none".into());
            }
            for sig in sigs {
                let mut r = format!("dkim={}", sig.result);
                push_reason(&mut r, sig.result, sig.reason.as_deref());
                if !sig.domain.is_empty() {
                    r.push_str(" header.d=");
                    push_pvalue(&mut r, &sig.domain);
                    r.push_str(" header.s=");
                    push_pvalue(&mut r, &sig.selector);
                    if !sig.algorithm.is_empty() {
                        r.push_str(" header.a=");
                        r.push_str(sig.algorithm);
                    }
                    if !sig.b_prefix.is_empty() {
                        r.push_str(" header.b=");
                        push_pvalue(&mut r, &sig.b_prefix);
                    }
                }
                results.push(r);
            }
        }
        if let Some(d) = &m.dmarc {
            let mut r = format!("dmarc={}", d.result);
            push_reason(&mut r, d.result, d.reason.as_deref());
            if !d.from_domain.is_empty() {
                r.push_str(" header.from=");
                push_pvalue(&mut r, &d.from_domain);
                if d.result != AuthResult::None {
                    r.push_str(" policy.dmarc=");
                    r.push_str(d.policy.as_str());
                }
            }
            results.push(r);
        }
        if let Some(a) = &m.arc {
            let mut r = format!("arc={}", a.result);
            push_reason(&mut r, a.result, a.reason.as_deref());
            r.push_str(" smtp.remote-ip=");
            push_ip(&mut r, m.remote_ip);
            results.push(r);
        }
    }
    let mut h = String::with_capacity(64 + results.iter().map(|r| r.len() + 4).sum::<usize>());
    h.push_str("Authentication-Results: ");
    push_pvalue(&mut h, authserv_id);
    if results.is_empty() {
        h.push_str("; none");
    }
    for r in results {
        h.push_str(";\r\n\t");
        h.push_str(&r);
    }
    h.push_str("\r\n");
    h
}

/// The `Received-SPF:` field (RFC 7208 §9.1), CRLF-terminated.
pub fn received_spf(spf: &SpfOutcome) -> String {
    let receiver = comment_text(&spf.receiver);
    let sender = comment_text(&spf.sender);
    let ip = spf.ip;
    let comment = match spf.result {
        AuthResult::Pass => format!("{receiver}: domain of {sender} designates {ip} as permitted sender"),
        AuthResult::Fail => {
            format!("{receiver}: domain of {sender} does not designate {ip} as permitted sender")
        }
        AuthResult::SoftFail => format!(
            "{receiver}: transitioning domain of {sender} does not designate {ip} as permitted sender"
        ),
        AuthResult::Neutral => {
            format!("{receiver}: {ip} is neither permitted nor denied by domain of {sender}")
        }
        AuthResult::None => match &spf.reason {
            Some(why) => format!("{receiver}: {}", comment_text(why)),
            None => format!("{receiver}: domain of {sender} does not publish an SPF record"),
        },
        AuthResult::TempError | AuthResult::PermError => format!(
            "{receiver}: error in processing during lookup of {sender}{}",
            spf.reason
                .as_deref()
                .map(|r| format!(": {}", comment_text(r)))
                .unwrap_or_default()
        ),
    };
    let mut h = format!("Received-SPF: {} ({comment})\r\n\t", spf.result);
    h.push_str("receiver=");
    push_kv_value(&mut h, &spf.receiver);
    h.push_str("; client-ip=");
    push_kv_value(&mut h, &ip.to_string());
    h.push_str("; envelope-from=");
    push_kv_value(&mut h, &spf.sender);
    h.push_str("; helo=");
    push_kv_value(&mut h, &spf.helo);
    h.push_str("; identity=");
    h.push_str(match spf.identity {
        SpfIdentity::MailFrom => "mailfrom",
        SpfIdentity::Helo => "helo",
    });
    h.push_str(";\r\n");
    h
}

/// Our authserv-id: the policy's `authserv_id`, else the listener host name
/// (which defaults to `server.hostname`).
pub fn authserv_id<'a>(policy: Option<&'a super::AuthPolicy>, hostname: &'a str) -> &'a str {
    match policy {
        Some(p) if !p.authserv_id.is_empty() => &p.authserv_id,
        _ => hostname,
    }
}

/// Removes, in place, every `Authentication-Results` and
/// `ARC-Authentication-Results` field that claims one of our authserv-ids
/// (every id the configuration uses: see `Config::authserv_ids`),
/// including its continuation lines. Returns how many fields went. The
/// message is not copied: later bytes move up over the removed fields.
///
/// A field claims an id when its authserv-id, read after RFC 8601 CFWS
/// (nested comments, quoted-pairs, folding), equals it case-insensitively
/// (a trailing root dot ignored). A field that cannot be read that way (an
/// unclosed comment or quote, non-ASCII or control bytes around the id, no
/// `;` after it) is removed when its value merely contains an id: lax
/// parsers downstream read such forms as ours (`(a\) id;`, `((x) id;`,
/// `NBSP id;`), so keeping them would let a client forge our results.
pub fn strip_forged<S: AsRef<str>>(raw: &mut Vec<u8>, authserv_ids: &[S]) -> usize {
    let ours: Vec<&str> = authserv_ids
        .iter()
        .map(|id| id.as_ref().trim().trim_end_matches('.'))
        .filter(|id| !id.is_empty())
        .collect();
    if ours.is_empty() {
        return 0;
    }
    let mut remove: Vec<Range<usize>> = Vec::new();
    let mut field: Option<usize> = None;
    let mut pos = 0;
    while pos < raw.len() {
        let end = memchr::memchr(b'\n', &raw[pos..]).map_or(raw.len(), |i| pos + i + 1);
        let line = &raw[pos..end];
        if line == b"\r\n" || line == b"\n" {
            break; // end of the header section; the body is never looked at
        }
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            if let Some(start) = field.take() {
                if claims(&raw[start..pos], &ours) {
                    remove.push(start..pos);
                }
            }
            field = Some(pos);
        }
        pos = end;
    }
    if let Some(start) = field {
        if claims(&raw[start..pos], &ours) {
            remove.push(start..pos);
        }
    }
    remove_ranges(raw, &remove);
    remove.len()
}

/// Removes the (ordered, disjoint) `ranges` from `raw` in one pass, without
/// allocating: each kept stretch moves up once.
pub(crate) fn remove_ranges(raw: &mut Vec<u8>, ranges: &[Range<usize>]) {
    let Some(first) = ranges.first() else {
        return;
    };
    let mut to = first.start;
    for (i, r) in ranges.iter().enumerate() {
        let next = ranges.get(i + 1).map_or(raw.len(), |n| n.start);
        raw.copy_within(r.end..next, to);
        to += next - r.end;
    }
    raw.truncate(to);
}

/// Whether one complete header field (with its folded lines) is an A-R or
/// ARC-A-R field claiming one of `ours` (see [`strip_forged`]).
fn claims(field: &[u8], ours: &[&str]) -> bool {
    let Some(colon) = memchr::memchr(b':', field) else {
        return false;
    };
    let name = trim_end_wsp(&field[..colon]);
    let value = &field[colon + 1..];
    let id = if name.eq_ignore_ascii_case(b"Authentication-Results") {
        ar_authserv_id(value)
    } else if name.eq_ignore_ascii_case(b"ARC-Authentication-Results") {
        arc_authserv_id(value)
    } else {
        return false;
    };
    match id {
        Some(id) => {
            let id = id.strip_suffix(b".").unwrap_or(&id);
            ours.iter().any(|o| id.eq_ignore_ascii_case(o.as_bytes()))
        }
        None => ours
            .iter()
            .any(|o| contains_ignore_case(value, o.as_bytes())),
    }
}

/// Case-insensitive search for `needle` in `hay` with line breaks removed
/// (an id folded across lines still counts).
fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    let unfolded: Vec<u8> = hay
        .iter()
        .copied()
        .filter(|b| !matches!(b, b'\r' | b'\n'))
        .collect();
    !needle.is_empty()
        && unfolded
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

fn trim_end_wsp(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(0, |i| i + 1);
    &s[..n]
}

/// Skips whitespace, line breaks (folding) and RFC 5322 comments (nested,
/// with quoted-pairs). `None` when a comment is not closed: the field cannot
/// be read, and [`claims`] falls back to searching it.
fn skip_cfws(v: &[u8], mut i: usize) -> Option<usize> {
    loop {
        while i < v.len() && matches!(v[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        if v.get(i) != Some(&b'(') {
            return Some(i);
        }
        let mut depth = 0usize;
        loop {
            match v.get(i)? {
                b'\\' => i += 1,
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// RFC 2045 token characters (what a `pvalue` we write may contain unquoted).
fn is_token_char(b: u8) -> bool {
    b > b' ' && b < 0x7f && !b"()<>@,;:\\\"/[]?=".contains(&b) || b >= 0x80
}

/// Reads the authserv-id `value` (RFC 2045 token or quoted-string) at `i`;
/// returns it and the index after it. Only ASCII is accepted: a non-ASCII
/// byte next to the id (NBSP and other Unicode spaces) makes the field
/// unreadable rather than part of a foreign-looking id.
fn read_value(v: &[u8], i: usize) -> Option<(Vec<u8>, usize)> {
    if v.get(i) == Some(&b'"') {
        let mut out = Vec::new();
        let mut j = i + 1;
        while j < v.len() {
            match v[j] {
                b'"' => return Some((out, j + 1)),
                b'\\' if j + 1 < v.len() => {
                    out.push(v[j + 1]);
                    j += 2;
                    continue;
                }
                b'\r' | b'\n' => {}
                b if b >= 0x80 || (b < b' ' && b != b'\t') => return None,
                b => out.push(b),
            }
            j += 1;
        }
        None
    } else {
        let n = v[i..]
            .iter()
            .take_while(|&&b| b.is_ascii() && is_token_char(b))
            .count();
        (n > 0).then(|| (v[i..i + n].to_vec(), i + n))
    }
}

/// `[CFWS] authserv-id [CFWS authres-version] [CFWS] (";" / end)` (RFC 8601
/// §2.2); `None` when the value does not have that shape.
fn authserv_id_at(v: &[u8], i: usize) -> Option<Vec<u8>> {
    let (id, mut i) = read_value(v, skip_cfws(v, i)?)?;
    i = skip_cfws(v, i)?;
    let digits = v[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits > 0 {
        i = skip_cfws(v, i + digits)?;
    }
    (i == v.len() || v[i] == b';').then_some(id)
}

fn ar_authserv_id(value: &[u8]) -> Option<Vec<u8>> {
    authserv_id_at(value, 0)
}

/// `ARC-Authentication-Results: i=<n>; <authserv-id> ...` (RFC 8617 §4.1.1).
fn arc_authserv_id(v: &[u8]) -> Option<Vec<u8>> {
    let mut i = skip_cfws(v, 0)?;
    if !matches!(v.get(i), Some(b'i' | b'I')) {
        return None;
    }
    i = skip_cfws(v, i + 1)?;
    if v.get(i) != Some(&b'=') {
        return None;
    }
    i = skip_cfws(v, i + 1)?;
    let digits = v[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    i = skip_cfws(v, i + digits)?;
    if v.get(i) != Some(&b';') {
        return None;
    }
    authserv_id_at(v, i + 1)
}

/// A `pvalue` that is a token when it can be, a quoted-string otherwise.
fn push_pvalue(out: &mut String, v: &str) {
    let v: String = v
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_VALUE)
        .collect();
    if !v.is_empty() && v.bytes().all(is_token_char) {
        out.push_str(&v);
    } else {
        push_quoted(out, &v);
    }
}

/// `smtp.mailfrom`: `local@domain` as is when the local part is a dot-atom,
/// quoted otherwise.
fn push_addr_pvalue(out: &mut String, addr: &str) {
    let atext =
        |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b) || b >= 0x80;
    let ok = match addr.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !local.starts_with('.')
                && !local.ends_with('.')
                && !local.contains("..")
                && local.bytes().all(atext)
                && !domain.is_empty()
                && domain.bytes().all(is_token_char)
        }
        None => false,
    };
    if ok && addr.len() <= MAX_VALUE {
        out.push_str(addr);
    } else {
        push_quoted(out, addr);
    }
}

fn push_quoted(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars().filter(|c| !c.is_control()).take(MAX_VALUE) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

fn push_ip(out: &mut String, ip: IpAddr) {
    // IPv6 contains ':', a tspecial: quote it.
    match ip {
        IpAddr::V4(v4) => {
            let _ = write!(out, "{v4}");
        }
        IpAddr::V6(_) => push_quoted(out, &ip.to_string()),
    }
}

/// `reason="…"` (RFC 8601 `reasonspec`) for results that are not pass/none.
fn push_reason(out: &mut String, result: AuthResult, reason: Option<&str>) {
    if let (Some(why), false) = (reason, matches!(result, AuthResult::Pass)) {
        out.push_str(" reason=");
        push_quoted(out, &sanitize(why, 120));
    }
}

/// Received-SPF values: dot-atom or quoted-string.
fn push_kv_value(out: &mut String, v: &str) {
    let atext = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    let dot_atom = !v.is_empty()
        && !v.starts_with('.')
        && !v.ends_with('.')
        && !v.contains("..")
        && v.bytes().all(|b| atext(b) || b == b'.');
    if dot_atom && v.len() <= MAX_VALUE {
        out.push_str(v);
    } else {
        push_quoted(out, v);
    }
}

/// Text inside a header comment: printable ASCII without parentheses or
/// backslashes, so that the comment always closes where we close it.
fn comment_text(s: &str) -> String {
    sanitize(s, 200).replace(['(', ')', '\\'], "?")
}

#[cfg(test)]
mod tests {
    use super::super::verify::{ArcOutcome, DkimSignature, DmarcOutcome, DmarcPolicy};
    use super::*;

    fn spf(result: AuthResult, identity: SpfIdentity) -> SpfOutcome {
        SpfOutcome {
            result,
            identity,
            domain: "example.com".into(),
            mail_from: "user@example.com".into(),
            sender: "user@example.com".into(),
            helo: "mail.example.com".into(),
            ip: "192.0.2.1".parse().unwrap(),
            receiver: "mx.example.org".into(),
            explanation: None,
            reason: None,
            not_checked: None,
            dns: Default::default(),
        }
    }

    #[test]
    fn authentication_results_layout() {
        let m = MessageOutcome {
            dkim: Some(vec![
                DkimSignature {
                    result: AuthResult::Pass,
                    domain: "example.com".into(),
                    selector: "sel".into(),
                    auid: String::new(),
                    algorithm: "rsa-sha256",
                    b_prefix: "AbC+dE/f".into(),
                    reason: None,
                },
                DkimSignature {
                    result: AuthResult::Fail,
                    domain: "example.net".into(),
                    selector: "ed".into(),
                    auid: String::new(),
                    algorithm: "ed25519-sha256",
                    b_prefix: "XyZ12345".into(),
                    reason: Some("body hash did not verify".into()),
                },
            ]),
            arc: Some(ArcOutcome {
                result: AuthResult::None,
                instances: 0,
                reason: None,
            }),
            dmarc: Some(DmarcOutcome {
                result: AuthResult::Pass,
                policy: DmarcPolicy::Reject,
                from_domain: "example.com".into(),
                spf_aligned: true,
                dkim_aligned: true,
                reason: None,
            }),
            remote_ip: "2001:db8::1".parse().unwrap(),
            not_checked: None,
            dns: Default::default(),
        };
        let h = authentication_results(
            "mx.example.org",
            Some(&spf(AuthResult::Pass, SpfIdentity::MailFrom)),
            Some(&m),
        );
        assert_eq!(
            h,
            "Authentication-Results: mx.example.org;\r\n\
             \tspf=pass smtp.mailfrom=user@example.com;\r\n\
             \tdkim=pass header.d=example.com header.s=sel header.a=rsa-sha256 header.b=\"AbC+dE/f\";\r\n\
             \tdkim=fail reason=\"body hash did not verify\" header.d=example.net header.s=ed header.a=ed25519-sha256 header.b=XyZ12345;\r\n\
             \tdmarc=pass header.from=example.com policy.dmarc=reject;\r\n\
             \tarc=none smtp.remote-ip=\"2001:db8::1\"\r\n"
        );
        let h = authentication_results(
            "mx.example.org",
            Some(&spf(AuthResult::None, SpfIdentity::Helo)),
            None,
        );
        assert_eq!(
            h,
            "Authentication-Results: mx.example.org;\r\n\tspf=none smtp.helo=mail.example.com\r\n"
        );
        assert_eq!(
            authentication_results("mx.example.org", None, None),
            "Authentication-Results: mx.example.org; none\r\n"
        );
        let unsigned = MessageOutcome {
            dkim: Some(vec![]),
            arc: None,
            dmarc: None,
            remote_ip: "192.0.2.1".parse().unwrap(),
            not_checked: None,
            dns: Default::default(),
        };
        assert_eq!(
            authentication_results("mx", None, Some(&unsigned)),
            "Authentication-Results: mx;\r\n\tdkim=none\r\n"
        );
    }

    #[test]
    fn hostile_values_are_quoted_or_dropped() {
        let mut s = spf(AuthResult::Fail, SpfIdentity::MailFrom);
        s.sender = "\"a;b\r\nX-Evil: 1\"@example.com".into();
        s.reason = Some("x\r\ny\"z".into());
        let h = authentication_results("mx.example.org", Some(&s), None);
        assert_eq!(h.matches("\r\n").count(), 2, "no injected line: {h:?}");
        assert!(
            h.contains("smtp.mailfrom=\"\\\"a;bX-Evil: 1\\\"@example.com\""),
            "{h}"
        );
        let mut s = spf(AuthResult::None, SpfIdentity::Helo);
        s.helo = "[192.0.2.1]".into();
        s.sender = "postmaster@[192.0.2.1]".into();
        s.reason = Some("HELO name is not a domain name (address literal)".into());
        let h = authentication_results("mx.example.org", Some(&s), None);
        assert!(h.contains("smtp.helo=\"[192.0.2.1]\""), "{h}");
        let r = received_spf(&s);
        assert_eq!(
            r,
            "Received-SPF: none (mx.example.org: HELO name is not a domain name ?address literal?)\r\n\
             \treceiver=mx.example.org; client-ip=192.0.2.1; envelope-from=\"postmaster@[192.0.2.1]\"; helo=\"[192.0.2.1]\"; identity=helo;\r\n"
        );
    }

    #[test]
    fn received_spf_layout() {
        // As in the RFC 7208 §9.1 example, an address is a quoted-string ('@' is not atext).
        let r = received_spf(&spf(AuthResult::Fail, SpfIdentity::MailFrom));
        assert_eq!(
            r,
            "Received-SPF: fail (mx.example.org: domain of user@example.com does not designate 192.0.2.1 as permitted sender)\r\n\
             \treceiver=mx.example.org; client-ip=192.0.2.1; envelope-from=\"user@example.com\"; helo=mail.example.com; identity=mailfrom;\r\n"
        );
        let mut s = spf(AuthResult::Pass, SpfIdentity::MailFrom);
        s.ip = "2001:db8::5".parse().unwrap();
        assert!(received_spf(&s).contains("client-ip=\"2001:db8::5\";"));
    }

    const MSG: &[u8] = b"Received: from x by y; Tue, 1 Jan 2030 00:00:00 +0000\r\n\
Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=a@b.example\r\n\
Authentication-Results: other.example.net; dkim=pass\r\n\
authentication-results :\r\n (forged, folded)  MX.Example.ORG 1;\r\n\tdkim=pass header.d=bank.example\r\n\
Authentication-Results: mx.example.org.evil; spf=pass\r\n\
Authentication-Results: \"mx.example.org\"; dmarc=pass\r\n\
Authentication-Results: mx.example.orgx; spf=pass\r\n\
X-Authentication-Results: mx.example.org; spf=pass\r\n\
ARC-Authentication-Results: i=1; mx.example.org; arc=none\r\n\
ARC-Authentication-Results: i=2; relay.example.net;\r\n spf=pass\r\n\
Authentication-Results: mx.example.org.; spf=pass\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.example.org; this is the body\r\n";

    /// [`strip_forged`] on a copy of `m` for one id: (result, fields removed).
    fn strip(m: &[u8], id: &str) -> (Vec<u8>, usize) {
        let mut m = m.to_vec();
        let n = strip_forged(&mut m, &[id]);
        (m, n)
    }

    #[test]
    fn strip_forged_removes_only_ours() {
        let (out, n) = strip(MSG, "mx.example.org");
        assert_eq!(n, 5);
        let out = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            out,
            "Received: from x by y; Tue, 1 Jan 2030 00:00:00 +0000\r\n\
Authentication-Results: other.example.net; dkim=pass\r\n\
Authentication-Results: mx.example.org.evil; spf=pass\r\n\
Authentication-Results: mx.example.orgx; spf=pass\r\n\
X-Authentication-Results: mx.example.org; spf=pass\r\n\
ARC-Authentication-Results: i=2; relay.example.net;\r\n spf=pass\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.example.org; this is the body\r\n"
        );
    }

    /// Review of issue 19: every id of the configuration goes, on every listener.
    #[test]
    fn strip_forged_removes_every_id_of_the_set() {
        let mut m = MSG.to_vec();
        let ids = [
            "other.example.net",
            " MX.example.org. ",
            "relay.example.net",
        ];
        assert_eq!(strip_forged(&mut m, &ids), 7);
        assert_eq!(
            std::str::from_utf8(&m).unwrap(),
            "Received: from x by y; Tue, 1 Jan 2030 00:00:00 +0000\r\n\
Authentication-Results: mx.example.org.evil; spf=pass\r\n\
Authentication-Results: mx.example.orgx; spf=pass\r\n\
X-Authentication-Results: mx.example.org; spf=pass\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.example.org; this is the body\r\n"
        );
        let mut v = b"0123456789".to_vec();
        remove_ranges(&mut v, &[0..2, 3..4, 8..10]);
        assert_eq!(v, b"24567");
    }

    #[test]
    fn strip_forged_borrows_when_clean_and_handles_edges() {
        let clean = b"Subject: x\r\nAuthentication-Results: other.example; none\r\n\r\nbody";
        assert_eq!(strip(clean, "mx.example.org"), (clean.to_vec(), 0));
        // last header without body, bare LF line ends
        let m = b"Subject: x\nAuthentication-Results: mx.example.org; none";
        assert_eq!(strip(m, "mx.example.org").0, b"Subject: x\n");
        // garbage must not panic
        for m in [
            &b""[..],
            b":",
            b"(\r\n",
            b"Authentication-Results:",
            b"Authentication-Results: (((",
            b"ARC-Authentication-Results: i=",
            b"ARC-Authentication-Results: i=1",
            b" \r\n\r\n",
        ] {
            let _ = strip(m, "mx.example.org");
        }
        assert_eq!(strip(MSG, ""), (MSG.to_vec(), 0));
        assert_eq!(strip_forged(&mut MSG.to_vec(), &[" ", "."]), 0);
    }

    /// Issue 11 item 2: forms that lax downstream parsers read as our
    /// authserv-id must go; foreign ids (even ones mentioning ours later in
    /// the field) must stay.
    #[test]
    fn strip_forged_cfws_non_ascii_and_unparsable_forms() {
        let forged: &[&[u8]] = &[
            b"Authentication-Results: (a\\) gw.test; dkim=pass header.d=bank.example\r\n",
            b"Authentication-Results: ((x) gw.test; dkim=pass header.d=bank.example\r\n",
            b"Authentication-Results: (c) (d (e)) GW.TEST; dkim=pass\r\n",
            b"Authentication-Results: \xc2\xa0gw.test; dkim=pass\r\n",
            b"Authentication-Results: gw.test\xc2\xa0; dkim=pass\r\n",
            b"Authentication-Results:\xe2\x80\x83gw.test\xe3\x80\x80; dkim=pass\r\n",
            b"Authentication-Results: \x0bgw.test; dkim=pass\r\n",
            b"Authentication-Results: gw.test\r\n",
            b"Authentication-Results: gw.test (unclosed; dkim=pass\r\n",
            b"Authentication-Results: \"gw.test; dkim=pass\r\n",
            b"Authentication-Results: <gw.test>; dkim=pass\r\n",
            b"Authentication-Results: gw.test, other; dkim=pass\r\n",
            b"Authentication-Results: =gw.test; dkim=pass\r\n",
            b"Authentication-Results:\r\n gw.test;\r\n dkim=pass\r\n",
            b"ARC-Authentication-Results: i=1; (x\\) gw.test; arc=pass\r\n",
            b"ARC-Authentication-Results: i=1;\xc2\xa0gw.test; arc=pass\r\n",
            b"ARC-Authentication-Results: i=x; gw.test; arc=pass\r\n",
            b"ARC-Authentication-Results: gw.test; arc=pass\r\n",
        ];
        let kept: &[&[u8]] = &[
            b"Authentication-Results: other.example; dkim=pass header.d=gw.test\r\n",
            b"Authentication-Results: (gw.test) other.example; spf=pass\r\n",
            b"Authentication-Results: gw.test.evil; spf=pass\r\n",
            b"Authentication-Results: xgw.test; spf=pass\r\n",
            b"Authentication-Results: other.example 1; none\r\n",
            b"Authentication-Results: \"other example\"; spf=pass smtp.helo=gw.test\r\n",
            b"ARC-Authentication-Results: i=2; relay.example; spf=pass smtp.helo=gw.test\r\n",
            b"X-Authentication-Results: (a\\) gw.test; dkim=pass\r\n",
            b"Comment: Authentication-Results: gw.test; dkim=pass\r\n",
        ];
        for f in forged {
            let mut m = f.to_vec();
            m.extend_from_slice(b"Subject: x\r\n\r\nbody\r\n");
            assert_eq!(
                strip(&m, "gw.test").0,
                b"Subject: x\r\n\r\nbody\r\n",
                "not removed: {:?}",
                String::from_utf8_lossy(f)
            );
        }
        for k in kept {
            let mut m = k.to_vec();
            m.extend_from_slice(b"Subject: x\r\n\r\nbody\r\n");
            assert!(
                strip(&m, "gw.test").1 == 0,
                "removed: {:?}",
                String::from_utf8_lossy(k)
            );
        }
    }

    #[test]
    fn authserv_id_parsing() {
        assert_eq!(
            ar_authserv_id(b" (c (nested) \\) ) x.example 1; none").as_deref(),
            Some(&b"x.example"[..])
        );
        assert_eq!(
            ar_authserv_id(b" \"q\\\"x\"; none").as_deref(),
            Some(&b"q\"x"[..])
        );
        assert_eq!(
            arc_authserv_id(b" i = 3 ; a.example; x").as_deref(),
            Some(&b"a.example"[..])
        );
        assert_eq!(arc_authserv_id(b" a.example; x"), None);
    }
}
