#!/usr/bin/env bash
# Tuning session: hop with one setting varied, side by side with rsync over ssh, on the remote
# harness's workload and link (scripts/bench-remote.sh), and the best value printed.
#
#   scripts/bench-tune.sh chunk-avg|streams|zstd|congestion [--mib N] [--rate RATE] [--rtt MS] [--reps N]
#
#   chunk-avg  4096 16384 65536 262144 bytes (--chunk-avg)
#   streams    1 2 4 8 16 (--streams)
#   zstd       off, 1, 3, 9 (--compress zstd:LEVEL)
#   congestion cubic, bbr, newreno (--congestion; the pushing client's controller)
#
# Every variant runs alternately with the others and rsync in the same run (fresh copy, then the
# edit); the table and "best fresh / best delta" lines go to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: bench-tune.sh chunk-avg|streams|zstd|congestion [bench-remote options]}
shift
V=()
case "$what" in
chunk-avg) for n in 4096 16384 65536 262144; do V+=(--hop-variant "avg$n=--chunk-avg $n"); done ;;
streams) for n in 1 2 4 8 16; do V+=(--hop-variant "s$n=--streams $n"); done ;;
zstd) V+=(--hop-variant "off="); for l in 1 3 9; do V+=(--hop-variant "z$l=--compress zstd:$l"); done ;;
congestion) for c in cubic bbr newreno; do V+=(--hop-variant "$c=--congestion $c"); done ;;
*) echo "unknown setting $what (chunk-avg, streams, zstd, congestion)" >&2; exit 2 ;;
esac
exec bash scripts/bench-remote.sh --name "tune-$what" --tools rsync-ssh "${V[@]}" "$@"
