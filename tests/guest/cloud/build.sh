#!/bin/bash
# Build a real Debian 12 cloud-style guest (cloud-init, openssh-server, systemd, netplan + networkd, Debian's
# cloud kernel) from Debian packages, into OUTDIR:
#   rootfs.qcow2  ext4 root filesystem on the whole disk (no partition table, no boot loader)
#   vmlinux       the cloud kernel as an uncompressed PVH ELF (or vmlinuz if it has no PVH note)
#   initrd.img    initramfs-tools' initrd, generated inside the image for its kernel
#   cmdline       the kernel command line a catalog entry should use
#   SHA256SUMS    sha256sum of rootfs.qcow2, the kernel and initrd.img
# Direct kernel boot (catalog entry kernel/initrd/cmdline), so no grub is needed. It stands in for a
# genericcloud image, which cannot be downloaded here: the seed vtorque writes meets the real cloud-init.
#
# Cached: if OUTDIR/.stamp matches the inputs (this script and the candidate versions of the key packages in
# the host's apt lists), exits 0 at once. Outputs are built in OUTDIR/.build.* and renamed into place.
#
# Usage: tests/guest/cloud/build.sh OUTDIR      (as root, Debian 12, with debootstrap)
# Env:   VTORQUE_DEBIAN_MIRROR=URL   the Debian mirror (default: the host's apt source for bookworm)
# Exit:  0 built or cached; 3 the Debian mirror cannot be reached (no network); 1 any other error; 2 usage.
set -euo pipefail

ME=cloud/build.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
START=$EPOCHREALTIME
SUITE=bookworm
# What a genericcloud image has that matters to vtorque; no recommends (debootstrap and apt alike).
PKGS=(systemd-sysv udev dbus cloud-init openssh-server netplan.io linux-image-cloud-amd64 initramfs-tools
      tzdata iproute2 iputils-ping procps)
KEYPKGS=(cloud-init openssh-server netplan.io linux-image-cloud-amd64 systemd initramfs-tools)
DISK_MIB=2048
CMDLINE="console=ttyS0 root=/dev/vda rw quiet panic=-1"

. "$HERE/../cache.sh"
. "$HERE/../debootstrap.sh"

[ $# -eq 1 ] || { echo "usage: $ME OUTDIR" >&2; exit 2; }
OUT=$1
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot, file ownership in the image)"
for tool in debootstrap chroot apt-cache mkfs.ext4 qemu-img sha256sum flock wget mount umount awk; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "required tool '$tool' not found (Debian 12 packages: debootstrap, coreutils, apt, e2fsprogs, qemu-utils, util-linux, wget, gawk|mawk)"
done
PY=/usr/bin/python3
[ -x "$PY" ] || die "required tool python3 not found (package python3)"
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || die "no /usr/share/keyrings/debian-archive-keyring.gpg (package debian-archive-keyring)"

MIRROR=$(debian_mirror || true)
[ -n "$MIRROR" ] || die "no apt source for Debian $SUITE on this host (set VTORQUE_DEBIAN_MIRROR)"

# ---- inputs and stamp -------------------------------------------------------------------------------------
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
VERSIONS=$(apt-cache policy "${KEYPKGS[@]}" 2>/dev/null |
           awk '/^[^ ]/ {p = $1} /Candidate:/ {printf "%s%s ", p, $2}')
case "$VERSIONS" in *"(none)"*|"") die "apt-cache knows no candidate for some of ${KEYPKGS[*]} (run apt-get update): $VERSIONS" ;; esac
STAMP=$( { sha256sum "$HERE/build.sh" "$HERE/vtorque-agent" "$HERE/../cache.sh" "$HERE/../debootstrap.sh" | awk '{print $1}'; echo "$SUITE ${PKGS[*]} $VERSIONS"; } |
         sha256sum | awk '{print $1}')
FILES=(rootfs.qcow2 vmlinux initrd.img cmdline)
exit_if_cached_else_lock "${VERSIONS% }"

remove_stale_builds

require_mirror

step "building Debian $SUITE cloud guest in $OUT (${VERSIONS% })"
begin_build

