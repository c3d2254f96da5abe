#!/bin/bash
# Build the vtorque MPI guest into OUTDIR: the tiny test guest's kernel, initrd and boot contract
# (tests/guest/README.md: direct kernel boot, the seed's VT_* variables, dropbear, job NIC by MAC,
# VTORQUE-GUEST-READY), with a Debian 12 root filesystem that has Open MPI from Debian packages:
#   vmlinux, initrd.img  the tiny guest's (built or taken from its cache in OUTDIR/.tiny)
#   rootfs.qcow2         ext4: debootstrap minbase + openmpi-bin + dropbear-bin, static busybox for the applets
#                        minbase lacks, /sbin/vtorque-init (the tiny guest's), /usr/local/bin/vt-ssh (dbclient
#                        as Open MPI's launcher),
#                        /usr/local/bin/vt-mpi-hello (mpi-hello.c, compiled here against the image's Open MPI)
#   SHA256SUMS           sha256sum of the three files
# Cached like the other guests (tests/guest/cache.sh): if OUTDIR/.stamp matches the inputs (these files, the
# tiny guest's stamp, the candidate versions of the key packages), exits 0 at once.
#
# Usage: tests/guest/mpi/build.sh OUTDIR      (as root, Debian 12, with debootstrap and gcc)
# Env:   VTORQUE_DEBIAN_MIRROR=URL   the Debian mirror (default: the host's apt source for bookworm)
# Exit:  0 built or cached; 3 the Debian mirror cannot be reached (no network); 1 any other error; 2 usage.
set -euo pipefail

ME=mpi/build.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
START=$EPOCHREALTIME
SUITE=bookworm
# Open MPI over TCP and shared memory; dropbear's server and client (dbclient is mpirun's ssh). No recommends.
PKGS=(openmpi-bin libopenmpi3 dropbear-bin)
KEYPKGS=(openmpi-bin libopenmpi3 libopenmpi-dev dropbear-bin)
DISK_MIB=512

. "$HERE/../cache.sh"
. "$HERE/../debootstrap.sh"

[ $# -eq 1 ] || { echo "usage: $ME OUTDIR" >&2; exit 2; }
OUT=$1
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, file ownership in the image)"
for tool in debootstrap chroot apt-get apt-cache dpkg-deb gcc mkfs.ext4 qemu-img sha256sum flock wget mount umount awk; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "required tool '$tool' not found (Debian 12 packages: debootstrap, coreutils, apt, dpkg, gcc, e2fsprogs, qemu-utils, util-linux, wget, gawk|mawk)"
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && ! ldd "$BUSYBOX" >/dev/null 2>&1 || die "$BUSYBOX missing or dynamic: install busybox-static"
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || die "no /usr/share/keyrings/debian-archive-keyring.gpg (package debian-archive-keyring)"
for f in mpi-hello.c vt-ssh openmpi-mca-params.conf; do [ -r "$HERE/$f" ] || die "missing $HERE/$f"; done

MIRROR=$(debian_mirror || true)
[ -n "$MIRROR" ] || die "no apt source for Debian $SUITE on this host (set VTORQUE_DEBIAN_MIRROR)"

# ---- the tiny guest first: its kernel and initrd boot this root filesystem too --------------------------
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
"$HERE/../build.sh" "$OUT/.tiny" | sed "s|^|$ME: |" || die "the tiny guest's build (tests/guest/build.sh) failed"

# ---- inputs and stamp -------------------------------------------------------------------------------------
VERSIONS=$(apt-cache policy "${KEYPKGS[@]}" 2>/dev/null |
           awk '/^[^ ]/ {p = $1} /Candidate:/ {printf "%s%s ", p, $2}')
case "$VERSIONS" in *"(none)"*|"") die "apt-cache knows no candidate for some of ${KEYPKGS[*]} (run apt-get update): $VERSIONS" ;; esac
OMPIVER=$(apt-cache policy libopenmpi-dev | awk '/Candidate:/ {print $2}')
STAMP=$( { sha256sum "$HERE/build.sh" "$HERE/../cache.sh" "$HERE/../debootstrap.sh" "$HERE/mpi-hello.c" "$HERE/vt-ssh" \
                     "$HERE/openmpi-mca-params.conf" "$HERE/../vtorque-init" | awk '{print $1}'
           cat "$OUT/.tiny/.stamp"; echo "$SUITE ${PKGS[*]} $VERSIONS"; } | sha256sum | awk '{print $1}')
