#!/usr/bin/env bash
# The main job: hop against rsync on a generated tree (default 256 MiB; DEMO_MIB to change).
#   1. local: sync it fresh, rewrite 1% of its 4 KiB pages plus a few insertions, sync again,
#      check the copy is byte-identical;
#   2. remote: the same over QUIC between two network namespaces (hop serve in one, hop sync in
#      the other), side by side with rsync over ssh and the rsync daemon, bytes on the wire
#      counted on the link;
#   3. live migration: redis (DEMO_KEYS keys of ~1 KB, default 500,000: ~550 MiB) in a runc
#      container moves between the namespaces over a 1 Gbit/s link with 20 ms of round-trip
#      time while a client writes to it, and back; every acknowledged write is read back at the
#      new host (scripts/demo-migrate.py).
# Needs root (namespaces, sshd); installs what it needs through scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MIB=${DEMO_MIB:-256}
cargo build --release -p hop-cli 2>&1 | tail -n 1
HOP=$PWD/target/release/hop
W=$(mktemp -d /tmp/hop-demo.XXXXXX)
trap 'rm -rf "$W"' EXIT
python3 scripts/gen-tree.py make "$W/src" --size-mib "$MIB"
echo "== 1. local: fresh copy"
"$HOP" sync -a --stats "$W/src/" "$W/hop-dst"
rsync -a "$W/src/" "$W/rsync-dst"
python3 scripts/gen-tree.py edit "$W/src"
echo "== 1. local: after the edit, hop"
"$HOP" sync -a --stats --delete "$W/src/" "$W/hop-dst"
echo "== 1. local: after the edit, rsync -a --no-whole-file --stats"
rsync -a --no-whole-file --delete --stats "$W/src/" "$W/rsync-dst" | grep -E 'Literal data|Matched data|Total file size'
diff -r --no-dereference "$W/src" "$W/hop-dst" && echo "hop copy is byte-identical to the source"
echo "== 2. remote: hop over QUIC vs rsync over ssh and the rsync daemon (veth between namespaces)"
bash scripts/bench-remote.sh --mib "$MIB" --reps 1 --tools hop rsync-ssh rsyncd
echo "== 3. live migration: redis in a runc container, a -> b -> a, under writes"
python3 scripts/demo-migrate.py --keys "${DEMO_KEYS:-500000}" --moves 2 --rtt 20
