#!/usr/bin/env bash
# Migration traffic through the site-to-site tunnel or direct: the same fresh `hop sync` of a
# generated tree to a `hop serve` in the other namespace, once to its site address (10.77.0.2,
# QUIC straight over the veth) and once to its tunnel address (10.200.0.2, QUIC inside the
# WireGuard tunnel `hop vpn up` sets up), alternating, medians of --reps.
#
#   scripts/bench-tunnel.sh [--mib N] [--rate RATE] [--reps N] [--backend wireguard|ipsec]
#
# Defaults: 256 MiB, unlimited veth, 3 repetitions, WireGuard (userspace wireguard-go here).
# Bytes on the wire are the veth counters of the target namespace (both directions). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=256 RATE=none REPS=3 BACKEND=wireguard
while [ $# -gt 0 ]; do
    case "$1" in
        --mib) MIB=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --backend) BACKEND=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
bash scripts/setup.sh >/dev/null
cargo build --release -q -p hop-cli --bin hop
HOP=$PWD/target/release/hop
P=tun
W=$(mktemp -d /var/tmp/hop-tunnel.XXXXXX)
SERVE=
cleanup() {
    set +e
    ip netns exec $P-a "$HOP" vpn down quic://10.77.0.2:7420 --identity "$W/cli" \
        --known-hosts "$W/known_hosts" >/dev/null 2>&1 || true
    if [ -n "$SERVE" ]; then kill "$SERVE" 2>/dev/null || true; wait "$SERVE" 2>/dev/null || true; fi
    bash scripts/netns.sh down $P >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT
bash scripts/netns.sh up $P "$RATE" >/dev/null
python3 scripts/gen-tree.py --kind mixed --size-mib "$MIB" --seed 7 make "$W/src" >/dev/null
fp=$("$HOP" keygen --out "$W/cli")
echo "$fp" >"$W/authorized_keys"
"$HOP" keygen --out "$W/srv" >/dev/null
mkdir -p "$W/root"
ip netns exec $P-b "$HOP" serve --listen 0.0.0.0:7420 --root "$W/root" --identity "$W/srv" \
    --authorized-keys "$W/authorized_keys" 2>"$W/serve.log" &
SERVE=$!
sleep 0.5
hop_a() { ip netns exec $P-a "$HOP" "$@" --identity "$W/cli" --known-hosts "$W/known_hosts" --accept-new; }
case "$BACKEND" in
    wireguard) addrs=(--addr 10.200.0.1/24 --peer-addr 10.200.0.2/24); TUN=10.200.0.2 ;;
    ipsec) addrs=(--backend ipsec --addr 10.202.0.1 --peer-addr 10.202.0.2); TUN=10.202.0.2 ;;
    *) echo "unknown backend $BACKEND" >&2; exit 2 ;;
esac
hop_a vpn up quic://10.77.0.2:7420 "${addrs[@]}" >/dev/null
sleep 1
size=$(du -sb "$W/src" | cut -f1)
declare -A T B
for r in $(seq 1 "$REPS"); do
    for way in direct tunnel; do
        host=10.77.0.2
        [ $way = tunnel ] && host=$TUN
        rm -rf "$W/root/$way"
        b0=$(bash scripts/netns.sh bytes $P)
        t0=$(date +%s.%N)
        hop_a sync -a -q "$W/src/" "quic://$host:7420/$way" >/dev/null
        t1=$(date +%s.%N)
        b1=$(bash scripts/netns.sh bytes $P)
        cmp -s <(cd "$W/src" && find . -type f -exec md5sum {} + | sort) \
            <(cd "$W/root/$way" && find . -type f -exec md5sum {} + | sort) ||
            { echo "$way: the copy differs from the source" >&2; exit 1; }
        T[$way]+="$(echo "$t1 - $t0" | bc) "
        B[$way]+="$((b1 - b0)) "
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "fresh hop sync of $((size / 1048576)) MiB, link $RATE, $REPS runs each, backend $BACKEND:"
echo "| path | wall s median | Mbit/s | veth MB (both ways) |"
echo "| --- | --- | --- | --- |"
for way in direct tunnel; do
    t=$(echo "${T[$way]}" | median)
    b=$(echo "${B[$way]}" | median)
    printf '| %s | %.2f | %d | %d |\n' "$way" "$t" "$(echo "$size * 8 / $t / 1000000" | bc)" $((b / 1000000))
done
