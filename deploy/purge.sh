#!/bin/bash
# purge.sh - undo everything `make demo`/`make test` put on this machine, so that the next run starts as on a
# fresh Debian 12: the stack stopped, vtorque's guests destroyed, the Debian packages install-deps.sh installed
# purged (RabbitMQ only with --rabbitmq: on some machines it is the machine's own service), the venv, the test
# guests, the caches, the state, the configuration and the logs removed.
#   deploy/purge.sh [--rabbitmq]
set -uo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "purge: must run as root" >&2; exit 1; }
keep_rabbit=1; [ "${1:-}" = --rabbitmq ] && keep_rabbit=0

deploy/single-host/services.sh stop 2>/dev/null || true
if command -v virsh >/dev/null && timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; then
  for d in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep -E '^vt-|^vtorque' || true); do
    virsh -c qemu:///system destroy "$d" >/dev/null 2>&1; virsh -c qemu:///system undefine "$d" --nvram >/dev/null 2>&1
    echo "purge: removed guest $d"
  done
fi
VTORQUE_STACK_DIR=/var/lib/vtorque-stack deploy/single-host/stack.sh stop 2>/dev/null || true
pkill -x libvirtd 2>/dev/null; pkill -x virtlogd 2>/dev/null; pkill -x slurmctld 2>/dev/null; pkill -x slurmd 2>/dev/null
pkill -x munged 2>/dev/null
# the node worker's job networks (services/node_worker/job_segment.py): bridges and VXLAN devices of jobs, and
# the iptables chain that guards them
for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^vt[jx][0-9a-f]{6}$' || true); do
  ip link del "$l" 2>/dev/null && echo "purge: removed job network interface $l"
done
if command -v iptables >/dev/null && iptables -w 5 -L VTORQUE-JOBNET -n >/dev/null 2>&1; then
  iptables -w 5 -S INPUT | grep -- '-j VTORQUE-JOBNET' | sed 's/^-A //' | while read -r rule; do
    # shellcheck disable=SC2086 - the rule's own words, as iptables -S printed them
    iptables -w 5 -D $rule
  done
  iptables -w 5 -F VTORQUE-JOBNET && iptables -w 5 -X VTORQUE-JOBNET && echo "purge: removed iptables chain VTORQUE-JOBNET"
fi
# the packages install-deps.sh installed (it records them; those the machine had before stay)
RECORD=/var/lib/vtorque-install-deps.installed
mapfile -t pkgs < <(sort -u "$RECORD" 2>/dev/null)
[ $keep_rabbit = 1 ] && pkgs=("${pkgs[@]/rabbitmq-server}")
installed=()
for p in "${pkgs[@]}"; do
  [ -n "$p" ] && [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] && installed+=("$p")
done
if [ ${#installed[@]} -gt 0 ]; then
  echo "purge: apt-get purge ${installed[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "${installed[@]}" >/var/log/vtorque-purge.log 2>&1 ||
    { echo "purge: apt-get purge failed, see /var/log/vtorque-purge.log" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get autoremove --purge -y -q >>/var/log/vtorque-purge.log 2>&1 || true
fi
rm -f "$RECORD"
# What the stack made in RabbitMQ (it stays installed): vtorque's vhosts and users, its TLS listener and certs.
if command -v rabbitmqctl >/dev/null && timeout 20 rabbitmqctl -q ping >/dev/null 2>&1; then
  for v in $(rabbitmqctl -q list_vhosts 2>/dev/null | grep -E '^vtorque'); do rabbitmqctl -q delete_vhost "$v" >/dev/null 2>&1; done
  for u in $(rabbitmqctl -q list_users 2>/dev/null | awk '{print $1}' | grep -E '^(vtorque-|vt[0-9a-f]{6}-)'); do
    rabbitmqctl -q delete_user "$u" >/dev/null 2>&1
  done
fi
if [ -f /etc/rabbitmq/rabbitmq.conf ] && grep -qE '^(listeners\.ssl|ssl_options\.)' /etc/rabbitmq/rabbitmq.conf; then
  sed -i -E '/^(listeners\.ssl|ssl_options\.)/d' /etc/rabbitmq/rabbitmq.conf
  rm -rf /etc/rabbitmq/tls
  if timeout 20 rabbitmqctl -q ping >/dev/null 2>&1; then   # drop the TLS listener: restart as it was started
    timeout 90 rabbitmqctl shutdown >/dev/null 2>&1; rabbitmq-server -detached >/dev/null 2>&1
    for _ in $(seq 1 60); do timeout 5 rabbitmqctl -q ping >/dev/null 2>&1 && break; sleep 1; done
  fi
fi
# ramdisk guests' own tmpfs mounts (services/node_worker/disks.py), before their directories go
awk '$2 ~ "^/dev/shm/vtorque" {print $2}' /proc/mounts | sort -r | while read -r mnt; do
  umount --lazy "$mnt" && echo "purge: unmounted $mnt"
done
rm -rf /opt/vtorque /var/cache/vtorque /var/lib/vtorque /var/lib/vtorque-stack /etc/vtorque /var/log/vtorque \
       /run/vtorque /dev/shm/vtorque /dev/shm/vtorque-* /var/log/vtorque-install-deps.log /etc/libvirt /var/lib/libvirt /var/log/libvirt
rm -rf build ./*.egg-info
if [ "$keep_rabbit" = 1 ]; then echo "purge: done (kept: RabbitMQ)"; else echo "purge: done (kept: nothing)"; fi
