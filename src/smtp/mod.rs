//! The client-facing SMTP side: parser, replies, pure session, DATA path, driver.

pub mod command;
pub mod data;
pub mod driver;
pub mod reply;
pub mod session;
