#!/usr/bin/env bash
# Build CRIU 4.x from a Debian source package (sid by default: CRIU 4.2.x) against the
# libraries of the running Debian 12 (bookworm) system, without upgrading libc,
# and install the binary as $PREFIX/sbin/criu. Adapted from ../shared/notes (verified recipe).
#
# Idempotent: a machine whose `criu` is already >= 4.2 and passes `criu check` is left alone,
# and re-running is a no-op when the wanted version is already installed (set FORCE=1 to
# rebuild). Needs root and Debian's package archive only.
#
# Knobs (environment):
#   CRIU_SUITE  Debian suite to take the source from: sid (default, CRIU 4.2.x) or trixie
#               (CRIU 4.1.1, patched here for Linux >= 6.16 sockets).
#   PREFIX      install prefix (default /usr/local -> /usr/local/sbin/criu)
#   WORKDIR     build directory (default /var/tmp/criu-src)
#   JOBS        make parallelism (default: nproc)
#   FORCE=1     rebuild and reinstall even if the version is already installed
#
# Build time on a 2-core machine: about 35-50 s for `make` (plus ~15 s of apt).
set -euo pipefail

CRIU_SUITE=${CRIU_SUITE:-sid}
PREFIX=${PREFIX:-/usr/local}
WORKDIR=${WORKDIR:-/var/tmp/criu-src}
JOBS=${JOBS:-$(nproc)}
FORCE=${FORCE:-0}

log() { printf '[build-criu] %s\n' "$*" >&2; }
die() { printf '[build-criu] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"

# --- 0. a working CRIU >= 4.2 is left alone
if [ "$FORCE" != 1 ] && command -v criu >/dev/null 2>&1; then
    have=$(criu --version 2>/dev/null | sed -n 's/^Version: //p')
    if printf '4.2\n%s\n' "$have" | sort -V -C && criu check >/dev/null 2>&1; then
        log "criu $have is installed and works; nothing to do (FORCE=1 to rebuild)"
        exit 0
    fi
fi
. /etc/os-release
HOST_CODENAME=${VERSION_CODENAME:?cannot read VERSION_CODENAME from /etc/os-release}

# --- 1. deb-src entry for the wanted suite (URI copied from the system's Debian sources)
SRC_FILE=/etc/apt/sources.list.d/criu-src-${CRIU_SUITE}.sources
if [ ! -f "$SRC_FILE" ]; then
    uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        # first stanza whose Suites contain the host codename (not -security)
        uri=$(awk -v cn="$HOST_CODENAME" '
            BEGIN { RS=""; FS="\n" }
            {
              u=""; s="";
              for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/)   { u = $i; sub(/^URIs:[ \t]*/, "", u) }
                if ($i ~ /^Suites:/) { s = $i }
              }
              if (u != "" && s ~ ("[ \t]" cn "([ \t]|$)") && u !~ /security/) { split(u, a, " "); print a[1]; exit }
            }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk -v cn="$HOST_CODENAME" '$1=="deb" && $3==cn && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || die "could not find the Debian archive URI in the apt sources"
    log "adding deb-src for $CRIU_SUITE ($SRC_FILE)"
    cat > "$SRC_FILE" <<EOF
Types: deb-src
URIs: $uri
Suites: $CRIU_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -qq
elif ! apt-get source --print-uris "criu/$CRIU_SUITE" >/dev/null 2>&1; then
    apt-get update -qq
fi

# --- 2. which version does the suite have?
URIS=$(cd /tmp && apt-get source --print-uris "criu/$CRIU_SUITE" 2>/dev/null | grep "^'") \
    || die "no criu source package in suite $CRIU_SUITE (apt-get update?)"
ORIG_LINE=$(printf '%s\n' "$URIS" | grep -E "criu_[^ ]+\.orig\.tar\.[a-z0-9]+ " | head -n1)
ORIG_FILE=$(printf '%s\n' "$ORIG_LINE" | awk '{print $2}')
ORIG_SHA=$(printf '%s\n' "$ORIG_LINE" | sed -n 's/.*SHA256:\([0-9a-f]*\).*/\1/p')
UPSTREAM_VER=$(printf '%s\n' "$ORIG_FILE" | sed -E 's/^criu_(.*)\.orig\.tar\..*/\1/')
[ -n "$ORIG_FILE" ] && [ -n "$ORIG_SHA" ] || die "could not parse source URIs: $URIS"
log "suite $CRIU_SUITE has CRIU $UPSTREAM_VER ($ORIG_FILE)"

if [ "$FORCE" != 1 ] && [ -x "$PREFIX/sbin/criu" ] \
   && "$PREFIX/sbin/criu" --version 2>/dev/null | grep -qx "Version: $UPSTREAM_VER"; then
    log "$PREFIX/sbin/criu is already $UPSTREAM_VER; nothing to do (FORCE=1 to rebuild)"
    "$PREFIX/sbin/criu" check || true
    exit 0
fi

# --- 3. build dependencies, strictly from the host release (never a newer libc)
BUILD_DEPS=(build-essential pkgconf xz-utils patch
    libbsd-dev libcap-dev libnet1-dev libnftables-dev libnl-3-dev
    libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler
    uuid-dev libgnutls28-dev python3-protobuf)
