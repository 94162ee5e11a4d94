//! `mailgate demo`: the gateway in front of a small, clearly labelled
//! **demo** legacy backend that keeps mail in memory. It exists so a newcomer
//! sees the whole path work in seconds; it is not a mail server.
//!
//! The demo SMTP backend is also handy as a scripted legacy server in tests.

use crate::codec::{CodecError, Conn};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// One message as the demo backend received it (dot-unstuffed, CRLF lines).
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub from: String,
    pub rcpts: Vec<String>,
    pub data: Vec<u8>,
}

/// The demo backend's in-memory store, shared by its SMTP and POP3 sides.
#[derive(Default)]
pub struct Mailbox {
    pub messages: Mutex<Vec<StoredMessage>>,
}

impl Mailbox {
    pub fn count(&self) -> usize {
        self.messages.lock().map(|m| m.len()).unwrap_or(0)
    }
    pub fn all(&self) -> Vec<StoredMessage> {
        self.messages.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

const LIMIT: Duration = Duration::from_secs(60);

/// Serves the demo SMTP backend on `listener` until the task is dropped.
pub async fn serve_smtp(listener: TcpListener, mailbox: Arc<Mailbox>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let mb = mailbox.clone();
        tokio::spawn(async move {
            let _ = smtp_session(tcp, mb).await;
        });
    }
}

async fn smtp_session(tcp: TcpStream, mailbox: Arc<Mailbox>) -> Result<(), CodecError> {
    let mut c = Conn::new(tcp);
    c.queue(b"220 demo-backend ESMTP (mailgate demo backend, in-memory)\r\n");
    let mut from = None;
    let mut rcpts = Vec::new();
    loop {
        if !c.has_line() {
            c.flush(LIMIT).await?;
        }
        let line = c.read_line(4096, LIMIT).await?;
        let text = String::from_utf8_lossy(&line).to_string();
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            c.queue(b"250-demo-backend\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 52428800\r\n250 ENHANCEDSTATUSCODES\r\n");
        } else if upper.starts_with("HELO") {
            c.queue(b"250 demo-backend\r\n");
        } else if upper.starts_with("MAIL FROM:") {
            from = Some(angle(&text[10..]));
            rcpts.clear();
            c.queue(b"250 2.1.0 Ok\r\n");
        } else if upper.starts_with("RCPT TO:") {
            if from.is_none() {
                c.queue(b"503 5.5.1 need MAIL\r\n");
            } else {
                rcpts.push(angle(&text[8..]));
                c.queue(b"250 2.1.5 Ok\r\n");
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                c.queue(b"503 5.5.1 need RCPT\r\n");
                continue;
            }
            c.queue(b"354 go ahead\r\n");
            c.flush(LIMIT).await?;
            let mut data = Vec::new();
            loop {
                let l = c.read_line_raw(1 << 20, LIMIT).await?;
                if &l[..] == b".\r\n" {
                    break;
                }
                let l = if l.first() == Some(&b'.') {
                    &l[1..]
                } else {
                    &l[..]
                };
                data.extend_from_slice(l);
            }
            let n = {
                let mut m = mailbox.messages.lock().map_err(|_| CodecError::Closed)?;
                m.push(StoredMessage {
                    from: from.take().unwrap_or_default(),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                });
                m.len()
            };
            c.queue(format!("250 2.0.0 Ok: queued as DEMO{n}\r\n").as_bytes());
        } else if upper == "RSET" {
            from = None;
            rcpts.clear();
            c.queue(b"250 2.0.0 Ok\r\n");
        } else if upper.starts_with("NOOP") {
            c.queue(b"250 2.0.0 Ok\r\n");
        } else if upper == "QUIT" {
            c.queue(b"221 2.0.0 Bye\r\n");
            c.flush(LIMIT).await?;
            return Ok(());
        } else {
            c.queue(b"502 5.5.2 not implemented\r\n");
        }
    }
}

fn angle(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix('<').unwrap_or(s);
    s.split('>').next().unwrap_or("").to_string()
}

/// Ports the demo listens on.
#[derive(Debug, Clone, Copy)]
pub struct DemoPorts {
    pub smtp: u16,
    pub smtps: u16,
}

/// The demo's configuration: a real config file, written next to the certificate.
pub fn demo_config(dir: &Path, ports: DemoPorts, smtp_backend: SocketAddr) -> String {
    format!(
        r#"# mailgate demo configuration (generated). The backend is the in-memory DEMO backend.
server:
  hostname: mailgate.demo
listeners:
  - {{ name: smtp, protocol: smtp, bind: "127.0.0.1:{smtp}", tls: starttls, require_tls: true, backend: demo-smtp }}
  - {{ name: smtps, protocol: smtp, bind: "127.0.0.1:{smtps}", tls: implicit, backend: demo-smtp }}
tls:
  certificates: [ {{ cert: "{dir}/cert.pem", key: "{dir}/key.pem" }} ]
backends:
  demo-smtp: {{ address: "{smtp_backend}" }}
"#,
        smtp = ports.smtp,
        smtps = ports.smtps,
        dir = dir.display(),
    )
}

/// Runs the demo until Ctrl-C.
pub async fn run(dir: &Path, ports: DemoPorts) -> anyhow::Result<()> {
    use anyhow::Context;
    let (cert, _key) =
        crate::tls::write_self_signed(dir, &["localhost", "127.0.0.1", "mailgate.demo"])?;
    let mailbox = Arc::new(Mailbox::default());
    let smtp_sink = TcpListener::bind("127.0.0.1:0").await?;
    let smtp_addr = smtp_sink.local_addr()?;
    tokio::spawn(serve_smtp(smtp_sink, mailbox.clone()));
    let text = demo_config(dir, ports, smtp_addr);
    let cfg_path = dir.join("mailgate-demo.yaml");
    std::fs::write(&cfg_path, &text).with_context(|| format!("writing {}", cfg_path.display()))?;
    let config = crate::config::load(&cfg_path)?;
    let gw = crate::server::Gateway::start(&config).await?;
    println!("mailgate demo — the backend is an in-memory DEMO backend, not a mail server");
    println!("  SMTP + STARTTLS (TLS required)  127.0.0.1:{}", ports.smtp);
    println!(
        "  SMTPS (implicit TLS)            127.0.0.1:{}",
        ports.smtps
    );
    println!("  demo SMTP backend (plaintext)   {smtp_addr}");
    println!(
        "  config {}  certificate {}",
        cfg_path.display(),
        cert.display()
    );
    println!();
    println!("Send a message through STARTTLS:");
    println!(
        "  printf 'From: alice@example.org\\r\\nTo: bob@example.net\\r\\nSubject: hello\\r\\n\\r\\nHello through mailgate.\\r\\n' | curl --ssl-reqd --cacert {} --url smtp://127.0.0.1:{} --mail-from alice@example.org --mail-rcpt bob@example.net -T -",
        cert.display(),
        ports.smtp
    );
    println!();
    println!("Press Ctrl-C to stop.");
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let all = mailbox.all();
                for m in &all[seen..] {
                    let subject = String::from_utf8_lossy(&m.data)
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("subject:"))
                        .map(|l| l[8..].trim().to_string())
                        .unwrap_or_default();
                    println!("demo backend received: from=<{}> rcpts={:?} size={} subject={:?}", m.from, m.rcpts, m.data.len(), subject);
                }
                seen = all.len();
            }
        }
    }
    gw.shutdown().await;
    Ok(())
}
