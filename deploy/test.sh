#!/usr/bin/env bash
# The project's test command (README): checks, builds and runs every test.
# Installs what it needs first (the apt packages only when run as root, as CI
# does), so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

if ! command -v cargo-nextest >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

if ! command -v cargo-deny >/dev/null 2>&1; then
  say "installing cargo-deny (licenses, bans, sources, advisories)"
  cargo install cargo-deny --locked
fi

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  say "installing kubernetes-validate (PyPI) for the manifest tests"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
  hash -r
fi
command -v kubectl >/dev/null 2>&1 || echo "note: kubectl is missing; the kube-sim kubectl test will fail" >&2

# PostgreSQL for the shared-store tests (the SQLite tests need nothing).
postgres() {
  if [ -n "${UNITSYNC_TEST_POSTGRES_URL:-}" ]; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    echo "note: not root and UNITSYNC_TEST_POSTGRES_URL unset: the PostgreSQL tests are skipped" >&2
    return 1
  fi
  if ! command -v pg_lsclusters >/dev/null 2>&1; then
    say "installing PostgreSQL (Debian) for the shared-store tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  local line ver name port
  line=$(pg_lsclusters -h | head -n 1)
  if [ -z "$line" ]; then
    ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    pg_createcluster "$ver" main >/dev/null
    line=$(pg_lsclusters -h | head -n 1)
  fi
  read -r ver name port _ <<<"$line"
  pg_ctlcluster "$ver" "$name" start 2>/dev/null || true
  su postgres -c "psql -q -p $port -c \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'unitsync') THEN CREATE ROLE unitsync LOGIN CREATEDB PASSWORD 'unitsync'; END IF; END \\\$\\\$;\"" >/dev/null
  export UNITSYNC_TEST_POSTGRES_URL="postgres://unitsync:unitsync@127.0.0.1:$port/postgres"
}
RUN_IGNORED=()
if postgres; then RUN_IGNORED=(--run-ignored all); fi

# A real OCI registry for the OCI source tests (they start it themselves,
# on loopback, with their own config).
if ! command -v docker-registry >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    say "installing docker-registry (Debian: distribution 2.8) for the OCI source tests"
    apt-get update -qq
    # The package's own service is not wanted (nor started in containers).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
  else
    echo "note: docker-registry is missing and this is not root: the OCI source tests will fail" >&2
  fi
fi

# Headless Chromium and its WebDriver for the dashboard's browser tests.
if ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    say "installing chromium and chromium-driver (Debian) for the dashboard's browser tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  else
    echo "note: chromedriver is missing and this is not root: the dashboard browser tests will fail" >&2
  fi
fi

say "format"
cargo fmt --all -- --check

say "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "no OpenSSL or native-tls in the dependency tree"
if cargo tree --workspace --locked -e normal,build -i openssl-sys >/dev/null 2>&1 \
  || cargo tree --workspace --locked -e normal,build -i native-tls >/dev/null 2>&1; then
  echo "openssl-sys or native-tls is in the dependency tree" >&2
  exit 1
fi

say "dependency policy (cargo-deny: licenses, bans, sources; deny.toml)"
# cargo-deny reads the metadata of every platform's dependencies, whose
# sources a build on this one does not download: fetch them first.
cargo fetch --locked --quiet
cargo deny --offline check licenses bans sources
# Advisories need RustSec's database from GitHub: checked when it can be
# fetched, reported as skipped when it cannot.
if advisories=$(cargo deny check advisories 2>&1); then
  echo "advisories ok"
elif grep -q "failed to fetch advisory database" <<<"$advisories"; then
  echo "note: the advisory database cannot be fetched from here; advisories not checked" >&2
else
  echo "$advisories" >&2
  exit 1
fi

say "build (the CLI tests run the real binaries)"
cargo build --workspace --bins --locked

say "tests"
cargo nextest run --workspace --locked --no-fail-fast "${RUN_IGNORED[@]}"

say "fault suite (real processes, injected faults, history checker)"
./target/debug/fault-suite
