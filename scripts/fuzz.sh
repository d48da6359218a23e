#!/usr/bin/env bash
# scripts/fuzz.sh: runs each cargo-fuzz target in fuzz/ for a short time.
# Not part of CI (it needs cargo-fuzz and nightly features); run it by hand.
#
#   scripts/fuzz.sh                 # every target, FUZZ_SECONDS each (default 10: ~60 s total)
#   FUZZ_SECONDS=600 scripts/fuzz.sh ws_frames http_request
#
# Each target starts from its committed seeds (fuzz/corpus/<target>/, read
# only) and keeps what it finds in fuzz/work/<target>/ (git-ignored).
# Crashes land in fuzz/artifacts/<target>/; the script exits 1 if any
# target crashed. Needs: `cargo install cargo-fuzz`; on a stable toolchain
# RUSTC_BOOTSTRAP=1 unlocks the sanitizer flags cargo-fuzz uses.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
if [ "${CI:-}" = "true" ]; then
    echo "fuzz.sh: skipped in CI"
    exit 0
fi
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: cargo-fuzz missing (cargo install cargo-fuzz)" >&2; exit 2; }
export RUSTC_BOOTSTRAP=1
secs=${FUZZ_SECONDS:-10}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build -O "${targets[@]/#/--}" >/dev/null 2>&1 || cargo fuzz build -O
failed=0
for t in "${targets[@]}"; do
    mkdir -p "work/$t"
    echo "== $t (${secs}s)"
    if ! cargo fuzz run -O "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2>"work/$t.log"; then
        echo "   CRASH: see fuzz/work/$t.log and fuzz/artifacts/$t/"
        failed=1
    fi
    grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb)" "work/$t.log" | sed 's/^/   /' || true
done
exit $failed
