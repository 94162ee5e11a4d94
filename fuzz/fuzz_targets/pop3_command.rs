//! cargo-fuzz target `pop3_command`; the checks live in ../harness.rs, shared with
//! tests/fuzz_corpus.rs (the stable corpus replay).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::pop3_command(data));
