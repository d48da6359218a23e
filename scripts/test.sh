#!/usr/bin/env bash
# The project's test command (the README's, and what CI runs): installs what
# is missing, then runs every test: unit tests, integration tests with real
# forked processes, real sockets on loopback and private Redis servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RUST_BACKTRACE=1
cargo build --all-targets --locked
cargo test --all-targets --locked -- --test-threads=2 --skip faults_one_at_a_time_under_traffic
# The fault-injection run last, on its own, with its table shown.
cargo test --locked --test chaos -- --show-output
