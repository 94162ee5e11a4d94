//! The client-facing IMAP side, same shape as `pop3/`:
//!
//! - `command.rs` not-authenticated-state syntax: tags, strings, literals (sans-IO)
//! - `reply.rs`   every response mailgate itself sends (RFC 5530 codes)
//! - `session.rs` the pure not-authenticated state machine: command in, `Action` out
//! - `driver.rs`  the only code that awaits: socket, TLS, literals, backend, timeouts
//! - `tracker.rs` authenticated state: client commands checked and bounded,
//!   backend response boundaries (sans-IO)
//! - `relay.rs`   the driver's authenticated state: the awaiting part, idle timer
pub mod command;
pub mod driver;
pub mod relay;
pub mod reply;
pub mod session;
pub mod tracker;
