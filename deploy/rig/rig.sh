#!/bin/bash
# rig.sh - a cluster on one machine (docs/cluster-on-one-machine.md): rig hosts as network + mount + UTS
# namespaces joined by veth pairs to one cluster network, a bridge inside a namespace of the rig's own.
#
#   head  10.213.0.1   slurmctld, scheduler bridge, image stager, rabbit@head
#   c1    10.213.0.11  slurmd, virtlogd + libvirtd, node worker c1, rabbit@c1
#   c2    10.213.0.12  slurmd, virtlogd + libvirtd, node worker c2, rabbit@c2
#
# Usage (as root):  rig.sh up | down | status | exec HOST CMD... | broker-kill HOST | broker-start HOST
#   faults (tests/e2e/test_rig_faults.py): broker-stop HOST | kill HOST SERVICE [SIGNAL] | link-down HOST |
#   link-up HOST | libvirtd-stop HOST | libvirtd-start HOST | libvirtd-restart HOST
#
# Nothing of the machine's own is touched: no bridge, veth or address in the root network namespace, no
# process outside the rig's namespaces, no file outside $RIG_DIR and $RIG_NS (the daemons see their /run,
# /var/lib/<daemon>, /etc/<daemon>, /var/log through bind mounts that exist only in their host's mount
# namespace). The single-host stack (its RabbitMQ on 127.0.0.1:5672, its Slurm, its libvirtd) is left alone.
#
# Environment: RIG_DIR (/var/lib/vtorque-rig), RIG_COMPUTE (2: compute hosts c1..cN), RIG_NET (10.213.0),
#   PREFIX (/opt/vtorque: the venv the services run from), GUEST_DIR (/var/cache/vtorque/testguest),
#   RIG_PYTHONPATH (unset: the venv's vtorque; set: a directory holding another vtorque/ package, e.g. a release
#   to try, which every service, hook and job step of the rig then imports first).
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 022
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
RIG_DIR=${RIG_DIR:-/var/lib/vtorque-rig}
RIG_NS=/run/vtorque-rig            # persistent mount and UTS namespace files (a private bind mount)
RIG_NET=${RIG_NET:-10.213.0}
RIG_COMPUTE=${RIG_COMPUTE:-2}
PREFIX=${PREFIX:-/opt/vtorque}
GUEST_DIR=${GUEST_DIR:-/var/cache/vtorque/testguest}
NETNS_PREFIX=vtr-                  # every network namespace of the rig: vtr-net (the switch), vtr-<host>
SWITCH=${NETNS_PREFIX}net
VHOST=vtorque

# The rig's hosts have their own Slurm and vtorque config (bind-mounted /etc/slurm, /etc/vtorque): the caller's
# single-host stack environment (`. /var/lib/vtorque-stack/env`, as make test runs) must not reach them, or
# slurmctld reads the stack's slurm.conf ("This host (head/head) not a valid controller").
unset SLURM_CONF
for v in $(compgen -e); do case $v in VTORQUE_*) unset "$v" ;; esac; done
[ -n "${RIG_PYTHONPATH:-}" ] && export PYTHONPATH=$RIG_PYTHONPATH
COMPUTE=(); for i in $(seq 1 "$RIG_COMPUTE"); do COMPUTE+=("c$i"); done
HOSTS=(head "${COMPUTE[@]}")
addr_of() { case $1 in head) echo "$RIG_NET.1" ;; c*) echo "$RIG_NET.$((10 + ${1#c}))" ;; esac; }

# Keep no descriptor of the caller (a test's flock, make's pipes): the daemons started here would hold it.
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
done

