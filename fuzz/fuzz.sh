#!/bin/sh
# `cargo fuzz` with what this toolchain needs: nightly features on stable 1.95
# (RUSTC_BOOTSTRAP=1) and --ignore-rust-version (bin/cargo). Run from anywhere:
#   fuzz/fuzz.sh run smtp_command -- -max_total_time=60
here=$(cd "$(dirname "$0")" && pwd)
cd "$here" || exit 1
RUSTC_BOOTSTRAP=1 PATH="$here/bin:$PATH" exec cargo fuzz "$@"
