#!/usr/bin/env bash
# The main job, for now: a local delta sync of a generated tree, side by side with rsync.
# Generates a tree (default 256 MiB; DEMO_MIB to change), syncs it fresh, rewrites 1% of its
# 4 KiB pages plus a few insertions, syncs again, and checks the copies are byte-identical.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MIB=${DEMO_MIB:-256}
cargo build --release -p hop-cli 2>&1 | tail -n 1
HOP=$PWD/target/release/hop
W=$(mktemp -d /tmp/hop-demo.XXXXXX)
trap 'rm -rf "$W"' EXIT
python3 scripts/gen-tree.py make "$W/src" --size-mib "$MIB"
echo "== fresh copy"
"$HOP" sync -a --stats "$W/src/" "$W/hop-dst"
rsync -a "$W/src/" "$W/rsync-dst"
python3 scripts/gen-tree.py edit "$W/src"
echo "== after the edit: hop"
"$HOP" sync -a --stats --delete "$W/src/" "$W/hop-dst"
echo "== after the edit: rsync -a --no-whole-file --stats"
rsync -a --no-whole-file --delete --stats "$W/src/" "$W/rsync-dst" | grep -E 'Literal data|Matched data|Total file size'
diff -r --no-dereference "$W/src" "$W/hop-dst" && echo "hop copy is byte-identical to the source"
