#!/usr/bin/env bash
# hop over QUIC vs rsync daemon and rsync over ssh, between two network namespaces on this
# machine: fresh copy of a generated tree, then the sync of an edit. Prints medians and ratios.
#
#   scripts/bench-remote.sh [--mib N] [--rate RATE] [--reps N] [--tools hop rsync-ssh ...]
#
# Defaults: 1024 MiB tree, unlimited veth link, 3 repetitions, all tools. --rate caps the link
# each way with tc tbf (e.g. 1gbit, 100mbit). Results: benchmarks/results/remote-RATE.{md,json}.
# Needs root (namespaces, sshd). Installs what it needs through scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=1024
RATE=
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --mib) MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
    esac
done
bash scripts/setup.sh
cargo build --release -p hop-cli 2>&1 | tail -n 1
W=$(mktemp -d /var/tmp/hop-bench.XXXXXX)
cleanup() { scripts/netns.sh down hb; rm -rf "$W"; }
trap cleanup EXIT
scripts/netns.sh up hb $RATE
python3 scripts/gen-tree.py make "$W/src" --size-mib "$MIB" >/dev/null
echo "tree: $MIB MiB in $(find "$W/src" -type f | wc -l) files; link: veth between namespaces hb-a and hb-b (MTU 1500), ${RATE:-unlimited}"
python3 benchmarks/harness/remote.py --repo "$PWD" --work "$W" --out benchmarks/results \
    --name "remote-${RATE:-unlimited}-${MIB}mib" "${ARGS[@]}"
