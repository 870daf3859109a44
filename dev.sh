#!/usr/bin/env bash
# fsguard's two set-up commands (README.rst, "Quick start"):
#   ./dev.sh run    install fsguard in .venv and run the daemon (example config)
#   ./dev.sh test   install fsguard with its test tools and run the test suite (pytest)
# Works on a fresh Debian 12 / Ubuntu 22.04+ machine; installs missing system
# packages with apt (through sudo when not root).
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_packages() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
}

venv() {
  command -v dpkg >/dev/null && need_packages python3-venv python3-dev
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "fsguard needs Python >= 3.11 (found $(python3 --version))" >&2; exit 1; }
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip setuptools wheel  # the packaging test builds a wheel without isolation
  .venv/bin/pip install -q "$@"
}

postgres_up() {
  # The audit and FusionPBX tests run against a real PostgreSQL on 127.0.0.1:5432.
  command -v pg_ctlcluster >/dev/null || need_packages postgresql
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  fi
  # Machines set up like CI trust local connections (user postgres, database test).  A fresh
  # Debian/Ubuntu install asks TCP clients for a password: give the tests a role of their own.
  if [ -z "${FSGUARD_TEST_POSTGRES:-}" ] && ! psql -h 127.0.0.1 -U postgres -d test -Atqc 'select 1' >/dev/null 2>&1; then
    as_root runuser -u postgres -- psql -qc "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fsguard_test') THEN
        CREATE ROLE fsguard_test LOGIN CREATEDB PASSWORD 'fsguard-test';
      END IF; END \$\$;"
    export FSGUARD_TEST_POSTGRES="postgresql+psycopg://fsguard_test:fsguard-test@127.0.0.1:5432/postgres"
  fi
}

case "${1:-}" in
  run)
    venv -e .
    mkdir -p var
    # The example config, with the audit database and control socket under ./var (no root needed).
    sed -e 's|^url = .*|url = "sqlite:///var/audit.db"|' \
        -e 's|^control_socket = .*|control_socket = "var/control.sock"|' \
        fsguard.example.toml > var/fsguard.toml
    exec .venv/bin/fsguard run --config var/fsguard.toml
    ;;
  test)
    shift
    venv -e '.[test]'
    postgres_up
    exec .venv/bin/pytest "$@"
    ;;
  *)
    echo "usage: $0 run|test [pytest arguments]" >&2
    exit 2
    ;;
esac