FILES=(vmlinux initrd.img rootfs.qcow2)
exit_if_cached_else_lock "${VERSIONS% }"

remove_stale_builds

require_mirror

step "building Debian $SUITE MPI guest in $OUT (${VERSIONS% })"
begin_build

# ---- 1. debootstrap minbase, then Open MPI and dropbear with apt from the host's sources ------------------
# The .debs are kept in OUTDIR/.debs between builds (a rebuild after a script change downloads nothing new).
DEBS=$OUT/.debs
mkdir -p "$DEBS"
step "debootstrap --variant=minbase $SUITE (log: $WORK/debootstrap.log)"
if ! debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        --cache-dir="$DEBS" "$SUITE" "$ROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1; then
    tail -n 15 "$WORK/debootstrap.log" >&2
    die "debootstrap failed (see above)"
fi
step "apt-get install ${PKGS[*]}"
use_host_apt_sources
mount --bind "$DEBS" "$ROOT/var/cache/apt/archives" && MOUNTS+=("$ROOT/var/cache/apt/archives")
in_root apt-get -q update > "$WORK/apt.log" 2>&1 || { tail -n 15 "$WORK/apt.log" >&2; die "apt-get update in the image failed"; }
in_root apt-get -q -y --no-install-recommends -o Dpkg::Options::=--force-confold install "${PKGS[@]}" \
    >> "$WORK/apt.log" 2>&1 || { tail -n 25 "$WORK/apt.log" >&2; die "apt-get install in the image failed"; }
in_root apt-get -q -y --no-install-recommends dist-upgrade >> "$WORK/apt.log" 2>&1 ||
    { tail -n 15 "$WORK/apt.log" >&2; die "apt-get dist-upgrade in the image failed"; }
OMPI=$(in_root dpkg-query -W -f '${Version}' libopenmpi3)
step "installed $(in_root dpkg-query -W -f '.\n' | wc -l) packages; Open MPI $OMPI"

