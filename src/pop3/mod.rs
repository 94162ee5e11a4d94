//! The client-facing POP3 side.
pub mod driver;
