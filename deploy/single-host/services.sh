#!/bin/sh
# Start/stop the vtorque services on this machine (no systemd): bridge, stager, node worker, and prefetch
# (follows Slurm's queue and stages a VM job's image while it waits).
# Usage: services.sh start|stop|status     Logs: /var/log/vtorque/<service>.log
set -eu
PREFIX=${PREFIX:-/opt/vtorque}
RUN=${RUN_DIR:-/run/vtorque}
LOGS=${LOG_DIR:-/var/log/vtorque}
SERVICES="bridge stager node-worker prefetch"
mkdir -p "$RUN" "$LOGS"
# The node worker asks Slurm whether a job still runs (reconciliation): it needs the stack's SLURM_CONF.
STACK_ENV=${VTORQUE_STACK_DIR:-/var/lib/vtorque-stack}/env
[ -r "$STACK_ENV" ] && . "$STACK_ENV"

alive() { [ -s "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() {
  for s in $SERVICES; do
    if alive "$s"; then echo "services: $s already running (pid $(cat "$RUN/$s.pid"))"; continue; fi
    [ -f "$LOGS/$s.log" ] && mv "$LOGS/$s.log" "$LOGS/$s.log.1"
    setsid "$PREFIX/venv/bin/vtorque" run "$s" >>"$LOGS/$s.log" 2>&1 </dev/null &
    echo $! > "$RUN/$s.pid"
  done
  # Ready when each has declared its queue and is consuming (it logs "consuming").
  for s in $SERVICES; do
    i=0
    until grep -q "consuming" "$LOGS/$s.log" 2>/dev/null && alive "$s"; do
      i=$((i + 1)); [ $i -le 300 ] || { echo "services: $s did not start; see $LOGS/$s.log" >&2; exit 1; }
      alive "$s" || { echo "services: $s exited; see $LOGS/$s.log" >&2; tail -5 "$LOGS/$s.log" >&2; exit 1; }
      sleep 0.1
    done
    echo "services: $s up (pid $(cat "$RUN/$s.pid"), log $LOGS/$s.log)"
  done
}

stop() {
  for s in $SERVICES; do
    alive "$s" || { rm -f "$RUN/$s.pid"; continue; }
    pid=$(cat "$RUN/$s.pid"); kill -TERM "$pid"
    i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    rm -f "$RUN/$s.pid"; echo "services: $s stopped"
  done
}

status() {
  rc=0
  for s in $SERVICES; do
    if alive "$s"; then echo "$s: up (pid $(cat "$RUN/$s.pid"))"; else echo "$s: down"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
