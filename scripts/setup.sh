#!/usr/bin/env bash
# Install what hop's build, tests and demo need on a fresh Debian bookworm machine.
# Idempotent: packages already present are left alone. Needs root (apt-get).
set -euo pipefail
log() { printf '[setup] %s\n' "$*" >&2; }

PKGS=(rsync xfsprogs python3 util-linux iproute2 diffutils openssh-server openssh-client ethtool time redis-server redis-tools runc busybox-static iptables haproxy wireguard-go wireguard-tools strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins iputils-ping fonts-dejavu-core)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        log "missing packages ${missing[*]}; run as root to install them"; exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { log "cargo not found: this machine kind ships a Rust toolchain"; exit 1; }
# CRIU >= 4.2, built from Debian's source package against this system's libraries (bookworm's
# own criu 3.17 cannot run on this kernel). A working CRIU >= 4.2 is left alone.
if [ "$(id -u)" = 0 ]; then
    bash "$(dirname "$0")/build-criu.sh" 2>&1 | grep -E '^\[build-criu\]' >&2
else
    log "not root: skipping the CRIU build (checkpoint tests need root anyway)"
fi
log "ok: $(rsync --version | head -n1)"
