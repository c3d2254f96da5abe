#!/bin/bash
# build-image.sh - the vtorque container image (compose.yaml's localhost/vtorque:dev) from Debian packages, for a
# host with podman and no reachable container registry: no `FROM`, no pull.
#
#   1. base:    debootstrap a Debian 12 rootfs and install deploy/compose/packages.txt into it (apt, as root);
#   2. vtorque: a venv (--system-site-packages, for Debian's python3-libvirt) with the locked requirements
#               (requirements.lock, when the checkout has one) and vtorque itself, a plain (not editable) install
#               of this checkout's shared/ services/ hooks/ cli/;
#   3. `podman import` the tree as $VTORQUE_IMAGE with vtorque's entrypoint.
#
# The stages are cached under $VTORQUE_COMPOSE_CACHE (/var/cache/vtorque/compose), keyed by their inputs: the base
# by the suite, mirror and package list; the venv of locked dependencies by the base and requirements.lock; the
# image by those, the source tree and this script. The image
# carries its key as a label, so a run with unchanged inputs only compares keys (≈1 s). `--force` rebuilds both.
#
# A site with Docker builds the same image from the Dockerfile instead (`docker compose build`).
#
# Usage: deploy/compose/build-image.sh [--force]     (root; needs debootstrap, podman; network: Debian + PyPI)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$REPO/deploy/compose
IMAGE=${VTORQUE_IMAGE:-localhost/vtorque:dev}
CACHE=${VTORQUE_COMPOSE_CACHE:-/var/cache/vtorque/compose}
SUITE=${VTORQUE_DEBIAN_SUITE:-bookworm}
MIRROR=${VTORQUE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
FORCE=0
[ "${1:-}" = --force ] && FORCE=1
# podman as compose runs it here: runc, cgroupfs, no systemd (deploy/compose/containers.conf).
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

die() { echo "build-image: ERROR: $*" >&2; exit 1; }
say() { echo "build-image: $*"; }
now() { date +%s.%N; }
dur() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, rootful podman)"
for tool in debootstrap podman chroot; do
  command -v "$tool" >/dev/null || die "$tool is missing (deploy/install-deps.sh installs it)"
done
PACKAGES=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$HERE/packages.txt" | tr -s ' \n' ' ')
LOCK=$REPO/requirements.lock
SOURCES=(pyproject.toml README.md shared services hooks cli)

sha() { sha256sum | cut -c1-16; }
BASE_KEY=$( { echo "base v1 $SUITE $MIRROR"; echo "$PACKAGES"; } | sha)
SRC_KEY=$(tar -C "$REPO" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
            --exclude=__pycache__ --exclude='*.pyc' -cf - "${SOURCES[@]}" | sha)
LOCK_KEY=$( { [ -f "$LOCK" ] && cat "$LOCK"; echo "image v1"; } | sha)
DEPS_KEY=$(echo "$BASE_KEY $LOCK_KEY" | sha)
SCRIPT_KEY=$(sha <"$0")
IMAGE_KEY=$(echo "$DEPS_KEY $SRC_KEY $SCRIPT_KEY" | sha)

if [ $FORCE = 0 ] && [ "$(podman image inspect --format '{{index .Labels "vtorque.image-key"}}' "$IMAGE" 2>/dev/null)" = "$IMAGE_KEY" ]; then
  say "$IMAGE is up to date (key $IMAGE_KEY)"
  exit 0
fi
mkdir -p "$CACHE"
# One build at a time (the test and an operator may both call this).
exec 9>"$CACHE/.lock"
flock 9