T0=0
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }
say() { printf 'rig: %s\n' "$*"; }
die() { printf 'rig: FAILED: %s\n' "$*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

# on HOST CMD...: run CMD in HOST's network, mount and UTS namespaces (its own /run, /etc/hosts, hostname)
on() {
  local h=$1; shift
  nsenter --net=/run/netns/$NETNS_PREFIX$h --mount=$RIG_NS/$h.mnt --uts=$RIG_NS/$h.uts --wd="$PWD" -- "$@"
}
# bg HOST NAME CMD...: a daemon in HOST, detached (own session, no descriptor but its log), pid kept
bg() {
  local h=$1 name=$2; shift 2
  local log=$RIG_DIR/hosts/$h/log/rig-$name.log
  setsid nsenter --net=/run/netns/$NETNS_PREFIX$h --mount=$RIG_NS/$h.mnt --uts=$RIG_NS/$h.uts -- "$@" \
    >>"$log" 2>&1 </dev/null &
  echo $! >"$RIG_DIR/hosts/$h/$name.pid"
}
# wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s
wait_for() {
  local t=$1 what=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "$what: not ready after ${t}s"
    sleep 0.2
  done
}

# -- namespaces and the cluster network -----------------------------------------------------------------

rig_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NETNS_PREFIX" || true; }

make_network() {
  ip netns add "$SWITCH" || die "ip netns add $SWITCH"
  ip -n "$SWITCH" link set lo up
  ip -n "$SWITCH" link add br0 type bridge
  ip -n "$SWITCH" link set br0 type bridge mcast_snooping 0   # the job network's multicast floods (issue 12.3)
  ip -n "$SWITCH" link set br0 up
  local h
  for h in "${HOSTS[@]}"; do
    ip netns add "$NETNS_PREFIX$h" || die "ip netns add $NETNS_PREFIX$h"
    # Both ends are made inside rig namespaces: the veth never exists in the machine's own network namespace.
    ip -n "$SWITCH" link add "$h" type veth peer name eth0 netns "$NETNS_PREFIX$h" || die "veth for $h"
    ip -n "$SWITCH" link set "$h" master br0 up
    ip -n "$NETNS_PREFIX$h" link set lo up
    ip -n "$NETNS_PREFIX$h" addr add "$(addr_of "$h")/24" dev eth0
    ip -n "$NETNS_PREFIX$h" link set eth0 up
  done
}

# The rig host's own view of the file system: bind mounts made inside its mount namespace only.
host_dirs() {
  local h=$1 d=$RIG_DIR/hosts/$1
  mkdir -p "$d"/{run,log,etc,libvirt/etc,libvirt/lib,libvirt/cache,rabbitmq/etc,rabbitmq/lib,vtorque/etc,vtorque/lib,slurm,munge-lib}
  mkdir -p "$d"/log/{libvirt/qemu,rabbitmq,slurm,vtorque,munge}
  chmod 755 "$d"/run
  echo "$h" >"$d/etc/hostname"
  { echo "127.0.0.1 localhost"; for x in "${HOSTS[@]}"; do echo "$(addr_of "$x") $x"; done; } >"$d/etc/hosts"
  # libvirt: the machine's configuration, no autostarted network, and a host UUID of its own
  cp -a /etc/libvirt/. "$d/libvirt/etc/"
  rm -rf "$d/libvirt/etc/qemu/networks/autostart" "$d/libvirt/etc/qemu/autostart"
  find "$d/libvirt/etc/qemu" -maxdepth 1 -name '*.xml' -delete 2>/dev/null
  sed -i '/^host_uuid/d' "$d/libvirt/etc/libvirtd.conf"
  echo "host_uuid = \"$(cat /proc/sys/kernel/random/uuid)\"" >>"$d/libvirt/etc/libvirtd.conf"
  migration_tls "$h"
  # QEMU's capabilities, probed once on this machine (13.7 s per libvirtd otherwise): the same binaries
  [ -d /var/cache/libvirt/qemu ] && cp -a /var/cache/libvirt/. "$d/libvirt/cache/" 2>/dev/null
  chown rabbitmq:rabbitmq "$d"/rabbitmq/lib "$d"/log/rabbitmq
  chown munge:munge "$d"/munge-lib "$d"/log/munge
  mkdir -p "$d"/slurm/slurmctld "$d"/slurm/slurmd
  chown slurm:slurm "$d"/log/slurm "$d"/slurm/slurmctld
}

# Live migration between the hosts' libvirtds (services/node_worker/migrate.py): libvirtd listens for TLS only,
# on the host's cluster address (never TCP without TLS, never a host network address), and takes only clients
# whose certificate the rig's CA signed for a rig host; the migration stream itself (QEMU to QEMU, memory and
# the disks' NBD copy) is TLS too, with the same certificates. The CA's key never leaves $RIG_DIR/shared/pki
# (root's, 0700); each host's key is root's, 0600 (QEMU's copy root:libvirt-qemu 0440: QEMU speaks the TLS).
make_pki_ca() {
  local p=$RIG_DIR/shared/pki
  install -d -m 700 "$p"
  [ -s "$p/ca-key.pem" ] && [ -s "$p/ca-cert.pem" ] && return 0
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/O=vtorque-rig/CN=vtorque-rig CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$p/ca-key.pem" -out "$p/ca-cert.pem" >/dev/null 2>&1 || die "the rig's CA (openssl)"
}
migration_tls() {
  local h=$1 d=$RIG_DIR/hosts/$1 p=$RIG_DIR/shared/pki a
  a=$(addr_of "$h")
  make_pki_ca
  local k=$d/libvirt/etc/pki
  install -d -m 755 "$k" && install -d -m 700 "$k/private" && install -d -m 750 -g libvirt-qemu "$k/qemu"
  (umask 077; openssl req -newkey rsa:2048 -nodes -subj "/O=vtorque-rig/CN=$h" -keyout "$k/private/key.pem" \
    -out "$k/host.csr" >/dev/null 2>&1) || die "key of $h"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:$h,IP:$a" >"$k/ext.cnf"
  openssl x509 -req -in "$k/host.csr" -CA "$p/ca-cert.pem" -CAkey "$p/ca-key.pem" -CAcreateserial \
    -CAserial "$p/ca.srl" -days 3650 -extfile "$k/ext.cnf" -out "$k/cert.pem" >/dev/null 2>&1 || die "cert of $h"
  rm -f "$k/host.csr" "$k/ext.cnf"
  install -m 644 "$p/ca-cert.pem" "$k/cacert.pem"
  # the client side of peer-to-peer migration (qemu+tls://HOST/system?pkipath=/etc/libvirt/pki)
  ln -sf cert.pem "$k/clientcert.pem"; ln -sf private/key.pem "$k/clientkey.pem"
  # QEMU's own TLS directory (its x509 credentials object for the migration stream): libvirt-qemu reads it
  install -m 644 "$p/ca-cert.pem" "$k/qemu/ca-cert.pem"
  install -m 644 "$k/cert.pem" "$k/qemu/server-cert.pem"; install -m 644 "$k/cert.pem" "$k/qemu/client-cert.pem"
  install -m 440 -g libvirt-qemu "$k/private/key.pem" "$k/qemu/server-key.pem"
  install -m 440 -g libvirt-qemu "$k/private/key.pem" "$k/qemu/client-key.pem"
  sed -i '/^listen_tls\|^listen_tcp\|^listen_addr\|^auth_tls\|^key_file\|^cert_file\|^ca_file\|^tls_allowed_dn_list/d' \
    "$d/libvirt/etc/libvirtd.conf"
  cat >>"$d/libvirt/etc/libvirtd.conf" <<EOF
# deploy/rig/rig.sh: TLS only, on the cluster network, for the rig's hosts (live migration)
listen_tls = 1
listen_tcp = 0
listen_addr = "$a"
auth_tls = "none"
key_file = "/etc/libvirt/pki/private/key.pem"
cert_file = "/etc/libvirt/pki/cert.pem"
ca_file = "/etc/libvirt/pki/cacert.pem"
tls_allowed_dn_list = ["O=vtorque-rig,CN=c*"]
EOF
  sed -i '/^migrate_tls_x509\|^migration_host\|^migration_address\|^default_tls_x509/d' "$d/libvirt/etc/qemu.conf"
  cat >>"$d/libvirt/etc/qemu.conf" <<EOF
# deploy/rig/rig.sh: the migration stream on the cluster network, TLS with the host's certificate
migration_host = "$a"
migration_address = "$a"
migrate_tls_x509_cert_dir = "/etc/libvirt/pki/qemu"
migrate_tls_x509_verify = 1
EOF
}

make_host_ns() {
  local h=$1 d=$RIG_DIR/hosts/$1
  touch "$RIG_NS/$h.mnt" "$RIG_NS/$h.uts"
  unshare --mount="$RIG_NS/$h.mnt" --uts="$RIG_NS/$h.uts" --propagation private /bin/sh -e -c "
    hostname $h
    mount --bind $d/run /run
    mount --bind $d/log /var/log
    mount --bind $d/etc/hosts /etc/hosts
    mount --bind $d/etc/hostname /etc/hostname
    mkdir -p /etc/libvirt /var/lib/libvirt /var/cache/libvirt /etc/rabbitmq /var/lib/rabbitmq /etc/vtorque \
             /var/lib/vtorque /etc/slurm /var/lib/slurm /etc/munge /var/lib/munge
    mount --bind $d/libvirt/etc /etc/libvirt
    mount --bind $d/libvirt/lib /var/lib/libvirt
    mount --bind $d/libvirt/cache /var/cache/libvirt
    mount --bind $d/rabbitmq/etc /etc/rabbitmq
    mount --bind $d/rabbitmq/lib /var/lib/rabbitmq
    mount --bind $d/vtorque/etc /etc/vtorque
    mount --bind $d/vtorque/lib /var/lib/vtorque
    mount --bind $RIG_DIR/shared/slurm-etc /etc/slurm
    mount --bind $d/slurm /var/lib/slurm
    mount --bind $RIG_DIR/shared/munge-etc /etc/munge
    mount --bind $d/munge-lib /var/lib/munge
    mount --bind $RIG_DIR/shared/root-home /root
    mkdir -p /run/libvirt /run/munge /run/slurm /run/vtorque /run/rabbitmq
    chown munge:munge /run/munge; chown slurm:slurm /run/slurm; chown rabbitmq:rabbitmq /run/rabbitmq
  " || die "mount namespace of $h"
}

make_namespaces() {
  mkdir -p "$RIG_NS"
  if ! mountpoint -q "$RIG_NS"; then mount --bind "$RIG_NS" "$RIG_NS" || die "bind $RIG_NS"; fi
  mount --make-private "$RIG_NS" || die "make $RIG_NS private"
  make_network
  local h
  for h in "${HOSTS[@]}"; do host_dirs "$h"; make_host_ns "$h"; done
}

# -- shared secrets and configuration -------------------------------------------------------------------

write_shared() {
  local s=$RIG_DIR/shared
  mkdir -p "$s"/slurm-etc "$s"/munge-etc "$s"/images "$s"/hooks/slurm
  # root's home, the same on every rig host (as NFS homes are on a cluster): vsub on head keeps a job's key
  # there, the job's launcher on its first compute host reads it; and it is not the machine's own /root.
  install -d -m 700 "$s"/root-home
  chmod 755 "$s" "$s"/slurm-etc
  chown munge:munge "$s"/munge-etc; chmod 700 "$s"/munge-etc
  [ -s "$s/munge-etc/munge.key" ] || runuser -u munge -- mungekey --create --keyfile="$s/munge-etc/munge.key" --bits=1024 ||
    die "mungekey"
  [ -s "$s/erlang.cookie" ] || (umask 077; head -c 30 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$s/erlang.cookie")
  install -m 755 "$SRC/hooks/slurm/prolog_slurmctld" "$SRC/hooks/slurm/epilog_slurmctld" "$s/hooks/slurm/"
  local nodes="" c
  for c in "${COMPUTE[@]}"; do nodes="$nodes${nodes:+,}$c"; done
  {
    cat <<EOF
# generated by deploy/rig/rig.sh: one Slurm across the rig, slurmctld on head
ClusterName=vtorque-rig
SlurmctldHost=head($(addr_of head))
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
ReturnToService=2
PrologFlags=Alloc
PrologEpilogTimeout=300
PrologSlurmctld=$s/hooks/slurm/prolog_slurmctld
EpilogSlurmctld=$s/hooks/slurm/epilog_slurmctld
EOF
    for c in "${COMPUTE[@]}"; do echo "NodeName=$c NodeAddr=$(addr_of "$c") CPUs=$(nproc) RealMemory=4000 State=UNKNOWN"; done
    echo "PartitionName=batch Nodes=$nodes Default=YES MaxTime=INFINITE State=UP"
  } >"$s/slurm-etc/slurm.conf"
  chmod 644 "$s/slurm-etc/slurm.conf"
}

# [broker] hosts: the host's own broker node first (connections spread over the cluster), then the others.
broker_hosts() {
  local h=$1 x out="\"$(addr_of "$1"):5672\""
  for x in "${HOSTS[@]}"; do [ "$x" = "$h" ] || out="$out, \"$(addr_of "$x"):5672\""; done
  echo "[$out]"
}

write_vtorque_config() {
  local h=$1 d=$RIG_DIR/hosts/$1 digest
  digest=$(awk '$2 ~ /rootfs.qcow2$/ {print $1}' "$GUEST_DIR/SHA256SUMS")
  mkdir -p "$d/vtorque/lib"/{images,jobs,hooks,guests,traces}
  chmod 711 "$d/vtorque/lib/guests"; chmod 1777 "$d/vtorque/lib/traces"
  cat >"$d/vtorque/etc/vtorque.toml" <<EOF
# rig host $h (deploy/rig/rig.sh)
state_dir = "/var/lib/vtorque"

[broker]
url = "amqp://$(addr_of "$h"):5672/$VHOST"
hosts = $(broker_hosts "$h")
credentials_dir = "/etc/vtorque/broker"

[tracing]
dir = "/var/lib/vtorque/traces"

[images]
store = "$RIG_DIR/shared/images"   # the site's shared image store: every rig host sees it

[images.catalog.tiny]
source = "$GUEST_DIR/rootfs.qcow2"
sha256 = "$digest"
format = "qcow2"
kernel = "$GUEST_DIR/vmlinux"
initrd = "$GUEST_DIR/initrd.img"

[spec]
default_img = "tiny"
default_vcpus = 1
max_vcpus = $(nproc)
default_ram = "256M"
max_ram = "1G"
host_reserve_cores = 0
host_reserve_ram = "0M"
max_cores_per_node = $(nproc)
max_ram_per_node = "4000M"
user_dirs = ["$RIG_DIR/jobs"]

[node]
name = "$h"
libvirt_uri = "qemu:///system"
guest_dir = "/var/lib/vtorque/guests"
ramdisk_dir = "/dev/shm/vtorque-rig-$h/guests"
job_network_localaddr = "$(addr_of "$h")"
allow_system_owners = true
migration_uri = "qemu+tls://{node}/system?pkipath=/etc/libvirt/pki"
heartbeat_interval = 5.0

[scheduler]
kind = "slurm"
bin_dir = "/usr/bin"

[prefetch]
slurm_state_dir = "/var/lib/slurm/slurmctld"

[hooks]
prologue_timeout = 240
epilogue_timeout = 60
EOF
  cat >"$d/vtorque/etc/hooks.env" <<EOF
: "\${VTORQUE_PYTHON:=$PREFIX/venv/bin/python}"
: "\${VTORQUE_SLURM_STATE:=/var/lib/slurm/slurmctld}"
${RIG_PYTHONPATH:+export PYTHONPATH=$RIG_PYTHONPATH}
EOF
  chmod 644 "$d/vtorque/etc/vtorque.toml" "$d/vtorque/etc/hooks.env"
}

# -- daemons ---------------------------------------------------------------------------------------------

start_munge() {
  local h=$1
  bg "$h" munged runuser -u munge -- munged --foreground --force
}
munge_ok() { on "$1" sh -c 'munge -n | unmunge'; }

write_rabbit_config() {
  local h=$1 d=$RIG_DIR/hosts/$1 i=1 x
  {
    echo "listeners.tcp.default = 5672"
    echo "loopback_users = none"
    echo "cluster_formation.peer_discovery_backend = classic_config"
    for x in "${HOSTS[@]:0:3}"; do echo "cluster_formation.classic_config.nodes.$i = rabbit@$x"; i=$((i + 1)); done
    echo "log.file.level = info"
    # A host cut off the network (rig.sh link-down) is the minority: its node pauses rather than running on
    # as a second cluster that stays split after the link returns (RabbitMQ's default, ignore).
    echo "cluster_partition_handling = pause_minority"
  } >"$d/rabbitmq/etc/rabbitmq.conf"
  : >"$d/rabbitmq/etc/rabbitmq-env.conf"
  install -m 400 -o rabbitmq -g rabbitmq "$RIG_DIR/shared/erlang.cookie" "$d/rabbitmq/lib/.erlang.cookie"
}
start_rabbit() { bg "$1" rabbitmq rabbitmq-server; }
rabbit_ok() { on "$1" rabbitmqctl -q await_startup --timeout 2; }
rabbit_cluster_size() {
  on head rabbitmqctl -q cluster_status --formatter json 2>/dev/null |
    "$PREFIX/venv/bin/python" -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))' 2>/dev/null
}
cluster_full() { [ "$(rabbit_cluster_size)" = 3 ]; }

