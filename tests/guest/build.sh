#!/bin/bash
# Build the vtorque test guest into OUTDIR:
#   vmlinux      uncompressed PVH ELF kernel from Debian's linux-image-6.1.*-amd64 .deb
#   initrd.img   gzip cpio: static busybox + virtio/ext4/isofs modules + /init
#   rootfs.qcow2 ext4 root filesystem (busybox, dropbear, /sbin/vtorque-init)
#   SHA256SUMS   sha256sum of the three files
# Cached: if OUTDIR/.stamp matches the inputs (this script, the init scripts,
# the kernel package and the busybox/dropbear versions), exits 0 at once.
#
# Usage: tests/guest/build.sh OUTDIR        (as root, Debian 12)
# Env:   VTORQUE_KERNEL_PKG=linux-image-6.1.0-NN-amd64  pin the kernel package
#        (default: what linux-image-amd64 depends on)
set -euo pipefail

ME=build.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
START=$EPOCHREALTIME

. "$HERE/cache.sh"

[ $# -eq 1 ] || { echo "usage: $ME OUTDIR" >&2; exit 2; }
OUT=$1

[ "$(id -u)" -eq 0 ] || die "must run as root (mknod, file ownership in the images)"
case "$(cat /etc/debian_version 2>/dev/null)" in
    12.*|bookworm*) ;;
    *) echo "$ME: warning: made for Debian 12 (bookworm); /etc/debian_version says '$(cat /etc/debian_version 2>/dev/null)'" >&2 ;;
esac
for tool in apt-get apt-cache dpkg-query dpkg-deb tar busybox cpio gzip mkfs.ext4 qemu-img \
            sha256sum ldd ldconfig flock find sort awk sed mknod; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found (Debian 12 packages: apt, dpkg, tar, busybox-static, cpio, gzip, e2fsprogs, qemu-utils, coreutils, libc-bin, util-linux, findutils, gawk|mawk, sed)"
done
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || true)
[ -n "$PY" ] || die "required tool 'python3' not found (package python3)"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "required file $BUSYBOX not found (package busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi
DROPBEAR=/usr/sbin/dropbear
[ -x "$DROPBEAR" ] || die "required file $DROPBEAR not found (package dropbear-bin)"
DROPBEARKEY=/usr/bin/dropbearkey
[ -x "$DROPBEARKEY" ] || die "required file $DROPBEARKEY not found (package dropbear-bin)"
for f in initrd-init vtorque-init; do
    [ -r "$HERE/$f" ] || die "missing $HERE/$f"
done