# ---- 1. debootstrap minbase (essential + apt) -------------------------------------------------------------
step "debootstrap --variant=minbase $SUITE (log: $WORK/debootstrap.log)"
if ! debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$ROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1; then
    tail -n 15 "$WORK/debootstrap.log" >&2
    grep -q . "$ROOT/debootstrap/debootstrap.log" 2>/dev/null && tail -n 15 "$ROOT/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (see above)"
fi

# ---- 2. the rest with apt, from the host's apt sources (so security and point updates come too) ------------
step "apt-get install ${PKGS[*]}"
use_host_apt_sources
mount -t sysfs sysfs "$ROOT/sys" && MOUNTS+=("$ROOT/sys")
# initramfs-tools: every storage/virtio driver (not just what the build host uses), gzip for any kernel.
mkdir -p "$ROOT/etc/initramfs-tools/conf.d"
printf 'MODULES=most\nCOMPRESS=gzip\n' > "$ROOT/etc/initramfs-tools/conf.d/vtorque.conf"
in_root apt-get -q update > "$WORK/apt.log" 2>&1 || { tail -n 15 "$WORK/apt.log" >&2; die "apt-get update in the image failed"; }
in_root apt-get -q -y --no-install-recommends -o Dpkg::Options::=--force-confold install "${PKGS[@]}" \
    >> "$WORK/apt.log" 2>&1 || { tail -n 25 "$WORK/apt.log" >&2; die "apt-get install in the image failed"; }
in_root apt-get -q -y --no-install-recommends dist-upgrade >> "$WORK/apt.log" 2>&1 ||
    { tail -n 15 "$WORK/apt.log" >&2; die "apt-get dist-upgrade in the image failed"; }
step "installed $(in_root dpkg-query -W -f '.\n' | wc -l) packages; cloud-init $(in_root dpkg-query -W -f '${Version}' cloud-init)"

