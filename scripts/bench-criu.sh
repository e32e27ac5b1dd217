#!/usr/bin/env bash
# Two successive full CRIU dumps of a redis holding ~500 MiB (500k keys), under a bounded write
# load, synced with hop (each mode) and rsync; then redis is restored from hop's copy.
#
#   scripts/bench-criu.sh [--keys N] [--seconds S] [--rate WRITES_PER_S]
#
# Needs root (CRIU). Installs what it needs through scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p hop-cli 2>&1 | tail -n 1
W=$(mktemp -d /var/tmp/hop-criu.XXXXXX)
trap 'rm -rf "$W"' EXIT
python3 benchmarks/harness/criu_pair.py --repo "$PWD" --work "$W" "$@"
