#!/usr/bin/env bash
# hop over QUIC vs rsync daemon and rsync over ssh, between two network namespaces on this
# machine: fresh copy of a generated tree, then the sync of an edit. Prints medians and ratios.
#
#   scripts/bench-remote.sh [--workload KIND] [--mib N] [--rate RATE] [--rtt MS] [--reps N]
#                           [--tools hop rsync-ssh ...] [--delta-only] [--hop-variant NAME=ARGS ...]
#
# Workloads (--workload): tree (default), bigfile, rootfs, mixed (scripts/gen-tree.py, sized by
# --mib), or criu: two real CRIU dumps of redis holding --keys keys (default 500000) under 2,000
# writes/s; the fresh copy is dump 1, the delta brings dump 2 (then dump 1 again, alternating),
# and the table ends with the delta's physical limit (new-content pages compressed / --rate).
# Defaults: 1024 MiB, unlimited veth link, 3 repetitions, all tools. --rate caps the link
# each way with tc tbf (e.g. 1gbit, 100mbit); --rtt adds round-trip time (NFQUEUE delay, see
# scripts/netns.sh). --delta-only seeds the destinations with a local
# copy and one untimed no-change sync per tool instead of a timed fresh copy (for slow links).
# --hop-variant adds hop with extra options as tool hop:NAME (scripts/bench-tune.sh uses it).
# Results: benchmarks/results/remote-WORKLOAD-RATE-rttMS-SIZE.{md,json,png}.
# Needs root (namespaces, sshd). Installs what it needs through scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=1024
RATE=
RTT=0
WORKLOAD=tree
KEYS=500000
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --workload) WORKLOAD=$2; shift 2 ;;
    --keys) KEYS=$2; shift 2 ;;
    --mib) MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --rtt) RTT=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
    esac
done
bash scripts/setup.sh
cargo build --release -p hop-cli -p hop-benchmarks --bin hop --bin hop-plot 2>&1 | tail -n 1
W=$(mktemp -d /var/tmp/hop-bench.XXXXXX)
cleanup() {
    scripts/netns.sh down hb
    for d in dst-hop dst-rsd dst-ssh dstfs; do umount "$W/$d" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
# Every tool writes into one ext4 made for the run, with a journal, as servers have it. This
# machine's root file system has none, and without one ext4 passes over every inode freed in
# the last 5 minutes (300 s while its block is dirty) when it allocates a new one: fresh copies
# of 45,000 files right after deleting the previous copy spent a third of their time in that
# scan, for every tool alike and varying 2x between runs. HOP_BENCH_DEST_FS=host keeps the
# destinations on the host's file system instead.
if [ "${HOP_BENCH_DEST_FS:-ext4}" = ext4 ]; then
    truncate -s $(( MIB * 12 + 8192 ))M "$W/dst.img"
    mkfs.ext4 -q -F "$W/dst.img"
    mkdir -p "$W/dstfs" && mount -o loop "$W/dst.img" "$W/dstfs"
    for d in dst-hop dst-rsd dst-ssh; do
        mkdir -p "$W/dstfs/$d" "$W/$d" && mount --bind "$W/dstfs/$d" "$W/$d"
    done
fi
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
EXTRA=()
case "$WORKLOAD" in
criu)
    mkdir -p "$W/dumps"
    python3 benchmarks/harness/criu_pair.py --repo "$PWD" --work "$W/dumps" --keys "$KEYS" --dumps-only
    cp -a "$W/dumps/dump1" "$W/src"
    D1="$W/dumps/dump1" D2="$W/dumps/dump2"
    EXTRA+=(--edit-cmd "if cmp -s {src}/pages-1.img $D1/pages-1.img; then n=$D2; else n=$D1; fi; rm -rf {src} && cp -a \$n {src}")
    LIMIT=$(python3 -c "import json; print(json.load(open('$W/dumps/limit.json'))['new_bytes_compressed'])")
    SIZE="$(du -sm "$W/src" | cut -f1) MiB of CRIU images"
    ;;
tree | bigfile | rootfs | mixed)
    python3 scripts/gen-tree.py make "$W/src" --kind "$WORKLOAD" --size-mib "$MIB" >/dev/null
    EXTRA+=(--kind "$WORKLOAD")
    SIZE="$MIB MiB"
    ;;
*) echo "unknown workload $WORKLOAD (tree, bigfile, rootfs, mixed, criu)" >&2; exit 2 ;;
esac
if [ -n "$RATE" ] && [ -n "${LIMIT:-}" ]; then
    BPS=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+(?:\.\d+)?)([kmg]?)bit', sys.argv[1].lower()); print(float(m[1]) * {'':1,'k':1e3,'m':1e6,'g':1e9}[m[2]])" "$RATE")
    EXTRA+=(--limit-bytes "$LIMIT" --rate-bps "$BPS")
fi
echo "workload $WORKLOAD: $SIZE in $(find "$W/src" -type f | wc -l) files; link: veth between namespaces hb-a and hb-b (MTU 1500), ${RATE:-unlimited}, RTT +${RTT} ms"
NAME="remote-$WORKLOAD-${RATE:-unlimited}-rtt$RTT-${MIB}mib"
[ "$WORKLOAD" = criu ] && NAME="remote-criu-${RATE:-unlimited}-rtt$RTT-${KEYS}keys"
printf '%s\n' "${ARGS[@]}" | grep -qx -- --delta-only && NAME="$NAME-delta"
python3 benchmarks/harness/remote.py --repo "$PWD" --work "$W" --out benchmarks/results \
    --name "$NAME" "${EXTRA[@]}" "${ARGS[@]}"
./target/release/hop-plot "benchmarks/results/$NAME.json" >/dev/null && echo "plot: benchmarks/results/$NAME.png"
