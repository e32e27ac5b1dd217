#!/usr/bin/env bash
# Two "hosts" as network namespaces joined by a veth pair, for benchmarks and tests.
#
#   scripts/netns.sh up   [PREFIX] [RATE] [RTT_MS]
#                                     create PREFIX-a (10.77.0.1) and PREFIX-b (10.77.0.2), with a
#                                     TBF cap of RATE (e.g. 1gbit, 100mbit; "none") each way and,
#                                     given RTT_MS, that much added round-trip time (no netem
#                                     here: iptables NFQUEUE + target/release/hop-netdelay in
#                                     each namespace, half the delay each way, built if missing;
#                                     $HOP_NETDELAY names another build of it)
#   scripts/netns.sh down [PREFIX]    remove them
#   scripts/netns.sh bytes [PREFIX]   bytes received+sent by PREFIX-b's interface so far
#
# Traffic never leaves the two namespaces. PREFIX defaults to "hop". Needs root (and ethtool, to
# turn segmentation offload off so that interface counters count every packet's headers).
set -euo pipefail
cmd=${1:?usage: netns.sh up|down|bytes [PREFIX]}
P=${2:-hop}
A=$P-a B=$P-b
case "$cmd" in
up)
    "$0" down "$P" 2>/dev/null || true
    ip netns add "$A"
    ip netns add "$B"
    ip link add "$P-va" netns "$A" type veth peer name "$P-vb" netns "$B"
    ip -n "$A" addr add 10.77.0.1/24 dev "$P-va"
    ip -n "$B" addr add 10.77.0.2/24 dev "$P-vb"
    for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
    ip -n "$A" link set "$P-va" up
    ip -n "$B" link set "$P-vb" up
    # No segmentation offload: every packet crosses the veth as the wire would carry it (with
    # its own headers), so interface counters measure real bytes on the wire for TCP and UDP.
    ip netns exec "$A" ethtool -K "$P-va" tso off gso off 2>/dev/null || true
    ip netns exec "$B" ethtool -K "$P-vb" tso off gso off 2>/dev/null || true
    if [ -n "${3:-}" ] && [ "$3" != none ]; then
        # Token bucket on each side's egress; burst sized for the rate (>= 10 ms worth).
        for side in "$A:$P-va" "$B:$P-vb"; do
            ip netns exec "${side%%:*}" tc qdisc add dev "${side##*:}" root tbf rate "$3" \
                burst 1mb latency 50ms
        done
    fi
    if [ -n "${4:-}" ] && [ "$4" != 0 ]; then
        root=$(cd "$(dirname "$0")/.." && pwd)
        delay=${HOP_NETDELAY:-$root/target/release/hop-netdelay}
        [ -x "$delay" ] || (cd "$root" && cargo build --release -q -p hop-benchmarks --bin hop-netdelay)
        half=$(python3 -c "print($4 / 2)")
        : > "/run/hop-netns-$P.pids"
        # On each side's ingress (raw PREROUTING): delaying the sender's own egress would let
        # TCP Small Queues throttle it.
        for side in "$A:$P-va" "$B:$P-vb"; do
            ns=${side%%:*} dev=${side##*:}
            ip netns exec "$ns" iptables -t raw -A PREROUTING -i "$dev" -j NFQUEUE --queue-num 0
            ip netns exec "$ns" "$delay" 0 "$half" </dev/null >/dev/null 2>&1 &
            echo $! >> "/run/hop-netns-$P.pids"
        done
    fi
    ;;
down)
    if [ -f "/run/hop-netns-$P.pids" ]; then
        while read -r pid; do kill "$pid" 2>/dev/null || true; done < "/run/hop-netns-$P.pids"
        rm -f "/run/hop-netns-$P.pids"
    fi
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    ;;
bytes)
    d=/sys/class/net/$P-vb/statistics
    ip netns exec "$B" sh -c "echo \$(( \$(cat $d/rx_bytes) + \$(cat $d/tx_bytes) ))"
    ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