# ---- 2. the test program: mpicc's own compile line, on the host, against the image's libmpi ---------------
# libopenmpi-dev would pull gfortran and every -dev of Open MPI's dependencies into the image; mpi.h from its
# .deb (same version as the image's libopenmpi3, never installed) and the host's gcc (same Debian 12 glibc)
# make the same binary.
step "compiling mpi-hello.c against Open MPI $OMPI"
DEV=$WORK/ompi-dev
(cd "$DEBS" && [ -n "$(ls libopenmpi-dev_"${OMPI//:/%3a}"_*.deb 2>/dev/null)" ] ||
    apt-get -q -o APT::Sandbox::User=root download "libopenmpi-dev=$OMPI" > /dev/null) ||
    die "apt-get download libopenmpi-dev=$OMPI failed"
dpkg-deb -x "$(ls "$DEBS"/libopenmpi-dev_"${OMPI//:/%3a}"_*.deb | head -n 1)" "$DEV"
LIBDIR=$ROOT/usr/lib/x86_64-linux-gnu
INC=$DEV/usr/lib/x86_64-linux-gnu/openmpi/include
[ -f "$INC/mpi.h" ] || die "no mpi.h in libopenmpi-dev $OMPI"
LIBMPI=$(ls "$LIBDIR"/libmpi.so.40 2>/dev/null || true)
[ -n "$LIBMPI" ] || die "no libmpi.so.40 in the image (libopenmpi3 $OMPI)"
gcc -O2 -Wall -I"$INC" -o "$ROOT/usr/local/bin/vt-mpi-hello" "$HERE/mpi-hello.c" "$LIBMPI" \
    -Wl,-rpath-link,"$LIBDIR" -Wl,-rpath-link,"$LIBDIR/openmpi/lib" || die "gcc mpi-hello.c failed"
install -m 644 "$HERE/mpi-hello.c" "$ROOT/usr/local/share/vt-mpi-hello.c"
in_root ldd /usr/local/bin/vt-mpi-hello | grep -q 'not found' && die "vt-mpi-hello has unresolved libraries in the image"

# ---- 3. the tiny guest's boot contract in this root ------------------------------------------------------
step "configuring the image"
# vtorque-init runs under Debian's dash here and uses ip, and a few other applets minbase has no program for:
# busybox supplies exactly those (never shadowing a Debian program).
install -m 755 "$BUSYBOX" "$ROOT/usr/local/bin/busybox"
added=0
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] && continue
    [ -e "$ROOT/usr/bin/$a" ] || [ -e "$ROOT/usr/sbin/$a" ] || [ -e "$ROOT/usr/local/bin/$a" ] && continue
    ln -s /usr/local/bin/busybox "$ROOT/usr/bin/$a"
    added=$((added + 1))
done
# PID 1 runs under busybox's sh, as in the tiny guest: its applets run inside the shell, where each of Debian's
# dynamically linked programs would cost an ld.so start under TCG (measured: READY about 1.5 s later under dash).
# The script itself is the tiny guest's, unchanged but for the interpreter line.
{ echo '#!/usr/local/bin/busybox sh'; tail -n +2 "$HERE/../vtorque-init"; } > "$ROOT/usr/sbin/vtorque-init"
chmod 755 "$ROOT/usr/sbin/vtorque-init"     # /sbin -> usr/sbin (merged /usr)
head -n 1 "$HERE/../vtorque-init" | grep -qx '#!/bin/sh' || die "../vtorque-init no longer starts with #!/bin/sh"
install -m 755 "$HERE/vt-ssh" "$ROOT/usr/local/bin/vt-ssh"
install -m 644 "$HERE/openmpi-mca-params.conf" "$ROOT/etc/openmpi/openmpi-mca-params.conf"
mkdir -p "$ROOT/etc/dropbear"
rm -f "$ROOT"/etc/dropbear/dropbear_*_host_key
printf 'vtorque-mpi\n' > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n' > "$ROOT/etc/hosts"
: > "$ROOT/etc/resolv.conf"
printf 'vtorque MPI guest: Debian %s, Open MPI %s, dropbear %s, kernel of the tiny guest (%s), built %s\n' \
    "$(cat "$ROOT/etc/debian_version")" "$OMPI" "$(in_root dpkg-query -W -f '${Version}' dropbear-bin)" \
    "$(awk '{print $2, $3}' "$OUT/.tiny/.kernel-pkg" 2>/dev/null)" \
    "$(date -u +%FT%TZ)" > "$ROOT/etc/vtorque-guest-release"
step "busybox applets added: $added"

# ---- 4. trim, unmount, make the disk ------------------------------------------------------------------------
step "trimming (apt lists, docs, man pages, locales)"
rm -f "$ROOT/usr/sbin/policy-rc.d"
for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[$i]}"; done
MOUNTS=()
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/* \
       "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/locale/* \
       "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/tmp/* "$ROOT"/var/cache/debconf/*-old "$ROOT/debootstrap"
USED=$(du -sm "$ROOT" | awk '{print $1}')
[ "$USED" -lt $((DISK_MIB * 3 / 4)) ] || die "image content ${USED} MiB does not fit a ${DISK_MIB} MiB disk with room"
step "mkfs.ext4 -d (${USED} MiB of files on a ${DISK_MIB} MiB disk), qemu-img convert to qcow2"
truncate -s "${DISK_MIB}M" "$WORK/rootfs.raw"
mkfs.ext4 -q -F -L vtorque-mpi -E root_owner=0:0 -d "$ROOT" "$WORK/rootfs.raw" || die "mkfs.ext4 -d failed"
rm -rf "$ROOT"
qemu-img convert -q -f raw -O qcow2 "$WORK/rootfs.raw" "$WORK/rootfs.qcow2"
rm -f "$WORK/rootfs.raw"
cp "$OUT/.tiny/vmlinux" "$OUT/.tiny/initrd.img" "$WORK/"

# ---- 5. publish: stamp removed first, written last ---------------------------------------------------------
(cd "$WORK" && sha256sum "${FILES[@]}" > SHA256SUMS)
chmod 644 "$WORK"/{rootfs.qcow2,vmlinux,initrd.img,SHA256SUMS}
rm -f "$OUT/.stamp"
for f in "${FILES[@]}" SHA256SUMS; do mv -f "$WORK/$f" "$OUT/$f"; done
echo "$STAMP" > "$WORK/stamp"
mv -f "$WORK/stamp" "$OUT/.stamp"
step "done: $(cd "$OUT" && du -h --apparent-size "${FILES[@]}" | awk '{printf "%s %s  ", $2, $1}')"
