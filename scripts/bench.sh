#!/usr/bin/env bash
# The benchmark suite: hop against rsync (over ssh, with and without -z, and the rsync daemon)
# on every workload and link profile, between two network namespaces, each run alternating the
# tools; a Markdown table, a JSON file and a PNG plot per run in benchmarks/results/, and
# benchmarks/results/SUMMARY.md with every table.
#
#   bash scripts/bench.sh [--quick]
#
# --quick (a few minutes): small workloads, 2 repetitions, hop (defaults and tuned) and rsync
# over ssh (plain, -z, -z --inplace). The full run (about an hour): 1 GiB workloads and redis
# with 500,000 keys, 3 repetitions, every tool; fresh copies and deltas at 1 Gbit/s, deltas
# alone at 100 Mbit/s with 40 ms RTT.
# Needs root. Tuning sweeps: scripts/bench-tune.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = --quick ] && QUICK=1
if [ $QUICK = 1 ]; then
    MIB=128 KEYS=50000 REPS=2 TOOLS=(hop hop-tuned rsync-ssh rsync-ssh-z rsync-ssh-z-inplace)
else
    MIB=1024 KEYS=500000 REPS=3 TOOLS=(hop hop-zstd hop-tuned rsync-ssh rsync-ssh-z rsync-ssh-z-inplace rsyncd)
fi
RUNS=(
    # workload  rate     rtt ms  mode (fresh: fresh copy and delta; delta: the delta alone)
    "criu       100mbit  40      fresh"
    "criu       1gbit    0       fresh"
    "tree       1gbit    0       fresh"
    "bigfile    100mbit  40      fresh"
    "rootfs     1gbit    0       fresh"
    "mixed      1gbit    0       fresh"
)
# The full run: fresh copies at 1 Gbit/s (a fresh GiB at 100 Mbit/s is 86 s of link time for
# every tool, x 7 tools x 3 repetitions per workload), deltas at both rates.
[ $QUICK = 0 ] && RUNS=(
    "criu       1gbit    0       fresh"
    "tree       1gbit    0       fresh"
    "bigfile    1gbit    0       fresh"
    "rootfs     1gbit    0       fresh"
    "mixed      1gbit    0       fresh"
    "criu       100mbit  40      delta"
    "bigfile    100mbit  40      delta"
    "tree       100mbit  40      delta"
    "rootfs     100mbit  40      delta"
)
t0=$(date +%s)
names=()
for r in "${RUNS[@]}"; do
    read -r workload rate rtt mode <<<"$r"
    echo "=== $workload, $rate, RTT +$rtt ms, $mode"
    only=()
    [ "$mode" = delta ] && only=(--delta-only)
    bash scripts/bench-remote.sh --workload "$workload" --mib "$MIB" --keys "$KEYS" --rate "$rate" \
        --rtt "$rtt" --reps "$REPS" "${only[@]}" --tools "${TOOLS[@]}" | tee /tmp/hop-bench-run.log
    names+=("$(sed -n 's/^plot: benchmarks\/results\/\(.*\)\.png$/\1/p' /tmp/hop-bench-run.log)")
done
{
    echo "# Benchmark suite ($([ $QUICK = 1 ] && echo quick || echo full)), $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r)"
    echo
    for n in "${names[@]}"; do
        echo "## $n"
        echo
        cat "benchmarks/results/$n.md"
        echo
        echo "![$n]($n.png)"
        echo
    done
} >benchmarks/results/SUMMARY.md
echo "suite done in $(( $(date +%s) - t0 )) s: benchmarks/results/SUMMARY.md"
