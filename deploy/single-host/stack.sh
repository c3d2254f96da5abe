#!/bin/bash
# stack.sh - infrastructure of a one-machine vtorque installation (demo + tests):
#   RabbitMQ, libvirt (virtlogd + libvirtd), a private munge + single-node Slurm, the jobs directory.
# It does NOT start the vtorque services themselves.
#
# Usage (as root):  stack.sh start | stop | status
#
# Environment:
#   VTORQUE_STACK_DIR       state/config/log directory          (default /var/lib/vtorque-stack)
#   VTORQUE_HOOK_DIR        if set: PrologSlurmctld=$VTORQUE_HOOK_DIR/slurm/prolog_slurmctld,
#                                   EpilogSlurmctld=$VTORQUE_HOOK_DIR/slurm/epilog_slurmctld
#                           if unset: no PrologSlurmctld/EpilogSlurmctld are configured
#   VTORQUE_PROLOG_TIMEOUT  PrologEpilogTimeout in seconds      (default 300)
#   VTORQUE_AMQP_HOST/PORT  where RabbitMQ is expected           (default 127.0.0.1 / 5672)
#
# No systemd, no edits under /etc.  After 'start':  . $VTORQUE_STACK_DIR/env
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 022
# The daemons this starts (RabbitMQ, libvirtd, munge, Slurm) must keep nothing of whoever ran it: a lock the
# caller holds (make, a test's flock) would otherwise stay held by the broker for as long as it runs.
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
done

STACK_DIR=${VTORQUE_STACK_DIR:-/var/lib/vtorque-stack}
S=$STACK_DIR/slurm                 # munge + slurm (layout as in slurm-single-host.md §10)
STATE=$STACK_DIR/state             # what this script started (*.started / *.pid)
LOGD=$STACK_DIR/log                # output of the daemons this script launches
JOBS=$STACK_DIR/jobs               # job output for demo + tests, mode 1777
ENVF=$STACK_DIR/env
AMQP_HOST=${VTORQUE_AMQP_HOST:-127.0.0.1}
AMQP_PORT=${VTORQUE_AMQP_PORT:-5672}
CTLD_PORT=16817
SLURMD_PORT=16818
PROLOG_TIMEOUT=${VTORQUE_PROLOG_TIMEOUT:-300}
HOOK_DIR=${VTORQUE_HOOK_DIR:-}
PLUGDIR=/usr/lib/x86_64-linux-gnu/slurm-wlm
H=$(hostname -s)
export SLURM_CONF=$S/etc/slurm.conf
MUNGE_SOCK=$S/munge-run/munge.socket
RABBIT_LOGS=${RABBITMQ_LOG_BASE:-/var/log/rabbitmq}
LIBVIRTD_LOG=/var/log/libvirt/libvirtd.log

# ---------------------------------------------------------------------------------------------
T0=0
now() { date +%s.%N; }
begin() { T0=$(now); }
took() { awk -v a="$T0" -v b="$(now)" 'BEGIN{printf "%.2fs", b-a}'; }
ok() { printf 'stack: %-10s %s (%s)\n' "$1" "$2" "$(took)"; }
# fail COMPONENT MESSAGE LOGFILE
fail() { printf 'stack: FAILED %s: %s (after %s) - see %s\n' "$1" "$2" "$(took)" "$3" >&2; exit 1; }
die() { echo "stack: $*" >&2; exit 1; }

# pid_ok PIDFILE COMM: pidfile names a live process whose comm is COMM
pid_ok() {
  local p
  [ -s "$1" ] || return 1
  p=$(tr -dc 0-9 <"$1")
  [ -n "$p" ] && [ "$(cat /proc/"$p"/comm 2>/dev/null)" = "$2" ]
}
pid_of() { tr -dc 0-9 <"$1"; }

