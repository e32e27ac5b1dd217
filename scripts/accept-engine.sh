#!/usr/bin/env bash
# Acceptance check of the engine issue: 1 GiB generated tree, fresh sync, edit (1% of 4 KiB pages
# rewritten + insertions), re-sync; compare with rsync -a --no-whole-file in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${MIB:-1024}
cargo build --release -p hop-cli 2>&1 | tail -n 1
HOP=$PWD/target/release/hop
W=$(mktemp -d /var/tmp/hop-accept.XXXXXX)
trap 'rm -rf "$W"' EXIT
python3 scripts/gen-tree.py make "$W/src" --size-mib "$MIB"
t() { local s=$(date +%s.%N); "$@"; echo "$(date +%s.%N) - $s" | bc; }
echo "fresh hop:   $(t "$HOP" sync -a -q --stats-json "$W/fresh.json" "$W/src/" "$W/hop") s"; cat "$W/fresh.json"
echo "fresh rsync: $(t rsync -a "$W/src/" "$W/rs") s"
python3 scripts/gen-tree.py edit "$W/src"
echo "delta hop:   $(t "$HOP" sync -a -q --stats-json "$W/delta.json" "$W/src/" "$W/hop") s"; cat "$W/delta.json"
echo "delta rsync: $(t sh -c "rsync -a --no-whole-file --stats $W/src/ $W/rs > $W/rs.txt") s"
grep -E 'Literal data|Total file size' "$W/rs.txt"
python3 - "$W/delta.json" <<'PY'
import json,sys; s=json.load(open(sys.argv[1]))
print("hop literal/total = %.2f%%  wire/total = %.2f%%" % (100*s["bytes_literal"]/s["bytes_total"], 100*s["bytes_wire"]/s["bytes_total"]))
PY
diff -r --no-dereference "$W/src" "$W/hop" && echo "diff -r: identical"
(cd "$W/src" && find . -printf '%p %m %T@\n' | sort) > "$W/a"; (cd "$W/hop" && find . -printf '%p %m %T@\n' | sort) > "$W/b"
cmp "$W/a" "$W/b" && echo "modes and mtimes: identical"
