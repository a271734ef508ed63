#!/usr/bin/env bash
# The project's test command (README): checks, builds and runs every test.
# Installs what it needs first, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

if ! command -v cargo-nextest >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  say "installing kubernetes-validate (PyPI) for the manifest tests"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
  hash -r
fi
command -v kubectl >/dev/null 2>&1 || echo "note: kubectl is missing; the kube-sim kubectl test will fail" >&2

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

say "build (the CLI tests run the real binaries)"
cargo build --workspace --bins --locked

say "tests"
cargo nextest run --workspace --locked --no-fail-fast
