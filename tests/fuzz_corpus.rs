//! Replays every file of `fuzz/corpus/<target>/` through the fuzz harness on
//! stable, as a normal `cargo test`: this is how CI replays the corpus. The
//! harness (fuzz/harness.rs) is the same code the cargo-fuzz targets run, so a
//! crash the fuzzer found and saved into the corpus fails here until fixed.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn replay(target: &str) {
    let (_, run) = harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a harness of that name");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} corpus files fail (panic messages above):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn smtp_command_corpus() {
    replay("smtp_command");
}

#[test]
fn smtp_data_corpus() {
    replay("smtp_data");
}

#[test]
fn backend_reply_corpus() {
    replay("backend_reply");
}

#[test]
fn config_yaml_corpus() {
    replay("config_yaml");
}

#[test]
fn pop3_command_corpus() {
    replay("pop3_command");
}

/// Every harness has a corpus and a test above.
#[test]
fn every_target_is_replayed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, _) in harness::TARGETS {
        assert!(root.join(name).is_dir(), "fuzz/corpus/{name} missing");
    }
    let targets =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets"))
            .unwrap()
            .count();
    assert_eq!(targets, harness::TARGETS.len(), "fuzz_targets/ vs TARGETS");
}
