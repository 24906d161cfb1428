#!/usr/bin/env bash
# The test command (README, .ci/run): fetch the real assets the tests use
# (idempotent; a second run only checks hashes), then build and run every
# test in release mode (the parity tests run real models).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo >/dev/null || { echo "test: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
command -v cc >/dev/null || { echo "test: no C compiler; apt-get install -y gcc (libjpeg-turbo is built from source)" >&2; exit 1; }
scripts/fetch-assets.sh
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
cargo test --release --workspace --locked