# ---- 3. configure as a cloud image: first boot is cloud-init's ----------------------------------------------
step "configuring the image"
KVER=$(cd "$ROOT/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
[ -n "$KVER" ] && [ -f "$ROOT/boot/initrd.img-$KVER" ] || die "no kernel/initrd in the image's /boot"
printf 'localhost\n' > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' \
    > "$ROOT/etc/hosts"
printf 'LABEL=vtorque-cloud\t/\text4\trw,errors=remount-ro\t0\t1\n' > "$ROOT/etc/fstab"
# cloud-init's locale module regenerates a locale only when it differs from this one (no locales package).
printf 'LANG=C.UTF-8\n' > "$ROOT/etc/default/locale"
# Only NoCloud (the seed ISO, label cidata): no time lost probing cloud metadata services that are not there.
cat > "$ROOT/etc/cloud/cloud.cfg.d/90_vtorque.cfg" <<'EOF'
# vtorque: guests get a NoCloud seed ISO (label cidata); nothing else to probe.
datasource_list: [ NoCloud, None ]
EOF
: > "$ROOT/etc/resolv.conf"
# Per-instance identity is made on first boot: machine id by systemd, ssh host keys by cloud-init.
printf 'uninitialized\n' > "$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT"/etc/ssh/ssh_host_*
in_root systemctl enable systemd-networkd.service > /dev/null 2>&1 || die "systemctl enable systemd-networkd failed"
# A first boot would otherwise ask on the console for locale, keymap and root password.
in_root systemctl mask systemd-firstboot.service > /dev/null 2>&1 || die "systemctl mask systemd-firstboot failed"
# vtorque's agent on the host-only channel (warm start's identity, the clock after a resume): vtorque-agent.
install -m 0755 "$HERE/vtorque-agent" "$ROOT/usr/local/sbin/vtorque-agent"
cat > "$ROOT/etc/systemd/system/vtorque-agent.service" <<'EOF'
[Unit]
Description=vtorque agent: the host-only channel (warm start identity, clock after a resume)
After=local-fs.target systemd-udevd.service

[Service]
ExecStart=/usr/local/sbin/vtorque-agent
KillMode=process

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable vtorque-agent.service > /dev/null 2>&1 || die "systemctl enable vtorque-agent failed"
printf 'vtorque cloud guest: Debian %s, kernel %s, cloud-init %s, built %s\n' "$(cat "$ROOT/etc/debian_version")" \
    "$KVER" "$(in_root dpkg-query -W -f '${Version}' cloud-init)" "$(date -u +%FT%TZ)" > "$ROOT/etc/vtorque-guest-release"

# ---- 4. kernel and initrd out of the image (direct kernel boot) --------------------------------------------
step "kernel $KVER: extracting vmlinux (PVH ELF boots ~2x faster under TCG than the bzImage)"
if ! "$PY" - "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinux" <<'EOF'
# The bzImage's payload (boot protocol: setup_sects at 0x1f1, payload_offset/length at 0x248) is the
# compressed ELF vmlinux; Debian's cloud kernel uses LZ4, the generic one XZ.
import gzip, lzma, struct, subprocess, sys
data = open(sys.argv[1], "rb").read()
setup = (data[0x1F1] or 4) + 1
offset, length = struct.unpack_from("<II", data, 0x248)
payload = data[setup * 512 + offset:][:length]
if payload.startswith(b"\xfd7zXZ\x00"):
    elf = lzma.LZMADecompressor().decompress(payload)
elif payload.startswith(b"\x1f\x8b"):
    elf = gzip.decompress(payload)
else:
    tool = {b"\x02\x21\x4c\x18": "lz4", b"\x28\xb5\x2f\xfd": "zstd"}.get(payload[:4])
    if tool is None:
        sys.exit(f"vmlinuz: payload compression {payload[:4].hex()} not handled")
    try:
        # No check of the exit code: lz4 says 1 for the size the kernel build appends after the frames; the
        # ELF checks below decide.
        elf = subprocess.run([tool, "-dc"], input=payload, capture_output=True).stdout
    except OSError as exc:
        sys.exit(f"vmlinuz: {tool} -dc failed: {exc}")
if elf[:4] != b"\x7fELF" or b"Xen\x00" not in elf:  # PVH entry lives in an ELF note owned by "Xen"
    sys.exit("vmlinux: not an ELF image with a Xen/PVH note")
open(sys.argv[2], "wb").write(elf)
EOF
then
    step "no PVH vmlinux; using the bzImage"
    cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinux"
fi
cp "$ROOT/boot/initrd.img-$KVER" "$WORK/initrd.img"
echo "$CMDLINE" > "$WORK/cmdline"

# ---- 5. trim, unmount, make the disk ------------------------------------------------------------------------
step "trimming (apt caches and lists, docs, man pages, /boot)"
in_root apt-get clean
rm -f "$ROOT/usr/sbin/policy-rc.d"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* \
       "$ROOT"/usr/share/info/* "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/boot/* "$ROOT"/tmp/* \
       "$ROOT"/var/cache/debconf/*-old "$ROOT/debootstrap"
for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[$i]}"; done
MOUNTS=()
USED=$(du -sm "$ROOT" | awk '{print $1}')
[ "$USED" -lt $((DISK_MIB * 3 / 4)) ] || die "image content ${USED} MiB does not fit a ${DISK_MIB} MiB disk with room"
step "mkfs.ext4 -d (${USED} MiB of files on a ${DISK_MIB} MiB disk), qemu-img convert to qcow2"
truncate -s "${DISK_MIB}M" "$WORK/rootfs.raw"
mkfs.ext4 -q -F -L vtorque-cloud -d "$ROOT" "$WORK/rootfs.raw" || die "mkfs.ext4 -d failed"
rm -rf "$ROOT"
qemu-img convert -q -f raw -O qcow2 "$WORK/rootfs.raw" "$WORK/rootfs.qcow2"
rm -f "$WORK/rootfs.raw"

# ---- 6. publish: stamp removed first, written last ---------------------------------------------------------
(cd "$WORK" && sha256sum rootfs.qcow2 vmlinux initrd.img > SHA256SUMS)
chmod 644 "$WORK"/{rootfs.qcow2,vmlinux,initrd.img,cmdline,SHA256SUMS}
rm -f "$OUT/.stamp"
for f in "${FILES[@]}" SHA256SUMS; do mv -f "$WORK/$f" "$OUT/$f"; done
echo "$STAMP" > "$WORK/stamp"
mv -f "$WORK/stamp" "$OUT/.stamp"
step "done: $(cd "$OUT" && du -h --apparent-size "${FILES[@]:0:3}" | awk '{printf "%s %s  ", $2, $1}')"
