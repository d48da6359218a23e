#!/usr/bin/env bash
# The project's test command (the README's, and what CI runs): installs what
# is missing, then runs every test: unit tests, integration tests with real
# forked processes, real sockets on loopback and private Redis servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RUST_BACKTRACE=1
cargo build --all-targets --locked
cargo test --all-targets --locked -- --test-threads=2