start_libvirt() {
  local h=$1
  bg "$h" virtlogd virtlogd
  bg "$h" libvirtd libvirtd --listen
}
libvirt_ok() { on "$1" virsh -c qemu:///system version; }

start_slurmctld() { bg head slurmctld slurmctld -D -c; }
start_slurmd() { bg "$1" slurmd slurmd -D; }
nodes_idle() {
  local st
  st=$(on head sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [ "$(grep -cE ' (idle|mixed|allocated)$' <<<"$st")" = "${#COMPUTE[@]}" ]
}

broker_users() {
  local nodes=() c d
  for c in "${COMPUTE[@]}"; do nodes+=(--node "$c"); done
  on head "$PREFIX/venv/bin/vtorque" broker setup --vhost "$VHOST" "${nodes[@]}" --credentials-dir /etc/vtorque/broker \
    --hook-group slurm --amqp "amqp://$(addr_of head):5672" --remove-guest >"$RIG_DIR/hosts/head/log/rig-broker-setup.log" 2>&1 ||
    die "vtorque broker setup (see $RIG_DIR/hosts/head/log/rig-broker-setup.log)"
  # A node's classic queue lives on one broker node: mirrored on every node, it outlives the loss of that one.
  on head rabbitmqctl -q set_policy -p "$VHOST" --apply-to queues vtorque-nodes-ha '^vtorque\.(node\..+|dead)$' \
    '{"ha-mode":"all","ha-sync-mode":"automatic"}' >/dev/null || die "rabbitmqctl set_policy"
  # each compute host gets its node worker's secret (and the operator's, for `vtorque nodes` there)
  for c in "${COMPUTE[@]}"; do
    d=$RIG_DIR/hosts/$c/vtorque/etc/broker
    install -d -m 755 "$d"
    install -m 600 "$RIG_DIR/hosts/head/vtorque/etc/broker/vtorque-node-$c.credentials" \
      "$RIG_DIR/hosts/head/vtorque/etc/broker/vtorque-operator.credentials" "$d/"
  done
}

# supervise HOST SERVICE: restart-on-failure as the systemd units do (Restart=on-failure, RestartSec=1)
start_service() {
  local h=$1 s=$2
  bg "$h" "vtorque-$s" "$HERE/supervise.sh" "$PREFIX/venv/bin/vtorque" run "$s"
}
service_ok() { grep -q consuming "$RIG_DIR/hosts/$1/log/rig-vtorque-$2.log" 2>/dev/null; }

# -- up / down / status ----------------------------------------------------------------------------------

preflight() {
  [ -x "$PREFIX/venv/bin/vtorque" ] || die "$PREFIX/venv/bin/vtorque missing: make venv first"
  [ -r "$GUEST_DIR/SHA256SUMS" ] || die "$GUEST_DIR: the test guest is missing: make guest first"
  local b
  for b in nsenter unshare ip rabbitmq-server libvirtd virtlogd slurmctld slurmd munged; do
    command -v "$b" >/dev/null || die "$b not installed (make deps)"
  done
  [ -z "$(rig_netns)" ] || die "a rig is already up ($(rig_netns | tr '\n' ' ')): rig.sh down first"
}

cmd_up() {
  need_root; preflight
  local t=$(now) t1 c h
  rm -rf "$RIG_DIR/hosts"
  mkdir -p "$RIG_DIR/jobs" && chmod 1777 "$RIG_DIR/jobs"
  write_shared
  make_namespaces
  say "namespaces: ${HOSTS[*]} on $RIG_NET.0/24, switch $SWITCH ($(since "$t"))"
  for h in "${HOSTS[@]}"; do write_vtorque_config "$h"; write_rabbit_config "$h"; start_munge "$h"; done
  # RabbitMQ: head first (a blank node that finds no peer forms a cluster alone), then the others join it
  t1=$(now)
  start_rabbit head
  for c in "${COMPUTE[@]}"; do start_libvirt "$c"; done
  wait_for 90 "rabbit@head" rabbit_ok head
  for h in "${HOSTS[@]:1:2}"; do start_rabbit "$h"; done
  for h in "${HOSTS[@]}"; do wait_for 10 "munge on $h" munge_ok "$h"; done
  start_slurmctld
  for c in "${COMPUTE[@]}"; do start_slurmd "$c"; done
  for c in "${COMPUTE[@]}"; do wait_for 90 "libvirtd on $c" libvirt_ok "$c"; done
  wait_for 120 "RabbitMQ cluster of 3" cluster_full
  say "rabbitmq: cluster of 3 ($(since "$t1"))"
  broker_users
  for c in "${COMPUTE[@]}"; do start_service "$c" node-worker; done
  start_service head bridge
  start_service head stager
  wait_for 60 "slurm nodes ${COMPUTE[*]} idle" nodes_idle
  for c in "${COMPUTE[@]}"; do wait_for 60 "node worker $c" service_ok "$c" node-worker; done
  wait_for 60 "bridge" service_ok head bridge
  wait_for 60 "stager" service_ok head stager
  say "up in $(since "$t"): head (slurmctld, bridge, stager, rabbit), ${COMPUTE[*]} (slurmd, libvirtd, node worker, rabbit)"
  say "try it: deploy/rig/rig.sh exec head vsub -l nodes=2 -vm img=tiny hello.sh (in $RIG_DIR/jobs)"
}

# every process whose network namespace is one of the rig's
rig_pids() {
  local ns inodes="" p
  for ns in $(rig_netns); do inodes="$inodes $(stat -L -c %i "/run/netns/$ns" 2>/dev/null)"; done
  [ -n "${inodes// /}" ] || return 0
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = $$ ] && continue
    local i; i=$(stat -L -c %i "/proc/$p/ns/net" 2>/dev/null) || continue
    case " $inodes " in *" $i "*) echo "$p" ;; esac
  done
}

