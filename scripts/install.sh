#!/usr/bin/env bash
# Installs swocloud on a systemd host; safe to re-run (it upgrades the
# binaries and units, never overwrites an existing config).
#
#   scripts/install.sh [--notify] [--no-build]
#
#   --notify    install the Type=notify unit (swocloud-notify.service) as
#               swocloud.service instead of the Type=forking one
#   --no-build  use the binaries already in target/release
#
# What goes where (override with the environment; DESTDIR stages into a
# directory and then skips the user, chown and systemctl steps):
#   BIN_DIR=/usr/local/bin        swocloud, swocloud-im (when built)
#   CONF_DIR=/etc/swocloud        swocloud.toml (from swocloud.toml.example)
#   UNIT_DIR=/etc/systemd/system  swocloud.service, swocloud-im.service
#   LOGROTATE_DIR=/etc/logrotate.d
#   BUILD_DIR=target/release      where the built binaries are taken from
# and the `swocloud` system user and group, which the units run as.
set -euo pipefail
cd "$(dirname "$0")/.."

notify=0 build=1
for a in "$@"; do
  case "$a" in
    --notify) notify=1 ;;
    --no-build) build=0 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "install: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done

DESTDIR="${DESTDIR:-}"
BIN_DIR="${BIN_DIR:-/usr/local/bin}"
CONF_DIR="${CONF_DIR:-/etc/swocloud}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
LOGROTATE_DIR="${LOGROTATE_DIR:-/etc/logrotate.d}"
BUILD_DIR="${BUILD_DIR:-target/release}"
USER_NAME=swocloud

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install: run as root (or set DESTDIR to stage the files)" >&2
  exit 1
fi

if [ "$build" -eq 1 ]; then
  echo "install: building release binaries"
  cargo build --release --locked --bins
fi
bins=()
for b in swocloud swocloud-im; do
  if [ -x "$BUILD_DIR/$b" ]; then bins+=("$b"); fi
done
if [ ${#bins[@]} -eq 0 ]; then
  echo "install: no binaries in $BUILD_DIR (run without --no-build)" >&2
  exit 1
fi

if [ -z "$DESTDIR" ]; then
  if ! getent group "$USER_NAME" >/dev/null; then
    groupadd --system "$USER_NAME"
  fi
  if ! getent passwd "$USER_NAME" >/dev/null; then
    useradd --system --gid "$USER_NAME" --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin --comment "swocloud daemons" "$USER_NAME"
    echo "install: created system user $USER_NAME"
  fi
fi

install -d -m 0755 "$DESTDIR$BIN_DIR" "$DESTDIR$UNIT_DIR" "$DESTDIR$LOGROTATE_DIR"
install -d -m 0750 "$DESTDIR$CONF_DIR"
for b in "${bins[@]}"; do
  # install(1) writes a new inode, so a running daemon keeps its binary.
  install -m 0755 "$BUILD_DIR/$b" "$DESTDIR$BIN_DIR/$b"
  echo "install: $BIN_DIR/$b"
done

conf="$DESTDIR$CONF_DIR/swocloud.toml"
if [ -e "$conf" ]; then
  echo "install: keeping the existing $CONF_DIR/swocloud.toml"
else
  # 0640: the file holds auth_secret and api_key.
  install -m 0640 scripts/swocloud.toml.example "$conf"
  echo "install: $CONF_DIR/swocloud.toml (example: set auth_secret and api_key)"
fi
if [ -f scripts/swocloud-im.toml.example ] && [ ! -e "$DESTDIR$CONF_DIR/swocloud-im.toml" ]; then
  install -m 0640 scripts/swocloud-im.toml.example "$DESTDIR$CONF_DIR/swocloud-im.toml"
  echo "install: $CONF_DIR/swocloud-im.toml (example)"
fi
if [ -z "$DESTDIR" ]; then
  chown root:"$USER_NAME" "$CONF_DIR" "$CONF_DIR"/*.toml
fi

if [ "$notify" -eq 1 ]; then
  install -m 0644 scripts/swocloud-notify.service "$DESTDIR$UNIT_DIR/swocloud.service"
else
  install -m 0644 scripts/swocloud.service "$DESTDIR$UNIT_DIR/swocloud.service"
fi
echo "install: $UNIT_DIR/swocloud.service ($([ "$notify" -eq 1 ] && echo Type=notify || echo Type=forking))"
if [[ " ${bins[*]} " == *" swocloud-im "* ]]; then
  install -m 0644 scripts/swocloud-im.service "$DESTDIR$UNIT_DIR/swocloud-im.service"
  echo "install: $UNIT_DIR/swocloud-im.service"
fi
install -m 0644 scripts/swocloud.logrotate "$DESTDIR$LOGROTATE_DIR/swocloud"
echo "install: $LOGROTATE_DIR/swocloud"

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "install: done; start with: systemctl enable --now swocloud"
else
  echo "install: done (systemd is not running here: no daemon-reload)"
fi
