//! The client-facing POP3 side, same shape as `smtp/`:
//!
//! - `command.rs` parser for the AUTHORIZATION state and SASL PLAIN (sans-IO)
//! - `reply.rs`   every reply mailgate itself sends
//! - `session.rs` the pure AUTHORIZATION-state machine: line in, `Action` out
//! - `driver.rs`  the only code that awaits: socket, TLS, backend, timeouts
//! - `transaction.rs` TRANSACTION-state command parser and reply order (sans-IO)
//! - `pipe.rs`    the driver's TRANSACTION state: the awaiting part, idle timer
pub mod command;
pub mod driver;
pub mod pipe;
pub mod reply;
pub mod session;
pub mod transaction;
