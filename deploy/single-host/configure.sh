#!/bin/sh
# Configure vtorque on this one machine: site config, hook entry points, state directories.
# Usage: configure.sh GUEST_DIR   (GUEST_DIR holds the test guest built by tests/guest/build.sh)
# Env: PREFIX (/opt/vtorque), VTORQUE_STACK_DIR (/var/lib/vtorque-stack), ETC (/etc/vtorque)
set -eu
GUEST_DIR=${1:?usage: configure.sh GUEST_DIR}
PREFIX=${PREFIX:-/opt/vtorque}
ETC=${ETC:-/etc/vtorque}
STATE=${STATE:-/var/lib/vtorque}
STACK=${VTORQUE_STACK_DIR:-/var/lib/vtorque-stack}
HERE=$(cd "$(dirname "$0")/../.." && pwd)

[ "$(id -u)" = 0 ] || { echo "configure: must run as root" >&2; exit 1; }
for f in vmlinux initrd.img rootfs.qcow2 SHA256SUMS; do
  [ -r "$GUEST_DIR/$f" ] || { echo "configure: $GUEST_DIR/$f missing: build the test guest first" >&2; exit 1; }
done
digest=$(awk '$2 ~ /rootfs.qcow2$/ {print $1}' "$GUEST_DIR/SHA256SUMS")

install -d -m 755 "$ETC" "$STATE" "$STATE/images" "$STATE/jobs" "$STATE/hooks"
install -d -m 711 "$STATE/guests"
install -d -m 1777 "$STATE/traces"
install -d -m 755 "$PREFIX/hooks/torque" "$PREFIX/hooks/slurm" /var/log/vtorque

# Broker users: one per service, per node and for the hooks, made by deploy/single-host/broker.sh (`vtorque
# broker setup`) once RabbitMQ runs; their secrets live in $ETC/broker/, root-only (the hooks' file: group
# slurm); each part reads its own ([broker] credentials_dir).
rm -f "$ETC/broker.credentials"  # the old shared guest account

# Where stack.sh puts Slurm (fixed paths under the stack dir): known before Slurm starts, because the hooks
# must be in place before slurmctld starts (it checks PrologSlurmctld only then).
slurm_conf=$STACK/slurm/etc/slurm.conf
slurm_state=$STACK/slurm/state

cat > "$ETC/vtorque.toml.tmp" <<TOML
# vtorque site configuration (single-host demo/test installation, written by deploy/single-host/configure.sh)
state_dir = "$STATE"

[broker]
# vtorque's own vhost: RabbitMQ's guest (which any local account can use) has no rights in it
url = "amqps://127.0.0.1:5671/vtorque"
ca_file = "$ETC/tls/ca.pem"  # the stack's own CA (deploy/single-host/stack.sh)
credentials_dir = "$ETC/broker"  # one user per part: each reads its own <user>.credentials

[tracing]
dir = "$STATE/traces"

[images]
store = "$STATE/images"

[images.catalog.tiny]
source = "$GUEST_DIR/rootfs.qcow2"
sha256 = "$digest"
format = "qcow2"
kernel = "$GUEST_DIR/vmlinux"
initrd = "$GUEST_DIR/initrd.img"

[spec]
# vTorque's documented form names no image: vsub -l nodes=2,walltime=00:15:00 -vm vcpus=N job.sh
default_img = "tiny"
default_vcpus = 1
max_vcpus = $(nproc)
default_ram = "256M"
max_ram = "2G"
# One small machine: the host keeps nothing back, so a job may use every core for its VMs.
host_reserve_cores = 0
host_reserve_ram = "0M"
max_cores_per_node = $(nproc)
max_ram_per_node = "$(awk '/MemTotal/ {print int($2 / 1024) "M"}' /proc/meminfo)"
user_dirs = ["$STACK/jobs"]

[node]
guest_dir = "$STATE/guests"
# One test machine where root submits the demo and the tests' jobs; a real site keeps the default (false).
allow_system_owners = true

[scheduler]
kind = "slurm"
bin_dir = "/usr/bin"

[prefetch]
slurm_state_dir = "${slurm_state:-$STACK/slurm/state}"

[hooks]
prologue_timeout = 240
epilogue_timeout = 60
TOML
mv "$ETC/vtorque.toml.tmp" "$ETC/vtorque.toml"

cat > "$ETC/hooks.env" <<ENV
# Sourced by the hook entry points; a value already in the environment wins (tests use that).
: "\${VTORQUE_PYTHON:=$PREFIX/venv/bin/python}"
: "\${VTORQUE_SLURM_STATE:=${slurm_state:-$STACK/slurm/state}}"
# PrologSlurmctld gets no SLURM_CONF; scontrol/scancel in the hook need this stack's.
${slurm_conf:+: "\${SLURM_CONF:=$slurm_conf}"; export SLURM_CONF}
ENV

for h in prologue epilogue; do install -m 755 "$HERE/hooks/torque/$h" "$PREFIX/hooks/torque/$h"; done
for h in prolog_slurmctld epilog_slurmctld; do install -m 755 "$HERE/hooks/slurm/$h" "$PREFIX/hooks/slurm/$h"; done
echo "configure: $ETC/vtorque.toml (image tiny = ${digest%????????????????????????????????????????????????????}…), hooks in $PREFIX/hooks"
