#!/usr/bin/env bash
# Run every test: set-up, unit and property tests, end-to-end tests through the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi
# The API docs build without a broken link (every public item is documented: #![warn(missing_docs)]).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked 2>&1 | tail -n 1
# A short bounded fuzz run of the decoders a peer reaches (HOP_FUZZ_SECS per target; 0 skips;
# the longer run is `bash scripts/fuzz.sh 60`).
secs="${HOP_FUZZ_SECS:-20}"
if [ "$secs" -gt 0 ]; then
    bash scripts/fuzz.sh "$secs"
fi
