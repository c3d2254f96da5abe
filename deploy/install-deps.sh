#!/bin/bash
# install-deps.sh - install the Debian 12 packages a single-host vtorque installation needs.
#
# Idempotent and fast when there is nothing to do: the package states are checked with one
# dpkg-query call first; apt-get update + install run only when something is missing.
# Must run as root.  No systemd needed (libvirt-daemon-system-sysv keeps systemd out).
set -uo pipefail

PKGS=(
  rabbitmq-server
  libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients
  qemu-system-x86 qemu-utils python3-libvirt python3-venv
  busybox-static cpio
  munge slurmctld slurmd slurm-client slurm-wlm-torque
  dropbear-bin genisoimage openssh-client e2fsprogs
  debootstrap wget lz4  # tests/guest/cloud/build.sh: the Debian cloud test guest
  # compose.yaml under podman (deploy/compose/): runc (crun fails on this host's cgroups), netavark +
  # aardvark-dns (service names on the compose network); the pinned podman-compose's venv uses Debian's
  # python3-yaml and python3-dotenv; build-image.sh uses debootstrap (above)
  podman runc netavark aardvark-dns python3-yaml python3-dotenv
  openssl  # stack.sh: the single-host CA and the broker's TLS certificate
  iproute2  # ss: stack.sh checks that RabbitMQ, epmd and Erlang distribution listen on loopback only; ip, bridge: the job networks
  iptables  # the node worker drops VXLAN packets a user could send (services/node_worker/job_segment.py)
)
LOCK_TIMEOUT=900
APT_OPTS=(-o "DPkg::Lock::Timeout=$LOCK_TIMEOUT" -o "Acquire::Retries=3")
LOG=${INSTALL_DEPS_LOG:-/var/log/vtorque-install-deps.log}
INSTALLED_RECORD=/var/lib/vtorque-install-deps.installed

die() { echo "install-deps: ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
dur() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }

[ "$(id -u)" = 0 ] || die "must run as root (try: sudo $0)"

# --- 1. what is missing? (single dpkg-query, no apt) ----------------------------------------
missing=()
declare -A ok=()
while read -r name status; do
  [ "$status" = installed ] && ok[$name]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PKGS[@]}" 2>/dev/null)
for p in "${PKGS[@]}"; do [ -n "${ok[$p]:-}" ] || missing+=("$p"); done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages already installed, nothing to do"
  exit 0
fi
echo "install-deps: missing ${#missing[@]} package(s): ${missing[*]}"
echo "install-deps: apt output goes to $LOG"
: >>"$LOG" 2>/dev/null || LOG=/dev/null

# --- 2. apt-get update (DPkg::Lock::Timeout does not cover the lists lock: retry) -----------
t=$(now)
deadline=$(( $(date +%s) + LOCK_TIMEOUT ))
while :; do
  out=$(apt-get "${APT_OPTS[@]}" update 2>&1); rc=$?
  printf '%s\n' "$out" >>"$LOG"
  [ $rc = 0 ] && break
  if printf '%s' "$out" | grep -qiE 'could not get lock|unable to lock'; then
    [ "$(date +%s)" -lt "$deadline" ] || die "apt-get update: lists lock still held after ${LOCK_TIMEOUT}s (see $LOG)"
    echo "install-deps: apt lists locked by another apt run, retrying in 3s"
    sleep 3; continue
  fi
  die "apt-get update failed (rc=$rc): $(printf '%s' "$out" | grep -E '^(E|W):' | head -1) (see $LOG)"
done
echo "install-deps: apt-get update done in $(dur "$t")"

# --- 3. install ------------------------------------------------------------------------------
# All of PKGS (not only the missing ones) so apt can resolve them together; installed ones are no-ops.
t=$(now)
if ! DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y --no-install-recommends \
      "${PKGS[@]}" >>"$LOG" 2>&1; then
  die "apt-get install failed: $(grep -E '^E:' "$LOG" | tail -1) (see $LOG)"
fi
echo "install-deps: installed ${missing[*]} in $(dur "$t")"
# What this script added to the machine (not what it found there): deploy/purge.sh removes exactly these.
printf '%s\n' "${missing[@]}" >>"$INSTALLED_RECORD"

# --- 4. verify -------------------------------------------------------------------------------
still=()
for p in "${PKGS[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || still+=("$p")
done
[ ${#still[@]} -eq 0 ] || die "still not installed after apt-get: ${still[*]} (see $LOG)"
echo "install-deps: all ${#PKGS[@]} packages installed"
