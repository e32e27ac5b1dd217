#!/usr/bin/env bash
# Fuzz what a peer can make hop decode (cargo-fuzz, libFuzzer): `frame` (the chunk stream and
# every payload codec, zstd bombs included), `manifest` (entries through the receiver's checks,
# want-list runs) and `handshake` (the first message of a request and the server's checks of it
# against its root). A crash fails the run and leaves its input in fuzz/artifacts/TARGET/.
#
# Usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 60)
#   replay one input: RUSTC_BOOTSTRAP=1 .tools/bin/cargo-fuzz run -O TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
tools="$PWD/.tools"
if ! [ -x "$tools/bin/cargo-fuzz" ]; then
    echo "== installing cargo-fuzz into $tools"
    cargo install --quiet --locked --root "$tools" cargo-fuzz --version 0.13.2
fi
export PATH="$tools/bin:$PATH"
# libFuzzer's instrumentation needs unstable rustc flags; RUSTC_BOOTSTRAP lets the stable
# toolchain of this machine accept them (no nightly toolchain is installed).
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build -O 2>&1 | tail -n 2
for t in frame manifest handshake; do
    mkdir -p "corpus/$t"
    echo "== fuzzing $t for ${secs}s"
    log="target/fuzz-$t.log"
    mkdir -p target
    if ! cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -max_len=65536 \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        grep -E -A5 "panicked|ERROR|SUMMARY|artifact" "$log" | head -n 30
        echo "fuzz target $t failed: its input is in fuzz/artifacts/$t/ (full log: fuzz/$log)"
        exit 1
    fi
    grep -E "^(Done|stat::peak_rss)" "$log"
done