# stop_pids PID... : SIGTERM, wait up to 10 s, then SIGKILL
stop_pids() {
  local pids="$*" pid any
  [ -n "${pids// /}" ] || return 0
  kill -TERM $pids 2>/dev/null
  for _ in $(seq 1 100); do
    any=0; for pid in $pids; do kill -0 "$pid" 2>/dev/null && any=1; done
    [ $any = 0 ] && return 0
    sleep 0.1
  done
  for pid in $pids; do
    kill -0 "$pid" 2>/dev/null && { echo "stack: pid $pid did not stop after 10s, SIGKILL" >&2; kill -KILL "$pid"; }
  done
  return 0
}

# AMQP check: TCP connect, send the 0-9-1 protocol header, expect a connection.start method frame.
amqp_ok() {
  timeout 5 python3 - "$AMQP_HOST" "$AMQP_PORT" <<'PY' >/dev/null 2>&1
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.sendall(b"AMQP\x00\x00\x09\x01")
buf = b""
while len(buf) < 11:
    d = s.recv(64)
    if not d:
        sys.exit(1)
    buf += d
ftype, chan, size, cls, meth = struct.unpack(">BHIHH", buf[:11])
sys.exit(0 if (ftype, chan, cls, meth) == (1, 0, 10, 10) else 1)
PY
}
rabbit_log() { ls -t "$RABBIT_LOGS"/*.log 2>/dev/null | grep -v _upgrade | head -1 || echo "$RABBIT_LOGS/"; }

virsh_ok() { timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; }
# a root libvirtd/virtlogd (not a per-user session daemon)
root_daemon_pid() { pgrep -u 0 -x "$1" | head -1; }

munge_ok() { munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }
node_state() { timeout 5 sinfo -h -N -n "$H" -o %T 2>/dev/null | head -1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }
# fd 9 holds the lock; every daemon is launched with 9>&- so it does not inherit (and keep) the lock
lock() {
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.lock"
  flock -w 120 9 || die "another stack.sh holds $STACK_DIR/.lock"
}

# ---------------------------------------------------------------------------------------------
rabbit_start() {
  begin
  rabbit_loopback_config
  rabbit_tls_config
  local exposed
  exposed=$(rabbit_exposed)
  if [ -z "$exposed" ] && amqp_ok && ! rabbit_tls_ok; then exposed="no TLS listener on 127.0.0.1:$TLS_PORT"; fi
  if [ -n "$exposed" ]; then
    # e.g. started by the Debian package's postinst before these settings existed: restart it on them
    echo "stack: rabbitmq runs without this stack's settings ($(echo $exposed)); restarting it" >&2
    timeout 90 rabbitmqctl shutdown >"$LOGD/rabbitmq-stop.log" 2>&1 || true
    epmd -kill >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do [ -z "$(rabbit_exposed)" ] && break; sleep 0.2; done
  fi
  if amqp_ok && rabbit_tls_ok; then ok rabbitmq "already answering on $AMQP_HOST:$AMQP_PORT and AMQPS $TLS_PORT, loopback only"; return; fi
  local how="was starting"
  # a node that is booting (e.g. started by the machine a moment ago) answers an Erlang ping before AMQP
  if ! timeout 20 rabbitmqctl -q ping >/dev/null 2>&1; then
    pgrep -x epmd >/dev/null || touch "$STATE/epmd.started"
    # root -> the Debian wrapper switches to the rabbitmq user
    if ! rabbitmq-server -detached >"$LOGD/rabbitmq-start.log" 2>&1 9>&-; then
      fail rabbitmq "rabbitmq-server -detached failed" "$LOGD/rabbitmq-start.log and $(rabbit_log)"
    fi
    touch "$STATE/rabbitmq.started"
    how="started"
  fi
  for _ in $(seq 1 120); do
    amqp_ok && rabbit_tls_ok && { ok rabbitmq "$how, AMQP on $AMQP_HOST:$AMQP_PORT, AMQPS on 127.0.0.1:$TLS_PORT, loopback only"; return; }
    sleep 0.5
  done
  fail rabbitmq "no AMQP answer on $AMQP_HOST:$AMQP_PORT within 60s" "$(rabbit_log) ($RABBIT_LOGS/startup_err)"
}

# The single-host stack's broker listens on loopback only: AMQP, Erlang distribution and epmd (Debian's
# defaults listen on every interface). Keys already set by the machine's own configuration are kept.
RABBIT_ENV=/etc/rabbitmq/rabbitmq-env.conf
RABBIT_CONF=/etc/rabbitmq/rabbitmq.conf
rabbit_loopback_config() {
  mkdir -p /etc/rabbitmq
  touch "$RABBIT_ENV" "$RABBIT_CONF"
  grep -qE '^listeners\.tcp' "$RABBIT_CONF" || echo "listeners.tcp.local = 127.0.0.1:$AMQP_PORT" >>"$RABBIT_CONF"
  grep -qE '^(export )?ERL_EPMD_ADDRESS=' "$RABBIT_ENV" || echo "ERL_EPMD_ADDRESS=127.0.0.1" >>"$RABBIT_ENV"
  grep -q 'inet_dist_use_interface' "$RABBIT_ENV" ||
    echo 'SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"' >>"$RABBIT_ENV"
}
# TLS to the broker (amqps on 127.0.0.1:5671): a CA of this stack's own signs the broker's certificate (names
# 127.0.0.1, localhost and this host); clients verify it with $TLS_CA. Made once, kept across starts.
TLS_PORT=${VTORQUE_AMQPS_PORT:-5671}
TLS_DIR=/etc/rabbitmq/tls
TLS_CA=/etc/vtorque/tls/ca.pem
rabbit_tls_config() {
  local h tmp; h=$(hostname -s)
  if [ ! -s "$TLS_DIR/server.pem" ] || [ ! -s "$TLS_CA" ]; then
    mkdir -p "$TLS_DIR" /etc/vtorque/tls
    tmp=$(mktemp -d)
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vtorque single-host CA" \
      -keyout "$tmp/ca.key" -out "$tmp/ca.pem" >"$LOGD/tls.log" 2>&1 || fail tls "openssl: CA" "$LOGD/tls.log"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$h" -keyout "$tmp/server.key" -out "$tmp/server.csr" \
      >>"$LOGD/tls.log" 2>&1 || fail tls "openssl: server key" "$LOGD/tls.log"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:%s\nextendedKeyUsage=serverAuth\n' "$h" >"$tmp/ext"
    openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial -days 3650 \
      -extfile "$tmp/ext" -out "$tmp/server.pem" >>"$LOGD/tls.log" 2>&1 || fail tls "openssl: sign" "$LOGD/tls.log"
    install -m 644 "$tmp/ca.pem" "$TLS_DIR/ca.pem"
    install -m 644 "$tmp/server.pem" "$TLS_DIR/server.pem"
    install -m 600 -o rabbitmq -g rabbitmq "$tmp/server.key" "$TLS_DIR/server.key"
    install -m 644 "$tmp/ca.pem" "$TLS_CA"
    rm -rf "$tmp"   # the CA's key is not kept: nothing else is ever signed by it
  fi
  if ! grep -qE '^listeners\.ssl' "$RABBIT_CONF"; then
    printf '%s\n' "listeners.ssl.default = 127.0.0.1:$TLS_PORT" "ssl_options.cacertfile = $TLS_DIR/ca.pem" \
      "ssl_options.certfile = $TLS_DIR/server.pem" "ssl_options.keyfile = $TLS_DIR/server.key" \
      "ssl_options.verify = verify_none" "ssl_options.fail_if_no_peer_cert = false" >>"$RABBIT_CONF"
  fi
}
rabbit_tls_ok() {
  timeout 5 openssl s_client -connect "127.0.0.1:$TLS_PORT" -CAfile "$TLS_CA" -verify_return_error </dev/null >/dev/null 2>&1
}

# listeners of RabbitMQ (AMQP 5672, distribution 25672) and epmd (4369) on an address other than loopback
rabbit_exposed() {
  ss -Hltn 2>/dev/null | awk '{print $4}' | grep -E ':(5671|5672|25672|4369)$' | grep -vE '^(127\.[0-9.]+|\[::1\]):' || true
}

rabbit_stop() {
  begin
  if [ ! -e "$STATE/rabbitmq.started" ]; then ok rabbitmq "not started by stack.sh, left running"; return; fi
  if ! timeout 90 rabbitmqctl shutdown >"$LOGD/rabbitmq-stop.log" 2>&1; then
    # maybe it is already gone
    amqp_ok && fail rabbitmq "rabbitmqctl shutdown failed" "$LOGD/rabbitmq-stop.log and $(rabbit_log)"
  fi
  rm -f "$STATE/rabbitmq.started"
  if [ -e "$STATE/epmd.started" ]; then epmd -kill >/dev/null 2>&1; rm -f "$STATE/epmd.started"; fi
  ok rabbitmq "stopped (it had been started by stack.sh)"
}

# ---------------------------------------------------------------------------------------------
libvirt_start() {
  begin
  local kvm="" how_log how_lv
  # no udev here: /dev/kvm is root:root 0600, which makes libvirt re-probe QEMU on every domain start (~57 s)
  if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm || fail libvirt "cannot fix /dev/kvm permissions" "ls -l /dev/kvm"
    kvm=", /dev/kvm root:kvm 0660"
  fi
  # virtlogd
  if [ -n "$(root_daemon_pid virtlogd)" ]; then
    how_log="virtlogd running"
  else
    if virtlogd -d >>"$LOGD/virtlogd.log" 2>&1 9>&-; then
      for _ in $(seq 1 50); do pid_ok /run/virtlogd.pid virtlogd && break; sleep 0.1; done
      pid_ok /run/virtlogd.pid virtlogd || fail libvirt "virtlogd -d returned but /run/virtlogd.pid is not a live virtlogd" "$LOGD/virtlogd.log"
      pid_of /run/virtlogd.pid >"$STATE/virtlogd.pid"
      how_log="virtlogd started"
    elif [ -n "$(root_daemon_pid virtlogd)" ]; then
      how_log="virtlogd started concurrently by someone else"
    else
      fail libvirt "virtlogd -d did not start" "$LOGD/virtlogd.log"
    fi
  fi
  # libvirtd (someone else may start it concurrently: then its pidfile lock makes ours exit; use theirs)
  if [ -n "$(root_daemon_pid libvirtd)" ]; then
    how_lv="libvirtd running"
  else
    if libvirtd -d >>"$LOGD/libvirtd.log" 2>&1 9>&-; then
      # libvirtd -d returns only after the daemon initialised (or failed); it wrote /run/libvirtd.pid
      for _ in $(seq 1 50); do pid_ok /run/libvirtd.pid libvirtd && break; sleep 0.1; done
      pid_ok /run/libvirtd.pid libvirtd || fail libvirt "libvirtd -d returned but /run/libvirtd.pid is not a live libvirtd" "$LIBVIRTD_LOG"
      pid_of /run/libvirtd.pid >"$STATE/libvirtd.pid"
      how_lv="libvirtd started"
    elif [ -n "$(root_daemon_pid libvirtd)" ]; then
      how_lv="libvirtd started concurrently by someone else"      # ours lost the pidfile lock: use theirs
    else
      fail libvirt "libvirtd -d did not start" "$LOGD/libvirtd.log and $LIBVIRTD_LOG"
    fi
  fi
  # first start probes QEMU capabilities: ~14 s
  local deadline=$(( $(date +%s) + 90 ))
  until virsh_ok; do
    [ "$(date +%s)" -lt "$deadline" ] || fail libvirt "virsh -c qemu:///system version does not answer after 90s" "$LIBVIRTD_LOG"
    [ -n "$(root_daemon_pid libvirtd)" ] || fail libvirt "libvirtd exited" "$LIBVIRTD_LOG and $LOGD/libvirtd.log"
    sleep 0.5
  done
  ok libvirt "$how_log, $how_lv, qemu:///system answers$kvm"
}

libvirt_stop() {
  begin
  local what="" f comm
  for f in libvirtd virtlogd; do
    if [ -e "$STATE/$f.pid" ]; then
      if pid_ok "$STATE/$f.pid" "$f"; then stop_pids "$(pid_of "$STATE/$f.pid")"; what="$what $f stopped;"; fi
      rm -f "$STATE/$f.pid"
    else
      what="$what $f not started by stack.sh;"
    fi
  done
  what=${what# }; ok libvirt "${what%;}"
}

# ---------------------------------------------------------------------------------------------
real_memory() {
  local kb mb
  kb=$(awk '/^MemTotal:/{print $2}' /proc/meminfo)
  mb=$(( kb / 1024 * 9 / 10 ))          # leave 10 %: slurmd drains the node if RealMemory > what it sees
  [ "$mb" -gt 16000 ] && mb=16000
  [ "$mb" -lt 256 ] && mb=256
  echo "$mb"
}

write_slurm_files() {
  mkdir -p "$S"/{etc,state,spool,run,log,munge,munge-run}
  chown slurm:slurm "$S"/state "$S"/run "$S"/log
  chown munge:munge "$S"/munge "$S"/munge-run
  chmod 700 "$S"/munge; chmod 755 "$S"/munge-run "$S"/etc
  if [ ! -s "$S/munge/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$S/munge/munge.key" --bits=1024 >"$S/munge/mungekey.log" 2>&1 ||
      fail munge "mungekey --create failed" "$S/munge/mungekey.log"
  fi
  echo "required $PLUGDIR/spank_pbs.so" >"$S/etc/plugstack.conf.new"   # PBS_* variables in jobs
  local hooks=""
  if [ -n "$HOOK_DIR" ]; then
    hooks="PrologSlurmctld=$HOOK_DIR/slurm/prolog_slurmctld
EpilogSlurmctld=$HOOK_DIR/slurm/epilog_slurmctld"
  fi
  cat >"$SLURM_CONF.new" <<EOF
# generated by deploy/single-host/stack.sh - rewritten on every 'stack.sh start'
ClusterName=vtorque
SlurmctldHost=$H(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
PlugStackConfig=$S/etc/plugstack.conf
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
ReturnToService=2
PrologFlags=Alloc
PrologEpilogTimeout=$PROLOG_TIMEOUT
$hooks
NodeName=$H NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$(real_memory) State=UNKNOWN
PartitionName=batch Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF
  CONF_CHANGED=0
  local f
  for f in "$SLURM_CONF" "$S/etc/plugstack.conf"; do
    if cmp -s "$f" "$f.new"; then rm -f "$f.new"; else mv -f "$f.new" "$f"; CONF_CHANGED=1; fi
    chmod 644 "$f"
  done
  # slurmctld checks PrologSlurmctld/EpilogSlurmctld once, when it starts: a hook that was missing then is never
  # run ("Invalid PrologSlurmctld"), and jobs run on the bare host. So the hooks' presence and content count as
  # configuration: a hook that appears or changes restarts slurmctld like a changed slurm.conf does.
  if [ -n "$HOOK_DIR" ]; then
    for f in prolog_slurmctld epilog_slurmctld; do
      [ -x "$HOOK_DIR/slurm/$f" ] || die "$HOOK_DIR/slurm/$f is not an executable file: install the hooks first (deploy/single-host/configure.sh)"
    done
    (cd "$HOOK_DIR/slurm" && sha256sum prolog_slurmctld epilog_slurmctld; sha256sum /etc/vtorque/hooks.env 2>/dev/null) >"$S/etc/hooks.stamp.new"
  else
    : >"$S/etc/hooks.stamp.new"
  fi
  if cmp -s "$S/etc/hooks.stamp" "$S/etc/hooks.stamp.new"; then rm -f "$S/etc/hooks.stamp.new"
  else mv -f "$S/etc/hooks.stamp.new" "$S/etc/hooks.stamp"; CONF_CHANGED=1; fi
}

munge_start() {
  begin
  write_slurm_files
  if pid_ok "$S/munge-run/munged.pid" munged && munge_ok; then ok munge "already running (pid $(pid_of "$S/munge-run/munged.pid"))"; return; fi
  runuser -u munge -- munged --force --key-file="$S/munge/munge.key" --socket="$MUNGE_SOCK" \
    --pid-file="$S/munge-run/munged.pid" --log-file="$S/munge/munged.log" --seed-file="$S/munge/munged.seed" \
    >"$S/munge/munged.stdout" 2>&1 9>&- || fail munge "munged did not start" "$S/munge/munged.log and $S/munge/munged.stdout"
  for _ in $(seq 1 50); do munge_ok && { ok munge "started (socket $MUNGE_SOCK)"; return; }; sleep 0.1; done
  fail munge "munge/unmunge round trip fails" "$S/munge/munged.log"
}

slurm_start() {
  begin
  local started="" st resumed=0 last_resume=0 ctld_pid="" slurmd_pid=""
  # cwd of the daemons (and so of PrologSlurmctld/EpilogSlurmctld): a directory that always exists
  if ! pid_ok "$S/run/slurmctld.pid" slurmctld; then
    ( cd / && exec setsid slurmctld -D -c -f "$SLURM_CONF" >"$S/log/slurmctld.stdout" 2>&1 </dev/null 9>&- ) &
    ctld_pid=$!
    started="$started slurmctld"
  fi
  if ! pid_ok "$S/run/slurmd.pid" slurmd; then
    ( cd / && exec setsid slurmd -D -f "$SLURM_CONF" >"$S/log/slurmd.stdout" 2>&1 </dev/null 9>&- ) &
    slurmd_pid=$!
    started="$started slurmd"
  fi
  if [ -z "$started" ] && [ "$CONF_CHANGED" = 1 ]; then
    # Trap (Slurm 22.05): 'scontrol reconfigure' does NOT make slurmctld start running a PrologSlurmctld
    # that was unset when it started (tested). So restart slurmctld WITHOUT -c (the queue and running
    # jobs are kept), then reconfigure so that slurmd re-reads slurm.conf too.
    stop_pids "$(pid_of "$S/run/slurmctld.pid")"
    ( cd / && exec setsid slurmctld -D -f "$SLURM_CONF" >>"$S/log/slurmctld.stdout" 2>&1 </dev/null 9>&- ) &
    ctld_pid=$!
    for _ in $(seq 1 100); do timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
    timeout 20 scontrol reconfigure >"$S/log/reconfigure.log" 2>&1 ||
      fail slurm "scontrol reconfigure failed" "$S/log/reconfigure.log and $S/log/slurmctld.log"
    started=" (already running; slurm.conf changed -> slurmctld restarted, queue kept)"
  elif [ -z "$started" ]; then
    started=" (already running, slurm.conf unchanged)"
  else
    started=" started:$started"
  fi
  local deadline=$(( $(date +%s) + 60 ))
  while :; do
    st=$(node_state)
    case "$st" in
      idle|mixed|allocated|completing) break ;;
      down|drained|draining|drain|down~|*drain*)
        # drained/down (e.g. by a failed hook, or left over): resume it, at most every 2 s
        if [ $(( $(date +%s) - last_resume )) -ge 2 ]; then
          timeout 10 scontrol update nodename="$H" state=resume >>"$S/log/resume.log" 2>&1 && resumed=1
          last_resume=$(date +%s)
        fi ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || fail slurm "node $H not idle after 60s (state: ${st:-no answer from slurmctld})" "$S/log/slurmctld.log and $S/log/slurmd.log"
    if [ -n "$ctld_pid" ] && ! kill -0 "$ctld_pid" 2>/dev/null; then
      fail slurm "slurmctld exited" "$S/log/slurmctld.log and $S/log/slurmctld.stdout"
    fi
    if [ -n "$slurmd_pid" ] && ! kill -0 "$slurmd_pid" 2>/dev/null; then
      fail slurm "slurmd exited" "$S/log/slurmd.log and $S/log/slurmd.stdout"
    fi
    sleep 0.1
  done
  [ $resumed = 1 ] && started="$started, node resumed"
  ok slurm "node $H $st$started"
}

slurm_stop() {
  begin
  local ids pids="" n=0
  if pid_ok "$S/run/slurmctld.pid" slurmctld; then
    ids=$(timeout 5 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${ids// /}" ]; then
      timeout 10 scancel --quiet --full $ids 2>/dev/null
      n=$(wc -w <<<"$ids")
      # give the cancelled jobs a few seconds to leave (epilogs run)
      for _ in $(seq 1 50); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  pid_ok "$S/run/slurmd.pid" slurmd && pids="$pids $(pid_of "$S/run/slurmd.pid")"
  pid_ok "$S/run/slurmctld.pid" slurmctld && pids="$pids $(pid_of "$S/run/slurmctld.pid")"
  stop_pids $pids                                   # both at once
  ok slurm "cancelled $n job(s), stopped:${pids:- nothing running}"
  begin
  pids=""
  pid_ok "$S/munge-run/munged.pid" munged && pids=$(pid_of "$S/munge-run/munged.pid")
  stop_pids $pids                                   # munge last: slurm needs it to shut down cleanly
  ok munge "stopped: ${pids:-nothing running}"
}

jobs_dir() {
  begin
  mkdir -p "$JOBS" && chmod 1777 "$JOBS" || fail jobs "cannot create $JOBS" "ls -ld $JOBS"
  chmod 755 "$STACK_DIR"
  ok jobs "$JOBS (mode 1777)"
}

write_env() {
  cat >"$ENVF.new" <<EOF
# generated by deploy/single-host/stack.sh - source it: . $ENVF
export SLURM_CONF=$SLURM_CONF
export VTORQUE_STACK_DIR=$STACK_DIR
export VTORQUE_JOBS_DIR=$JOBS
EOF
  chmod 644 "$ENVF.new" && mv -f "$ENVF.new" "$ENVF"
  echo "stack: env file $ENVF:"
  sed -n 's/^export /  export /p' "$ENVF"
}

# ---------------------------------------------------------------------------------------------
cmd_start() {
  need_root; lock
  mkdir -p "$STATE" "$LOGD"
  local t; t=$(now)
  rabbit_start
  libvirt_start
  munge_start
  slurm_start
  jobs_dir
  write_env
  T0=$t; ok stack "up"
}

cmd_stop() {
  need_root; lock
  mkdir -p "$STATE" "$LOGD"
  local t; t=$(now)
  slurm_stop
  libvirt_stop
  rabbit_stop
  T0=$t; ok stack "stopped (state kept in $STACK_DIR)"
}

cmd_status() {
  local all=0 st
  line() { printf '%-10s %-5s %s\n' "$1" "$2" "$3"; [ "$2" = up ] || all=1; }
  amqp_ok && line rabbitmq up "AMQP on $AMQP_HOST:$AMQP_PORT$([ -e "$STATE/rabbitmq.started" ] && echo ', started by stack.sh')" \
          || line rabbitmq down "no AMQP answer on $AMQP_HOST:$AMQP_PORT"
  [ -n "$(root_daemon_pid virtlogd)" ] && line virtlogd up "pid $(root_daemon_pid virtlogd)" || line virtlogd down ""
  virsh_ok && line libvirtd up "pid $(root_daemon_pid libvirtd), qemu:///system answers" || line libvirtd down "virsh -c qemu:///system version fails"
  if pid_ok "$S/munge-run/munged.pid" munged && munge_ok; then line munged up "pid $(pid_of "$S/munge-run/munged.pid"), $MUNGE_SOCK"; else line munged down ""; fi
  pid_ok "$S/run/slurmctld.pid" slurmctld && line slurmctld up "pid $(pid_of "$S/run/slurmctld.pid"), port $CTLD_PORT" || line slurmctld down ""
  pid_ok "$S/run/slurmd.pid" slurmd && line slurmd up "pid $(pid_of "$S/run/slurmd.pid"), port $SLURMD_PORT" || line slurmd down ""
  st=$( [ -f "$SLURM_CONF" ] && node_state )
  case "$st" in idle|mixed|allocated|completing) line node up "$H $st" ;; *) line node down "$H ${st:-unknown}" ;; esac
  [ -d "$JOBS" ] && [ "$(stat -c %a "$JOBS")" = 1777 ] && line jobs up "$JOBS" || line jobs down "$JOBS missing or not mode 1777"
  [ -f "$ENVF" ] && echo "env: $ENVF (SLURM_CONF=$SLURM_CONF)"
  return $all
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
