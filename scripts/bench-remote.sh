#!/usr/bin/env bash
# hop over QUIC vs rsync daemon and rsync over ssh, between two network namespaces on this
# machine: fresh copy of a generated tree, then the sync of an edit. Prints medians and ratios.
#
#   scripts/bench-remote.sh [--mib N] [--rate RATE] [--rtt MS] [--reps N]
#                           [--tools hop rsync-ssh ...] [--delta-only] [--hop-variant NAME=ARGS ...]
#
# Defaults: 1024 MiB tree, unlimited veth link, 3 repetitions, all tools. --rate caps the link
# each way with tc tbf (e.g. 1gbit, 100mbit); --rtt adds round-trip time (NFQUEUE delay, see
# scripts/netns.sh). --delta-only seeds the destinations with a local
# copy and one untimed no-change sync per tool instead of a timed fresh copy (for slow links).
# --hop-variant adds hop with extra options as tool hop:NAME (scripts/bench-tune.sh uses it).
# Results: benchmarks/results/remote-RATE-NmiB.{md,json}.
# Needs root (namespaces, sshd). Installs what it needs through scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=1024
RATE=
RTT=0
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --mib) MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --rtt) RTT=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
    esac
done
bash scripts/setup.sh
cargo build --release -p hop-cli 2>&1 | tail -n 1
W=$(mktemp -d /var/tmp/hop-bench.XXXXXX)
cleanup() { scripts/netns.sh down hb; rm -rf "$W"; }
trap cleanup EXIT
# This machine is a VM whose guest memory is backed lazily: the first write to a page the
# guest never touched costs ~10x a later one (1 GiB of new file data: 2.4 s of system time the
# first time, 0.18 s after). Touch the memory the benchmark will use once per boot, so that no
# tool pays for it in the middle of a measured run.
if [ ! -e /run/hop-bench-warm ]; then
    echo "warming up guest memory (once per boot)..."
    mkdir -p "$W/warm" && mount -t tmpfs -o size=$((MIB * 12 + 4096))m tmpfs "$W/warm"
    dd if=/dev/zero of="$W/warm/fill" bs=1M count=$((MIB * 12 + 2048)) status=none || true
    umount "$W/warm" && touch /run/hop-bench-warm
fi
scripts/netns.sh up hb "${RATE:-none}" "$RTT"
python3 scripts/gen-tree.py make "$W/src" --size-mib "$MIB" >/dev/null
echo "tree: $MIB MiB in $(find "$W/src" -type f | wc -l) files; link: veth between namespaces hb-a and hb-b (MTU 1500), ${RATE:-unlimited}"
python3 benchmarks/harness/remote.py --repo "$PWD" --work "$W" --out benchmarks/results \
    --name "remote-${RATE:-unlimited}-${MIB}mib$(printf '%s\n' "${ARGS[@]}" | grep -qx -- --delta-only && echo -delta)" "${ARGS[@]}"
