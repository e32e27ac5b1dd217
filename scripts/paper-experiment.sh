#!/usr/bin/env bash
# The seed paper's experiment reproduced on network namespaces: WordPress and MariaDB in two
# runc containers, siege at 0, 1, 5, 10 and 50 clients through HAProxy, `hop migrate --group`
# between two sites joined by a 200 Mbit/s link with 20 ms RTT and a WireGuard tunnel; the
# paper's Table III columns next to its figures, failed requests, lost writes
# (benchmarks/harness/paper_experiment.py says how).
#
#   bash scripts/paper-experiment.sh [--quick] [HARNESS OPTIONS...]
#
# --quick: 3 runs per scenario (about 15 minutes); the default is the paper's 10 runs. Results:
# benchmarks/results/paper-experiment.{md,json,png}. Needs root; installs what it needs
# (scripts/setup.sh, debootstrap, siege, curl) and builds the container image once
# (scripts/paper-rootfs.sh, cached in .cache/paper/).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=10
if [ "${1:-}" = --quick ]; then REPS=3; shift; fi
bash scripts/setup.sh
missing=()
for p in debootstrap siege curl; do command -v "$p" >/dev/null || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release -p hop-cli -p hop-benchmarks --bin hop --bin hop-netdelay --bin hop-plot 2>&1 | tail -n 1
bash scripts/paper-rootfs.sh
python3 benchmarks/harness/paper_experiment.py --reps "$REPS" "$@"
