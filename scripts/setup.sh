#!/usr/bin/env bash
# Installs what swocloud needs on a Debian machine, only what is missing:
# redis-server (tests start private instances; the demo uses one),
# redis-tools (redis-cli: tests/common/topology.rs creates its Redis
# Clusters with `redis-cli --cluster create`), redis-sentinel (the
# `redis-sentinel` command; topology.rs itself runs its sentinels as
# `redis-server CONF --sentinel`, the same binary), a C compiler for
# crates with C parts, curl and php-cli (the client examples in
# examples/clients/ are tested for real); systemd-analyze (package systemd)
# for tests/ops.rs, which verifies the units, and Python's prometheus_client
# (PyPI) for tests/ops_metrics.rs, which parses /metrics; Node.js with the ws package (npm) for the
# permessage-deflate test in tests/frames.rs; Debian's chromium and the
# playwright-core package (npm; it downloads no browser) for the chat page
# test in tests/browser.rs.
# Rust itself (>= 1.80, with cargo) must already be installed (rustup).
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
# On a machine with systemd the package also starts a system sentinel on
# 26379 (as redis-server's starts a Redis on 6379). The tests' servers and
# sentinels all run on free ports of their own, so neither is in the way.
command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v php >/dev/null 2>&1 || need+=(php-cli)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! python3 -c 'import prometheus_client' >/dev/null 2>&1; then
  echo "setup: installing prometheus_client (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check prometheus_client \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages prometheus_client \
    || { SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo";
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-prometheus-client >/dev/null; }
fi

# Node's ws package (a real permessage-deflate client for tests/frames.rs)
# and playwright-core (drives chromium for tests/browser.rs), pinned in
# tests/node/package-lock.json.
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -d "$root/tests/node/node_modules/ws" ] || [ ! -d "$root/tests/node/node_modules/playwright-core" ]; then
  echo "setup: installing the npm packages (ws, playwright-core) into tests/node"
  (cd "$root/tests/node" && npm ci --no-audit --no-fund --silent)
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust >= 1.80 (https://rustup.rs) and re-run" >&2
  exit 1
fi
echo "setup: ok ($(cargo --version), $(redis-server --version | cut -d' ' -f1-3))"