PIN_DIR=$(mktemp -d)
trap 'rm -rf "$PIN_DIR"' EXIT
for rel in "$HOST_CODENAME" "$HOST_CODENAME-security" "$HOST_CODENAME-updates"; do
    printf 'Package: *\nPin: release n=%s\nPin-Priority: 990\n\n' "$rel"
done > "$PIN_DIR/host-release.pref"
log "installing build dependencies from $HOST_CODENAME"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends --no-upgrade \
    -o Dir::Etc::PreferencesParts="$PIN_DIR" "${BUILD_DEPS[@]}" >/dev/null

# --- 4. fetch + verify the upstream tarball (the mirror may 404 the .dsc/.debian.tar.xz;
#        only the .orig tarball is needed, its SHA256 comes from the signed Sources index)
mkdir -p "$WORKDIR"
cd "$WORKDIR"
if ! { [ -f "$ORIG_FILE" ] && echo "$ORIG_SHA  $ORIG_FILE" | sha256sum -c --quiet - 2>/dev/null; }; then
    rm -f "$ORIG_FILE"
    log "downloading source package (errors for .dsc/.debian.tar.xz are tolerated)"
    apt-get source --download-only "criu/$CRIU_SUITE" >/dev/null 2>&1 || true
    [ -f "$ORIG_FILE" ] || die "could not download $ORIG_FILE"
fi
echo "$ORIG_SHA  $ORIG_FILE" | sha256sum -c --quiet - || die "checksum mismatch for $ORIG_FILE"

SRC_DIR="$WORKDIR/criu-$UPSTREAM_VER"
rm -rf "$SRC_DIR"
tar -xf "$ORIG_FILE"
[ -d "$SRC_DIR" ] || die "unexpected tarball layout"
cd "$SRC_DIR"

# --- 5. Linux >= 6.16 restricts SO_PASSCRED/SO_PASSSEC to AF_UNIX/AF_NETLINK; CRIU < 4.2
#        fails to dump any TCP/UDP socket ("Can't get 1:16 opt: Operation not supported").
if grep -q 'ret |= dump_opt(sk, SOL_SOCKET, SO_PASSCRED, &val);' criu/sockets.c \
   && ! grep -q 'family == AF_UNIX || family == AF_NETLINK' criu/sockets.c; then
    log "applying SO_PASSCRED/SO_PASSSEC fix for Linux >= 6.16"
    patch -p1 --forward --no-backup-if-mismatch <<'PATCH'
--- a/criu/sockets.c
+++ b/criu/sockets.c
@@ -637,6 +637,21 @@
 	return 0;
 }
 
+/* 0: value read; 1: option not supported for this socket (skipped); -1: error (also sets *ret) */
+static int do_dump_opt_optional(int sk, int level, int name, int *val, socklen_t len, int *ret)
+{
+	socklen_t aux = len;
+
+	if (getsockopt(sk, level, name, val, &aux) < 0) {
+		if (errno == EOPNOTSUPP)
+			return 1;
+		pr_perror("Can't get %d:%d opt", level, name);
+		*ret |= -1;
+		return -1;
+	}
+	return 0;
+}
+
 int dump_socket_opts(int sk, SkOptsEntry *soe)
 {
 	int ret = 0, val;
@@ -676,13 +691,19 @@
 	soe->so_reuseport = val ? true : false;
 	soe->has_so_reuseport = true;
 
-	ret |= dump_opt(sk, SOL_SOCKET, SO_PASSCRED, &val);
-	soe->has_so_passcred = true;
-	soe->so_passcred = val ? true : false;
-
-	ret |= dump_opt(sk, SOL_SOCKET, SO_PASSSEC, &val);
-	soe->has_so_passsec = true;
-	soe->so_passsec = val ? true : false;
+	/*
+	 * Linux 6.16+ restricts SO_PASSCRED/SO_PASSSEC to AF_UNIX/AF_NETLINK
+	 * (getsockopt returns EOPNOTSUPP on other families): skip them there.
+	 */
+	if (!do_dump_opt_optional(sk, SOL_SOCKET, SO_PASSCRED, &val, sizeof(val), &ret)) {
+		soe->has_so_passcred = true;
+		soe->so_passcred = val ? true : false;
+	}
+
+	if (!do_dump_opt_optional(sk, SOL_SOCKET, SO_PASSSEC, &val, sizeof(val), &ret)) {
+		soe->has_so_passsec = true;
+		soe->so_passsec = val ? true : false;
+	}
 
 	ret |= dump_opt(sk, SOL_SOCKET, SO_DONTROUTE, &val);
 	soe->has_so_dontroute = true;
PATCH
fi

# --- 6. build (no docs) and install the binary
log "building CRIU $UPSTREAM_VER with make -j$JOBS"
start=$(date +%s)
make -j"$JOBS" >"$WORKDIR/make.log" 2>&1 || { tail -n 40 "$WORKDIR/make.log" >&2; die "make failed (log: $WORKDIR/make.log)"; }
log "make finished in $(( $(date +%s) - start )) s"
install -D -m 0755 criu/criu "$PREFIX/sbin/criu"
log "installed $("$PREFIX/sbin/criu" --version | head -n1) as $PREFIX/sbin/criu"

# --- 7. report what the kernel supports (check --all exits 1 without soft-dirty tracking)
"$PREFIX/sbin/criu" check || true
"$PREFIX/sbin/criu" check --feature mem_dirty_track || true
