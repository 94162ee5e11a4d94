//! The shipped `policies/` run as they are (issue 18 acceptance 2): a copy in
//! a temp dir with only the site values substituted (loopback binds, the
//! backend's address, a DNS server on loopback, a certificate where the
//! files expect it) runs in-process in front of the demo backend. An
//! SPF-failing sender is refused at MAIL; passing and softfailing messages
//! are relayed with our `Authentication-Results`.

mod common;
mod dns;

use common::SmtpClient;
use dns::{TestDns, Zone};
use mailgate::demo::{serve_smtp, Mailbox};
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;

/// `text` with `from` replaced; the shipped file must contain it, so a
/// change there that this test would silently miss fails it instead.
fn subst(text: &str, file: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "policies/{file} no longer has {from}");
    text.replace(from, to)
}

/// The shipped files copied into `dir`, binds on loopback, backends at
/// `smtp` and `pop3`, and a file naming the test DNS server; the
/// certificate the files name, generated for their hostname.
fn copy_shipped(dir: &Path, smtp: &str, pop3: &str, dns: &str) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let files = mailgate::config::files_of(&shipped).unwrap();
    assert_eq!(files.len(), 3, "{files:?}");
    for f in files {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        let mut text = std::fs::read_to_string(&f).unwrap();
        match name.as_str() {
            "00-server.yaml" => {
                text = subst(&text, &name, "\"10.0.0.5:25\"", &format!("\"{smtp}\""));
                text = subst(&text, &name, "\"10.0.0.5:110\"", &format!("\"{pop3}\""));
                text = subst(&text, &name, "\"10.0.0.5:143\"", &format!("\"{pop3}\""));
            }
            "10-listeners.yaml" => {
                for port in [25, 587, 465, 110, 995, 143, 993] {
                    let bind = format!("\"0.0.0.0:{port}\"");
                    text = subst(&text, &name, &bind, "\"127.0.0.1:0\"");
                }
            }
            _ => {}
        }
        std::fs::write(dir.join(&name), text).unwrap();
    }
    std::fs::write(
        dir.join("90-test-dns.yaml"),
        format!("dns: {{ nameservers: [\"{dns}\"], timeout: 2s, attempts: 1 }}\n"),
    )
    .unwrap();
    let certs = dir.join("certs");
    let (cert, key) = mailgate::tls::write_self_signed(&certs, &["mx.example.org"]).unwrap();
    std::fs::rename(cert, certs.join("mx.example.org.pem")).unwrap();
    std::fs::rename(key, certs.join("mx.example.org.key")).unwrap();
}

