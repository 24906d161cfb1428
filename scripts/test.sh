#!/usr/bin/env bash
# The test command (README, .ci/run): fetch the real assets the tests use
# (idempotent; a second run only checks hashes), then build and run every
# test in release mode (the parity tests run real models).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo >/dev/null || { echo "test: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
command -v cc >/dev/null || { echo "test: no C compiler; apt-get install -y gcc (libjpeg-turbo is built from source)" >&2; exit 1; }
scripts/fetch-assets.sh
# The official openai SDK drives the server in its integration tests:
# pinned, into $AUTOGLM_HOME (never system-wide), reinstalled only when the
# pins change.
SDK_DIR="${AUTOGLM_HOME:-$HOME/.cache/autoglm}/python/openai-sdk"
REQ=tools/server-tests/requirements.txt
if ! cmp -s "$REQ" "$SDK_DIR/requirements.txt"; then
    echo "test: installing the openai SDK into $SDK_DIR" >&2
    rm -rf "$SDK_DIR.tmp"
    python3 -m pip install --quiet --disable-pip-version-check --no-input \
        --only-binary=:all: --no-deps --target "$SDK_DIR.tmp" -r "$REQ" ||
        { echo "test: pip could not install $REQ; this needs access to PyPI" >&2; exit 1; }
    cp "$REQ" "$SDK_DIR.tmp/requirements.txt"
    rm -rf "$SDK_DIR"
    mv "$SDK_DIR.tmp" "$SDK_DIR"
fi
export AUTOGLM_OPENAI_SDK="$SDK_DIR"
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
cargo test --release --workspace --locked
