# Sourced by the Debian-based guest builders (tests/guest/cloud/build.sh, tests/guest/mpi/build.sh), after
# cache.sh: the host's Debian mirror, and a build directory whose mounts are undone however the build ends.
# The sourcing script sets ME, SUITE and OUT first.

# The mirror: the host's own apt source for the suite, so no host name lives in a script.
debian_mirror() {
    [ -z "${VTORQUE_DEBIAN_MIRROR:-}" ] || { echo "$VTORQUE_DEBIAN_MIRROR"; return; }
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        # deb822 stanzas: the first URIs of a stanza whose Suites name the suite itself
        awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; ok = 0; deb = 0
              for (i = 1; i <= NF; i++) {
                  if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                  if ($i ~ /^Types:/ && $i ~ /(^|[ \t])deb([ \t]|$)/) deb = 1
                  if ($i ~ /^Suites:/) { n = split($i, b, /[ \t]+/); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 } }
              if (ok && deb && uri != "") { print uri; exit } }' "$f"
    done | head -n 1 | grep . && return
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk -v s="$SUITE" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++;
                                        if ($(i + 1) == s) { print $i; exit } }' "$f"
    done | head -n 1
}

# Leftovers of a build that was killed (SIGKILL skips the traps): nobody else builds here while we hold the lock.
remove_stale_builds() {
    local old
    for old in "$OUT"/.build.*; do
        [ -d "$old" ] || continue
        awk -v p="$old/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r | while read -r mnt; do
            umount -l "$mnt" || true
        done
        if ! grep -q " $old/" /proc/mounts; then rm -rf "$old"; fi
    done
}

# No network: say so with exit 3, so a test can tell "cannot build here" from "the build is broken".
require_mirror() {
    if ! wget -q -T 20 -t 2 -O /dev/null "$MIRROR/dists/$SUITE/Release"; then
        echo "$ME: error: the Debian mirror $MIRROR cannot be reached (no network?)" >&2
        exit 3
    fi
}

# WORK (OUT/.build.*), ROOT (its chroot) and MOUNTS (what cleanup unmounts, last first), removed at exit.
begin_build() {
    WORK=$(mktemp -d "$OUT/.build.XXXXXX")
    ROOT=$WORK/root
    MOUNTS=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}
cleanup() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
    # never delete through a mount that is still there
    if ! grep -q " $WORK/" /proc/mounts; then rm -rf "$WORK"; else echo "$ME: warning: $WORK left (mounts)" >&2; fi
}
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
                LC_ALL=C.UTF-8 HOME=/root "$@"; }

# Make the chroot's apt use the host's sources (so security and point updates come too), start no service
# inside it, and mount its /proc (unmounted by cleanup).
use_host_apt_sources() {
    rm -f "$ROOT/etc/apt/sources.list"
    cp -a /etc/apt/sources.list.d/. "$ROOT/etc/apt/sources.list.d/" 2>/dev/null || true
    [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$ROOT/etc/apt/sources.list"
    printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
    chmod 755 "$ROOT/usr/sbin/policy-rc.d"
    mount -t proc proc "$ROOT/proc" && MOUNTS+=("$ROOT/proc")
}