/// One transaction on the MX listener: the reply to MAIL, and the reply to
/// the message when MAIL was accepted.
async fn send(mx: std::net::SocketAddr, from: &str, msg: &str) -> (String, Option<String>) {
    let mut c = SmtpClient::connect(mx).await;
    assert!(c.expect(220).await.starts_with("220 mx.example.org"));
    assert!(c.cmd("EHLO client.test").await.starts_with("250"));
    let mail = c.cmd(&format!("MAIL FROM:<{from}>")).await;
    if !mail.starts_with("250") {
        return (mail, None);
    }
    assert!(c
        .cmd("RCPT TO:<user@mx.example.org>")
        .await
        .starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    let data = msg.replace('\n', "\r\n");
    c.send(&mailgate::smtp::data::stuff(&[data.as_bytes()]))
        .await;
    let fin = c.text().await;
    let _ = c.cmd("QUIT").await;
    (mail, Some(fin))
}

fn message(from: &str) -> String {
    format!(
        "Authentication-Results: mx.example.org; spf=pass smtp.mailfrom={from} (forged)\n\
         From: <{from}>\nTo: <user@mx.example.org>\nSubject: hello\n\
         Message-ID: <1@{}>\n\nhello\n",
        from.rsplit('@').next().unwrap()
    )
}

/// Our Authentication-Results field (with continuation lines) of `m`, and
/// how many fields claim our authserv-id.
fn our_ar(m: &str) -> (String, usize) {
    let claims = m.matches("Authentication-Results: mx.example.org;").count();
    let start = m
        .find("Authentication-Results: mx.example.org;")
        .unwrap_or_else(|| panic!("no Authentication-Results of ours:\n{m}"));
    let mut out = String::new();
    for (i, line) in m[start..].split("\r\n").enumerate() {
        if i > 0 && !line.starts_with([' ', '\t']) {
            break;
        }
        out.push_str(line);
    }
    (out, claims)
}

#[tokio::test]
async fn shipped_policies_reject_spf_fail_and_relay_pass_with_authentication_results() {
    let mut zone = Zone::new();
    zone.add_txt("pass.test", "v=spf1 ip4:127.0.0.1 -all");
    zone.add_txt("_dmarc.pass.test", "v=DMARC1; p=reject");
    zone.add_txt("fail.test", "v=spf1 -all");
    zone.add_txt("soft.test", "v=spf1 ~all");
    let dns = TestDns::start(zone).await;

    let mailbox = Arc::new(Mailbox::default());
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let smtp = backend.local_addr().unwrap().to_string();
    tokio::spawn(serve_smtp(backend, mailbox.clone()));
    // nothing listens there: the POP3 and IMAP listeners are not used here
    let pop3 = format!("127.0.0.1:{}", common::free_port());

    let dir = tempfile::tempdir().unwrap();
    copy_shipped(dir.path(), &smtp, &pop3, &dns.addr.to_string());
    let cfg = mailgate::config::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    // with the certificate in place only the placeholder hostname is left
    // to warn about (memory is this machine's business, not the files')
    use mailgate::config::warnings;
    let mut host = warnings::Host::probe(&cfg);
    host.memory = None;
    let names: Vec<_> = warnings::of(&cfg, &host).iter().map(|w| w.name).collect();
    assert_eq!(names, ["example-hostname"]);

    let gw = common::Gateway::start(&cfg).await.unwrap();
    gw.backends_probed().await;
    let mx = gw.addr("mx").unwrap();

    // SPF fail (-all): refused at MAIL FROM, nothing reaches the backend
    let (mail, fin) = send(mx, "mallory@fail.test", &message("mallory@fail.test")).await;
    assert!(mail.starts_with("550 5.7.23"), "{mail}");
    assert_eq!(fin, None);
    assert_eq!(mailbox.count(), 0);

    // SPF pass, aligned with From: → DMARC pass: relayed, tagged by us, the
    // forged field claiming our authserv-id removed
    let (mail, fin) = send(mx, "joe@pass.test", &message("joe@pass.test")).await;
    assert!(mail.starts_with("250"), "{mail}");
    let fin = fin.unwrap();
    assert!(fin.starts_with("250"), "{fin}");
    let all = mailbox.all();
    assert_eq!(all.len(), 1);
    let m = String::from_utf8_lossy(&all[0].data).to_string();
    let (ar, claims) = our_ar(&m);
    assert_eq!(claims, 1, "the forged field must be gone:\n{m}");
    assert!(!m.contains("(forged)"), "{m}");
    assert!(
        ar.contains("spf=pass") && ar.contains("smtp.mailfrom=joe@pass.test"),
        "{ar}"
    );
    assert!(ar.contains("dmarc=pass"), "{ar}");
    assert!(ar.contains("dkim=none"), "{ar}");
    assert!(m.contains("Received-SPF: pass"), "{m}");

    // SPF softfail (~all): relayed, marked only
    let (mail, fin) = send(mx, "ann@soft.test", &message("ann@soft.test")).await;
    assert!(mail.starts_with("250"), "{mail}");
    assert!(fin.unwrap().starts_with("250"));
    let all = mailbox.all();
    assert_eq!(all.len(), 2);
    let (ar, _) = our_ar(&String::from_utf8_lossy(&all[1].data));
    assert!(ar.contains("spf=softfail"), "{ar}");
}