# ---- inputs and stamp --------------------------------------------------------
# Resolving the kernel through apt-cache costs ~1 s per call here (the binary
# pkgcache is disabled on Docker-style images), so the answer is memoised in
# OUTDIR/.kernel-pkg, keyed on the apt lists' names/mtimes/sizes.
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
KWANT=${VTORQUE_KERNEL_PKG:-linux-image-amd64}
LISTSIG=$( { echo "$KWANT"; stat -c '%n %Y %s' /var/lib/apt/lists/*_Packages* 2>/dev/null || true; } |
           sha256sum | awk '{print $1}')
KPKG= KPKGVER=
if [ -f "$OUT/.kernel-pkg" ]; then
    read -r sig kp kv < "$OUT/.kernel-pkg" || true
    if [ "$sig" = "$LISTSIG" ]; then KPKG=$kp KPKGVER=$kv; fi
fi
if [ -z "$KPKG" ] || [ -z "$KPKGVER" ]; then
    if [ -n "${VTORQUE_KERNEL_PKG:-}" ]; then
        KPKG=$VTORQUE_KERNEL_PKG
        KPKGVER=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null | awk '/^Version:/ {print $2; exit}') || true
    else
        # linux-image-amd64 "Depends: linux-image-6.1.0-NN-amd64 (= VERSION)"
        read -r KPKG KPKGVER < <(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
            awk '/^Depends:/ { for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-6\.1\..*-amd64,?$/) {
                    p = $i; sub(/,$/, "", p); v = "";
                    if ($(i+1) == "(=") { v = $(i+2); sub(/\).*$/, "", v) }
                    print p, v; exit } }') || true
        [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a linux-image-6.1.*-amd64 package (run apt-get update, or set VTORQUE_KERNEL_PKG)"
        if [ -z "$KPKGVER" ]; then
            KPKGVER=$(apt-cache show --no-all-versions "$KPKG" 2>/dev/null | awk '/^Version:/ {print $2; exit}') || true
        fi
    fi
    [ -n "$KPKGVER" ] || die "apt-cache knows no version of $KPKG (run apt-get update)"
    echo "$LISTSIG $KPKG $KPKGVER" > "$OUT/.kernel-pkg.tmp" && mv -f "$OUT/.kernel-pkg.tmp" "$OUT/.kernel-pkg"
fi
[[ "$KPKG" =~ ^linux-image-(6\.1\..*-amd64)$ ]] || die "kernel package '$KPKG' is not linux-image-6.1.*-amd64"
KVER=${BASH_REMATCH[1]}
BBVER=$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || echo unknown)
DBVER=$(dpkg-query -W -f '${Version}' dropbear-bin 2>/dev/null || echo unknown)

STAMP=$( {
    sha256sum "$HERE/build.sh" "$HERE/cache.sh" "$HERE/initrd-init" "$HERE/vtorque-init" | awk '{print $1}'
    echo "kernel=$KPKG=$KPKGVER busybox-static=$BBVER dropbear-bin=$DBVER"
} | sha256sum | awk '{print $1}')

FILES=(vmlinux initrd.img rootfs.qcow2)
exit_if_cached_else_lock "$KPKG $KPKGVER"

step "building test guest in $OUT ($KPKG $KPKGVER)"
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# ---- kernel package ----------------------------------------------------------
DEBDIR=$OUT/.debs
mkdir -p "$DEBDIR"
DEB=$DEBDIR/${KPKG}_${KPKGVER//:/%3a}_amd64.deb
if [ ! -s "$DEB" ]; then
    if [ -s "/var/cache/apt/archives/$(basename "$DEB")" ]; then
        step "using $(basename "$DEB") from /var/cache/apt/archives"
        cp "/var/cache/apt/archives/$(basename "$DEB")" "$DEB.part"
    else
        step "apt-get download $KPKG=$KPKGVER"
        (cd "$WORK" && apt-get -q -o APT::Sandbox::User=root download "$KPKG=$KPKGVER" >/dev/null) ||
            die "apt-get download $KPKG=$KPKGVER failed"
        mv "$WORK"/"${KPKG}"_*.deb "$DEB.part"
    fi
    mv "$DEB.part" "$DEB"
    # keep only the current kernel .deb
    find "$DEBDIR" -maxdepth 1 -name '*.deb' ! -name "$(basename "$DEB")" -delete
fi

step "extracting kernel and modules"
KX=$WORK/kernel
mkdir -p "$KX"
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$KX" --wildcards "./boot/vmlinuz-$KVER" "./lib/modules/$KVER/*"
MODROOT=$KX/lib/modules/$KVER
[ -f "$KX/boot/vmlinuz-$KVER" ] || die "no boot/vmlinuz-$KVER in $DEB"

step "extracting the uncompressed vmlinux (PVH ELF) from vmlinuz"
"$PY" - "$KX/boot/vmlinuz-$KVER" "$WORK/vmlinux" <<'EOF'
import lzma, sys
data = open(sys.argv[1], "rb").read()
off = data.find(b"\xfd7zXZ\x00")
if off < 0:
    sys.exit("vmlinuz: no XZ stream found")
elf = lzma.LZMADecompressor().decompress(data[off:])
if elf[:4] != b"\x7fELF":
    sys.exit("vmlinuz: XZ payload is not an ELF image")
if b"Xen\x00" not in elf:  # PVH entry lives in an ELF note owned by "Xen"
    sys.exit("vmlinux: no Xen/PVH ELF note found")
open(sys.argv[2], "wb").write(elf)
EOF

step "depmod (busybox) for $KVER -> modules.dep"
busybox depmod -b "$KX" "$KVER"
[ -s "$MODROOT/modules.dep" ] || die "depmod produced no modules.dep"

# ---- module load order from modules.dep ----------------------------------------
# Roots: virtio PCI transport, block, net, ext4 (+ its soft dependency crc32c),
# isofs for the seed, virtio_rng (used only if the host adds a virtio-rng device), virtio_console for a warm
# guest's identity channel (services/node_worker/warm.py). Dependencies are resolved recursively, deps first.
ROOT_MODS=(virtio_pci virtio_blk virtio_net virtio_rng virtio_console crc32c_generic ext4 isofs)
declare -A DEPS PATHOF SEEN
while IFS= read -r line; do
    mod=${line%%:*}
    rest=${line#*:}
    name=${mod##*/}
    name=${name%.ko}
    name=${name//-/_}
    PATHOF[$name]=$mod
    DEPS[$name]=$rest
done < "$MODROOT/modules.dep"
builtin_has() { grep -q "/$1\.ko\$" "$MODROOT/modules.builtin" 2>/dev/null; }
ORDER=()
visit() {
    local n=${1//-/_} d
    [ -z "${SEEN[$n]:-}" ] || return 0
    SEEN[$n]=1
    if [ -z "${PATHOF[$n]:-}" ]; then
        builtin_has "$n" && return 0
        die "module $n not found in modules.dep or modules.builtin"
    fi
    for d in ${DEPS[$n]}; do
        d=${d##*/}
        visit "${d%.ko}"
    done
    ORDER+=("$n")
}
for m in "${ROOT_MODS[@]}"; do visit "$m"; done
step "modules (load order): ${ORDER[*]}"

# ---- initrd --------------------------------------------------------------------
step "assembling initrd"
IR=$WORK/initrd
mkdir -p "$IR"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$BUSYBOX" "$IR/bin/busybox"
# Applet symlinks; never link the "busybox" applet onto itself (ELOOP on exec).
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -s busybox "$IR/bin/$a"
done
mknod -m 600 "$IR/dev/console" c 5 1
mknod -m 666 "$IR/dev/null" c 1 3
: > "$IR/lib/modules/load-order"
for n in "${ORDER[@]}"; do
    cp "$MODROOT/${PATHOF[$n]}" "$IR/lib/modules/$n.ko"
    echo "$n.ko" >> "$IR/lib/modules/load-order"
done
install -m 755 "$HERE/initrd-init" "$IR/init"
(cd "$IR" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9 -n > "$WORK/initrd.img"

# ---- root filesystem -----------------------------------------------------------
step "assembling root filesystem"
RF=$WORK/rootfs
mkdir -p "$RF"/{bin,dev,proc,sys,tmp,run,root,home,mnt,etc/dropbear,var/log,lib,lib64,usr}
ln -s bin "$RF/sbin"
ln -s ../bin "$RF/usr/bin"
ln -s ../bin "$RF/usr/sbin"
ln -s ../lib "$RF/usr/lib"
ln -s ../run "$RF/var/run"
chmod 700 "$RF/root"
chmod 1777 "$RF/tmp"
cp "$BUSYBOX" "$RF/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -s busybox "$RF/bin/$a"
done
# dropbear and dropbearkey (the host key made once the guest is ready, not at the job's first login) + the
# shared libraries ldd lists + the dynamic loader
cp "$DROPBEAR" "$RF/bin/dropbear"
cp "$DROPBEARKEY" "$RF/bin/dropbearkey"
ldd "$DROPBEAR" "$DROPBEARKEY" | awk '/=> \// {print $3} /^\t\/[^ ]+ \(/ {print $1}' | sort -u | while read -r lib; do
    mkdir -p "$RF$(dirname "$lib")"
    cp -L "$lib" "$RF$lib"
done
[ -e "$RF/lib64/ld-linux-x86-64.so.2" ] || die "dynamic loader not copied for dropbear"
ldconfig -r "$RF" 2>/dev/null || true
mknod -m 600 "$RF/dev/console" c 5 1
mknod -m 666 "$RF/dev/null" c 1 3
printf 'root:*:0:0:root:/root:/bin/sh\n' > "$RF/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nusers:x:100:\nnogroup:x:65534:\n' > "$RF/etc/group"
printf '/bin/sh\n' > "$RF/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$RF/etc/nsswitch.conf"
printf 'vtorque-guest\n' > "$RF/etc/hostname"
printf 'vtorque test guest, kernel %s (%s %s), built %s\n' "$KVER" "$KPKG" "$KPKGVER" "$(date -u +%FT%TZ)" \
    > "$RF/etc/vtorque-guest-release"
install -m 755 "$HERE/vtorque-init" "$RF/bin/vtorque-init"   # /sbin -> bin: this is /sbin/vtorque-init

step "mkfs.ext4 -d (128 MiB) and qemu-img convert to qcow2"
truncate -s 128M "$WORK/rootfs.raw"
mkfs.ext4 -q -F -L vtorque-root -E root_owner=0:0 -d "$RF" "$WORK/rootfs.raw" ||
    die "mkfs.ext4 -d failed"
qemu-img convert -q -f raw -O qcow2 "$WORK/rootfs.raw" "$WORK/rootfs.qcow2"
rm -f "$WORK/rootfs.raw"

# ---- publish -------------------------------------------------------------------
(cd "$WORK" && sha256sum "${FILES[@]}" > SHA256SUMS)
chmod 644 "$WORK/vmlinux" "$WORK/initrd.img" "$WORK/rootfs.qcow2" "$WORK/SHA256SUMS"
rm -f "$OUT/.stamp"
for f in "${FILES[@]}" SHA256SUMS; do
    mv -f "$WORK/$f" "$OUT/$f"
done
echo "$STAMP" > "$WORK/stamp"
mv -f "$WORK/stamp" "$OUT/.stamp"
step "done: $(cd "$OUT" && du -h "${FILES[@]}" | awk '{printf "%s %s  ", $2, $1}')"
