//! Field formatting for text logs: every field value (the message included)
//! is written with its control characters escaped, so nothing a client sent
//! (a HELO name, a user name, an address) can end the line and start a forged
//! one, or drive the terminal the log is read on. Only values are escaped:
//! the event formatter's own colours (levels, timestamps) and the italics of
//! field names on a terminal stay as they are. JSON logs do not need this
//! (serde_json escapes every control character).

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// `fmt().fmt_fields(EscapedFields)`: the default text layout
/// (`message key=value ...`), with escaped values.
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            ansi: writer.has_ansi_escapes(),
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'w> {
    writer: Writer<'w>,
    ansi: bool,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn field(&mut self, field: &Field, value: fmt::Arguments) -> fmt::Result {
        let name = field.name();
        if name.starts_with("log.") {
            // `log` crate metadata, already shown by the event formatter
            return Ok(());
        }
        if !self.first {
            self.writer.write_char(' ')?;
        }
        self.first = false;
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            if self.ansi {
                // italic name, dimmed `=`: what the default field formatter shows
                write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?;
            } else {
                write!(self.writer, "{name}=")?;
            }
        }
        Escaped(&mut self.writer).write_fmt(value)
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            // like the default: the message as text, other strings quoted
            self.result = if field.name() == "message" {
                self.field(field, format_args!("{value}"))
            } else {
                self.field(field, format_args!("{value:?}"))
            };
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = self.field(field, format_args!("{value:?}"));
        }
    }
}

/// Writes through, with each control character (C0, DEL, C1) escaped:
/// `\r`, `\n`, `\t`, else `\u{1b}`.
pub struct Escaped<W>(pub W);

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|(_, c)| c.is_control()) {
            self.0.write_str(&rest[..i])?;
            match c {
                '\r' => self.0.write_str("\\r")?,
                '\n' => self.0.write_str("\\n")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// Collects what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(ansi: bool, log: impl FnOnce()) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(ansi)
            .fmt_fields(EscapedFields)
            .finish();
        tracing::subscriber::with_default(sub, log);
        let b = buf.0.lock().unwrap().clone();
        String::from_utf8(b).unwrap()
    }

    const FORGED: &str = "evil\r\n2026-12-01T00:00:00Z  INFO mailgate: login ok user=admin";

    #[test]
    fn forged_line_in_a_client_string_is_escaped() {
        let helo = FORGED;
        let out = text(false, || {
            tracing::info!(helo = %helo, user = ?helo, "HELO {helo}");
        });
        assert_eq!(out.matches('\n').count(), 1, "one event, one line: {out:?}");
        assert!(!out.contains('\r'), "{out:?}");
        assert!(out.ends_with('\n'));
        assert!(out.contains("evil\\r\\n2026"), "{out:?}");
    }

    #[test]
    fn terminal_escapes_from_clients_are_escaped_colours_stay() {
        let out = text(true, || {
            tracing::warn!(user = %"x\u{1b}]0;pwned\u{7}\u{9b}2J", "login failed");
        });
        assert_eq!(out.matches('\n').count(), 1, "{out:?}");
        assert!(!out.contains('\u{7}') && !out.contains('\u{9b}'), "{out:?}");
        assert!(out.contains("x\\u{1b}]0;pwned"), "{out:?}");
        // the formatter's own colour for WARN survives
        assert!(out.contains("\u{1b}[33m"), "{out:?}");
        // and the field name keeps its italics
        assert!(out.contains("\u{1b}[3muser\u{1b}[0m"), "{out:?}");
    }

    #[test]
    fn plain_values_read_as_before() {
        let out = text(false, || {
            tracing::info!(listener = %"mx", n = 3, user = "alice", "session ended");
        });
        assert!(
            out.ends_with("session ended listener=mx n=3 user=\"alice\"\n"),
            "{out:?}"
        );
    }

    #[test]
    fn json_logs_stay_valid_json() {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .json()
            .flatten_event(true)
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(helo = %FORGED, "HELO {FORGED}");
        });
        let b = buf.0.lock().unwrap().clone();
        let s = String::from_utf8(b).unwrap();
        assert_eq!(s.matches('\n').count(), 1, "{s:?}");
        let v: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(v["helo"], FORGED);
    }
}