cmd_down() {
  need_root
  local t=$(now) pids n=0 h d
  # Guests still running (a job cut short): destroyed through their own libvirtd, which then removes their
  # cgroups and files; then every process in the rig's namespaces, all at once.
  for h in "${COMPUTE[@]}"; do
    [ -e "/run/netns/$NETNS_PREFIX$h" ] && [ -e "$RIG_NS/$h.mnt" ] || continue
    for d in $(on "$h" timeout 10 virsh -q -c qemu:///system list --all --name 2>/dev/null); do
      on "$h" timeout 20 virsh -q -c qemu:///system destroy "$d" >/dev/null 2>&1
      on "$h" timeout 20 virsh -q -c qemu:///system undefine "$d" >/dev/null 2>&1
    done
  done
  local t_guests; t_guests=$(since "$t")
  pids=$(rig_pids)
  if [ -n "$pids" ]; then
    kill -TERM $pids 2>/dev/null
    for _ in $(seq 1 50); do pids=$(rig_pids); [ -z "$pids" ] && break; sleep 0.2; done
    [ -n "$pids" ] && { say "still running 10 s after SIGTERM, SIGKILL: $(ps -o pid=,comm= -p "$(echo $pids | tr ' ' ,)" | tr '\n' ' ')"; kill -KILL $pids 2>/dev/null; }
    for _ in $(seq 1 50); do pids=$(rig_pids); [ -z "$pids" ] && break; sleep 0.1; done
  fi
  [ -z "$(rig_pids)" ] || die "processes left in the rig: $(rig_pids | tr '\n' ' ')"
  for h in $(rig_netns); do ip netns del "$h" && n=$((n + 1)); done
  for f in "$RIG_NS"/*.mnt "$RIG_NS"/*.uts; do
    [ -e "$f" ] || continue
    umount "$f" 2>/dev/null; rm -f "$f"
  done
  if mountpoint -q "$RIG_NS"; then umount "$RIG_NS"; fi
  rmdir "$RIG_NS" 2>/dev/null
  rm -rf /dev/shm/vtorque-rig-*   # the hosts' logs stay in $RIG_DIR/hosts until the next up
  say "down in $(since "$t") (guests checked in $t_guests; $n network namespaces removed)"
}

cmd_status() {
  local rc=0 h c line
  [ -n "$(rig_netns)" ] || { say "down"; return 1; }
  check() { if "${@:3}" >/dev/null 2>&1; then printf '%-6s %-12s up\n' "$1" "$2"; else printf '%-6s %-12s DOWN\n' "$1" "$2"; rc=1; fi; }
  for h in "${HOSTS[@]}"; do check "$h" rabbitmq rabbit_ok "$h"; check "$h" munged munge_ok "$h"; done
  check head slurmctld on head scontrol ping
  check head bridge pid_alive head vtorque-bridge
  check head stager pid_alive head vtorque-stager
  for c in "${COMPUTE[@]}"; do
    check "$c" libvirtd libvirt_ok "$c"
    check "$c" slurmd pid_alive "$c" slurmd
    check "$c" node-worker pid_alive "$c" vtorque-node-worker
  done
  printf 'rabbitmq cluster: %s running nodes\n' "$(rabbit_cluster_size)"
  on head sinfo -N -o '%N %T' 2>/dev/null | sed 's/^/slurm: /'
  return $rc
}
pid_alive() { local p; p=$(cat "$RIG_DIR/hosts/$1/$2.pid" 2>/dev/null) && [ -n "$p" ] && [ "$(awk '{print $3}' /proc/$p/stat 2>/dev/null)" != Z ] && kill -0 "$p"; }

# pids of one rig host's processes named COMM (its network namespace tells them apart from anyone else's)
host_pids() {
  local h=$1 comm=$2 ino p
  ino=$(stat -L -c %i "/run/netns/$NETNS_PREFIX$h" 2>/dev/null) || return 0
  for p in $(pgrep -x "$comm"); do
    [ "$(stat -L -c %i "/proc/$p/ns/net" 2>/dev/null)" = "$ino" ] && echo "$p"
  done
}

# A broker node lost (kill -9 of its Erlang VM, as a crash or an OOM kill would), and brought back.
cmd_broker_kill() {
  local h=${1:?broker-kill HOST} pids
  pids=$(host_pids "$h" beam.smp)
  [ -n "$pids" ] || die "no broker node runs on $h"
  kill -KILL $pids
  say "rabbit@$h killed (pid $pids)"
}
cmd_broker_start() {
  local h=${1:?broker-start HOST} t=$(now)
  [ -z "$(host_pids "$h" beam.smp)" ] || die "rabbit@$h already runs"
  start_rabbit "$h"
  wait_for 90 "rabbit@$h" rabbit_ok "$h"
  wait_for 60 "RabbitMQ cluster of 3" cluster_full
  say "rabbit@$h back in the cluster ($(since "$t"))"
}

# A broker node stopped the way an operator stops it (`systemctl stop rabbitmq-server` runs `rabbitmqctl
# stop`): it closes its clients' connections first (connection.close 320 CONNECTION_FORCED), then its Erlang VM
# ends. broker-start brings it back.
cmd_broker_stop() {
  local h=${1:?broker-stop HOST} t=$(now) end
  [ -n "$(host_pids "$h" beam.smp)" ] || die "no broker node runs on $h"
  on "$h" rabbitmqctl -q stop >/dev/null 2>&1 || die "rabbitmqctl stop on $h"
  end=$(( $(date +%s) + 60 ))
  while [ -n "$(host_pids "$h" beam.smp)" ]; do
    [ "$(date +%s)" -lt "$end" ] || die "rabbit@$h still runs 60 s after rabbitmqctl stop"
    sleep 0.2
  done
  say "rabbit@$h stopped ($(since "$t"))"
}

# The process of one of a host's vtorque services (bridge, stager, node-worker): the child of its supervisor.
service_pid() {
  local sup
  sup=$(cat "$RIG_DIR/hosts/$1/vtorque-$2.pid" 2>/dev/null) || return 1
  pgrep -P "$sup" -f "vtorque run $2" | head -1
}
# kill HOST SERVICE [SIGNAL]: a vtorque service's process (its supervisor restarts it after 1 s), or any other
# daemon of that host by its command name (libvirtd, slurmd, ...), with SIGKILL unless told otherwise.
cmd_kill() {
  local h=${1:?kill HOST SERVICE [SIGNAL]} s=${2:?kill HOST SERVICE [SIGNAL]} sig=${3:-KILL} pids
  case $s in
    bridge|stager|node-worker) pids=$(service_pid "$h" "$s") ;;
    *) pids=$(host_pids "$h" "$s") ;;
  esac
  [ -n "$pids" ] || die "no $s runs on $h"
  kill -"$sig" $pids || die "kill -$sig $pids"
  say "$s on $h: SIG$sig sent (pid $(echo $pids))"
}

# service-restart HOST SERVICE: a vtorque service stopped (SIGTERM to it and its supervisor) and started again
# under a new supervisor, e.g. to run new code of the checkout (supervise.sh restarts only what failed).
cmd_service_restart() {
  local h=${1:?service-restart HOST SERVICE} s=${2:?service-restart HOST SERVICE} sup pid end
  case $s in bridge|stager|node-worker) ;; *) die "service-restart: $s is none of bridge, stager, node-worker" ;; esac
  sup=$(cat "$RIG_DIR/hosts/$h/vtorque-$s.pid" 2>/dev/null)
  pid=$(service_pid "$h" "$s")
  [ -n "$sup" ] && kill -TERM "$sup" 2>/dev/null
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null
  end=$(( $(date +%s) + 30 ))
  while { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || { [ -n "$sup" ] && kill -0 "$sup" 2>/dev/null; }; do
    [ "$(date +%s)" -lt "$end" ] || die "$s on $h still runs 30 s after SIGTERM"
    sleep 0.1
  done
  local log=$RIG_DIR/hosts/$h/log/rig-vtorque-$s.log n
  n=$(grep -c consuming "$log" 2>/dev/null)
  start_service "$h" "$s"
  wait_for 60 "$s on $h" sh -c "[ \$(grep -c consuming '$log') -gt ${n:-0} ]"
  say "$s on $h restarted"
}

# A host cut off the cluster network and put back: its port on the switch (the veth end inside vtr-net) goes
# down, as an unplugged cable or a dead switch port would; the host's own eth0 and addresses stay as they are.
cmd_link() {
  local h=${1:?link-down|link-up HOST} state=$2
  ip -n "$SWITCH" link show "$h" >/dev/null 2>&1 || die "no port $h on the switch"
  ip -n "$SWITCH" link set "$h" "$state" || die "ip link set $h $state"
  say "$h: switch port $state"
}

# libvirtd stopped (SIGTERM, as systemctl stop does; its guests' QEMU processes keep running) and started again.
cmd_libvirtd_stop() {
  local h=${1:?libvirtd-stop HOST} pids end
  pids=$(host_pids "$h" libvirtd)
  [ -n "$pids" ] || die "no libvirtd runs on $h"
  kill -TERM $pids
  end=$(( $(date +%s) + 30 ))
  while [ -n "$(host_pids "$h" libvirtd)" ]; do
    [ "$(date +%s)" -lt "$end" ] || die "libvirtd on $h still runs 30 s after SIGTERM"
    sleep 0.1
  done
  say "libvirtd on $h stopped"
}
cmd_libvirtd_start() {
  local h=${1:?libvirtd-start HOST} t=$(now)
  [ -z "$(host_pids "$h" libvirtd)" ] || die "libvirtd already runs on $h"
  bg "$h" libvirtd libvirtd --listen
  wait_for 60 "libvirtd on $h" libvirt_ok "$h"
  say "libvirtd on $h back ($(since "$t"))"
}

usage="up|down|status|exec HOST CMD...|service-restart HOST SERVICE|broker-kill HOST|broker-stop HOST|broker-start HOST|kill HOST SERVICE [SIGNAL]|link-down HOST|link-up HOST|libvirtd-stop HOST|libvirtd-start HOST|libvirtd-restart HOST"
case "${1:-}" in
  up) cmd_up ;;
  broker-kill) need_root; cmd_broker_kill "${2:-}" ;;
  broker-start) need_root; cmd_broker_start "${2:-}" ;;
  broker-stop) need_root; cmd_broker_stop "${2:-}" ;;
  kill) need_root; cmd_kill "${2:-}" "${3:-}" "${4:-}" ;;
  service-restart) need_root; cmd_service_restart "${2:-}" "${3:-}" ;;
  link-down) need_root; cmd_link "${2:-}" down ;;
  link-up) need_root; cmd_link "${2:-}" up ;;
  libvirtd-stop) need_root; cmd_libvirtd_stop "${2:-}" ;;
  libvirtd-start) need_root; cmd_libvirtd_start "${2:-}" ;;
  libvirtd-restart) need_root; cmd_libvirtd_stop "${2:-}" && cmd_libvirtd_start "${2:-}" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  exec) shift; h=${1:?exec HOST CMD...}; shift; on "$h" "$@" ;;
  *) echo "usage: $0 $usage" >&2; exit 2 ;;
esac
