#!/bin/bash
# Start/stop the vtorque services on this machine (no systemd): bridge, stager, node worker, and prefetch
# (follows Slurm's queue and stages a VM job's image while it waits).
# Usage: services.sh start|stop|status [SERVICE...]     Logs: /var/log/vtorque/<service>.log
#        (SERVICE: bridge, stager, node-worker, prefetch; all of them when none is named. A service started
#        alone takes the VTORQUE_* overrides of the caller's environment, e.g. VTORQUE_NODE__WARM_POOL=1.)
#
# Each service runs under a small supervisor (this script, `supervise NAME`) that does what the systemd units'
# Restart=on-failure / RestartSec=1 do on a cluster: a service that exits with an error or dies of a signal is
# started again after a second; one that exits 0 (stopped) is not. The supervisor and the service keep no
# descriptor of whoever started them (a lock held by the shell that ran `make demo` stays that shell's).
set -eu
PREFIX=${PREFIX:-/opt/vtorque}
RUN=${RUN_DIR:-/run/vtorque}
LOGS=${LOG_DIR:-/var/log/vtorque}
SERVICES="bridge stager node-worker prefetch"
RESTART_DELAY=1
mkdir -p "$RUN" "$LOGS"
# The node worker asks Slurm whether a job still runs (reconciliation): it needs the stack's SLURM_CONF.
STACK_ENV=${VTORQUE_STACK_DIR:-/var/lib/vtorque-stack}/env
[ -r "$STACK_ENV" ] && . "$STACK_ENV"

# running PID: a live process, not a zombie left to a PID 1 that does not reap (containers)
running() {
  local state
  [ -n "$1" ] && state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ -n "$state" ] && [ "$state" != Z ]
}
pid_in() { [ -s "$1" ] && tr -dc 0-9 <"$1" || true; }
# up NAME: its supervisor and the service under it both run
up() { running "$(pid_in "$RUN/$1.pid")" && running "$(pid_in "$RUN/$1.child")"; }

close_inherited_fds() {
  local fd n
  for fd in /proc/$$/fd/*; do
    n=${fd##*/}
    [ "$n" -gt 2 ] 2>/dev/null && eval "exec $n>&-" 2>/dev/null || true
  done
}

supervise() {
  local s=$1 child="" rc stopping=0
  close_inherited_fds
  trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT
  while :; do
    "$PREFIX/venv/bin/vtorque" run "$s" &
    child=$!
    echo "$child" >"$RUN/$s.child"
    rc=0
    # `wait` returns early when a trapped signal arrives: wait again until the service itself has ended
    while running "$child"; do wait "$child" && rc=0 || rc=$?; done
    [ $stopping = 1 ] && break
    if [ $rc = 0 ]; then echo "services: $s exited 0, not restarted"; break; fi
    echo "services: $s exited with status $rc; restarting in ${RESTART_DELAY}s"
    sleep "$RESTART_DELAY" & wait $! || true
    [ $stopping = 1 ] && break
  done
  rm -f "$RUN/$s.child"
}

start() {
  local s i
  for s in $SERVICES; do
    if up "$s"; then echo "services: $s already running (pid $(pid_in "$RUN/$s.child"))"; continue; fi
    stop_one "$s" >/dev/null  # a supervisor whose service is gone, or stale pid files
    [ -f "$LOGS/$s.log" ] && mv "$LOGS/$s.log" "$LOGS/$s.log.1"
    (umask 077; : >>"$LOGS/$s.log")  # the log is root's alone (job ids, owners, paths); the services' own
    setsid "$0" supervise "$s" >>"$LOGS/$s.log" 2>&1 </dev/null &  # files keep their modes (umask 022)
    echo $! >"$RUN/$s.pid"
  done
  # Ready when each has declared its queue and is consuming (it logs "consuming").
  for s in $SERVICES; do
    i=0
    until grep -q "consuming" "$LOGS/$s.log" 2>/dev/null && up "$s"; do
      i=$((i + 1)); [ $i -le 300 ] || { echo "services: $s did not start within 30s; see $LOGS/$s.log" >&2; exit 1; }
      running "$(pid_in "$RUN/$s.pid")" || { echo "services: $s exited; see $LOGS/$s.log" >&2; tail -5 "$LOGS/$s.log" >&2; exit 1; }
      sleep 0.1
    done
    echo "services: $s up (pid $(pid_in "$RUN/$s.child"), log $LOGS/$s.log)"
  done
}

stop_one() {
  local s=$1 pid i
  pid=$(pid_in "$RUN/$s.pid")
  if running "$pid"; then
    kill -TERM "$pid"
    i=0; while running "$pid" && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
    running "$pid" && kill -KILL "$pid"
    echo "services: $s stopped"
  fi
  pid=$(pid_in "$RUN/$s.child")  # a service whose supervisor was killed
  if running "$pid"; then
    kill -TERM "$pid"
    i=0; while running "$pid" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    running "$pid" && kill -KILL "$pid"
  fi
  rm -f "$RUN/$s.pid" "$RUN/$s.child"
}

stop() {
  local s
  for s in $SERVICES; do stop_one "$s"; done
}

status() {
  local s rc=0
  for s in $SERVICES; do
    if up "$s"; then echo "$s: up (pid $(pid_in "$RUN/$s.child"), supervisor $(pid_in "$RUN/$s.pid"))"
    elif running "$(pid_in "$RUN/$s.pid")"; then echo "$s: restarting (supervisor $(pid_in "$RUN/$s.pid"))"; rc=1
    else echo "$s: down"; rc=1; fi
  done
  return $rc
}

action=${1:-}
[ $# -gt 0 ] && shift
if [ "$action" != supervise ] && [ $# -gt 0 ]; then
  for s in "$@"; do
    case " $SERVICES " in *" $s "*) ;; *) echo "services: no service '$s' (one of: $SERVICES)" >&2; exit 2 ;; esac
  done
  SERVICES="$*"
fi
case "$action" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  supervise) supervise "${1:?supervise NAME}" ;;
  *) echo "usage: $0 start|stop|status [SERVICE...]" >&2; exit 2 ;;
esac