MOUNTED=()
cleanup() {
  local i
  for ((i=${#MOUNTED[@]}-1; i>=0; i--)); do umount -l "${MOUNTED[i]}" 2>/dev/null || true; done
  if [ -n "${WORK:-}" ]; then rm -rf "$WORK"; fi
  if [ -n "${PARTIAL:-}" ]; then rm -rf "$PARTIAL"; fi
  return 0
}
trap cleanup EXIT
mounts() {  # what apt's maintainer scripts and pip need inside the chroot
  local root=$1
  mount -t proc proc "$root/proc" && MOUNTED+=("$root/proc")
  mount --bind /dev "$root/dev" && MOUNTED+=("$root/dev")
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
}
unmounts() {
  local m
  for m in "${MOUNTED[@]}"; do umount -l "$m"; done
  MOUNTED=()
}

# --- 1. the base rootfs -----------------------------------------------------------------------------------
BASE=$CACHE/base-$BASE_KEY
if [ $FORCE = 1 ] || [ ! -f "$BASE/.vtorque-base-done" ]; then
  t=$(now)
  rm -rf "$BASE"
  PARTIAL=$BASE.partial
  rm -rf "$PARTIAL"
  say "debootstrap $SUITE (minbase) into $PARTIAL (a few minutes the first time; log: $CACHE/debootstrap.log)"
  debootstrap --variant=minbase "$SUITE" "$PARTIAL" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || die "debootstrap failed: $(tail -3 "$CACHE/debootstrap.log")"
  say "debootstrap done in $(dur "$t")"
  t=$(now)
  mounts "$PARTIAL"
  # No daemon may start inside the chroot (rabbitmq-server's postinst tries).
  printf '#!/bin/sh\nexit 101\n' >"$PARTIAL/usr/sbin/policy-rc.d"
  chmod 755 "$PARTIAL/usr/sbin/policy-rc.d"
  # shellcheck disable=SC2086 # PACKAGES is a word list
  chroot "$PARTIAL" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
      sh -c "apt-get -o Acquire::Retries=3 update && apt-get -o Acquire::Retries=3 install -y --no-install-recommends $PACKAGES" \
      >"$CACHE/apt.log" 2>&1 || die "apt-get install in the rootfs failed: $(grep -E '^E:' "$CACHE/apt.log" | tail -1) (see $CACHE/apt.log)"
  chroot "$PARTIAL" apt-get clean
  rm -rf "$PARTIAL"/var/lib/apt/lists/* "$PARTIAL/usr/sbin/policy-rc.d"
  unmounts
  : >"$PARTIAL/etc/resolv.conf"
  touch "$PARTIAL/.vtorque-base-done"
  mv "$PARTIAL" "$BASE"
  PARTIAL=
  say "packages installed in $(dur "$t"): $PACKAGES"
  # Older bases are no longer used by anything.
  for old in "$CACHE"/base-*; do
    [ "$old" = "$BASE" ] || rm -rf "$old"
  done
else
  say "base rootfs cached: $BASE"
fi

# --- 2. the locked dependencies: a venv in a copy of the base (cached by base + lock) -----------------------
DEPS=$CACHE/deps-$DEPS_KEY
chroot_pip_setup() {  # $1: the tree
  # The host's CA bundle: where PyPI is reached through a TLS-inspecting proxy, its CA is in there, not in the
  # rootfs's fresh ca-certificates. Only for the build; not left in the image.
  mkdir -p "$1/src"
  cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$1/src/host-ca.crt"
  mounts "$1"
}
chroot_pip_done() {  # $1: the tree
  unmounts
  rm -rf "$1/src" "$1/root/.cache"
  : >"$1/etc/resolv.conf"
}
PIPENV=(env -i PATH=/opt/vtorque/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PIP_DISABLE_PIP_VERSION_CHECK=1
        PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120 PIP_CERT=/src/host-ca.crt)
if [ $FORCE = 1 ] || [ ! -f "$DEPS/.vtorque-deps-done" ]; then
  t=$(now)
  rm -rf "$DEPS"
  PARTIAL=$DEPS.partial
  rm -rf "$PARTIAL"
  cp -a "$BASE" "$PARTIAL"
  rm -f "$PARTIAL/.vtorque-base-done"
  chroot_pip_setup "$PARTIAL"
  [ -f "$LOCK" ] && cp "$LOCK" "$PARTIAL/src/requirements.lock"
  {
    chroot "$PARTIAL" python3 -m venv --system-site-packages /opt/vtorque/venv
    # As the Makefile does: the locked set exactly, by hash (it holds the build backend too).
    if [ -f "$LOCK" ]; then
      chroot "$PARTIAL" "${PIPENV[@]}" pip install --require-hashes -r /src/requirements.lock
    fi
  } >"$CACHE/pip.log" 2>&1 || die "installing requirements.lock into the image failed: $(grep -E '^ERROR' "$CACHE/pip.log" | tail -1) (see $CACHE/pip.log)"
  chroot_pip_done "$PARTIAL"
  touch "$PARTIAL/.vtorque-deps-done"
  mv "$PARTIAL" "$DEPS"
  PARTIAL=
  say "dependencies installed in $(dur "$t")$([ -f "$LOCK" ] && echo " from requirements.lock" || echo " (no requirements.lock: pip resolves them with vtorque)")"
  for old in "$CACHE"/deps-*; do
    [ "$old" = "$DEPS" ] || rm -rf "$old"
  done
else
  say "dependencies cached: $DEPS"
fi

# --- 3. vtorque itself (this checkout, not editable) into a copy of that ------------------------------------
t=$(now)
WORK=$CACHE/image.$$
cp -a "$DEPS" "$WORK"
rm -f "$WORK/.vtorque-deps-done"
chroot_pip_setup "$WORK"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - "${SOURCES[@]}" | tar -C "$WORK/src" -xf -
{
  if [ -f "$LOCK" ]; then
    # With the locked build backend and nothing else picked by pip.
    chroot "$WORK" "${PIPENV[@]}" pip install --no-deps --no-build-isolation /src
  else
    chroot "$WORK" "${PIPENV[@]}" pip install /src
  fi
  chroot "$WORK" "${PIPENV[@]}" vtorque --help >/dev/null
} >"$CACHE/pip-vtorque.log" 2>&1 || die "installing vtorque into the image failed: $(tail -3 "$CACHE/pip-vtorque.log") (see $CACHE/pip-vtorque.log)"
chroot_pip_done "$WORK"
say "vtorque installed in $(dur "$t")"

# --- 4. import ----------------------------------------------------------------------------------------------
t=$(now)
tar -C "$WORK" --numeric-owner -cf - . | podman import \
    --change 'ENV PATH=/opt/vtorque/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENTRYPOINT ["vtorque"]' \
    --change 'CMD ["run", "bridge"]' \
    --change "LABEL vtorque.image-key=$IMAGE_KEY" \
    --change "LABEL vtorque.base-key=$BASE_KEY" \
    --message "vtorque from $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') + working tree" \
    --quiet - "$IMAGE" >/dev/null
say "imported $IMAGE (key $IMAGE_KEY, $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')) in $(dur "$t")"
# The previous build's image, now untagged, is only garbage.
podman image prune -f >/dev/null 2>&1 || true
