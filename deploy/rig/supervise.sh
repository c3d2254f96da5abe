#!/bin/bash
# supervise.sh CMD...: run CMD, start it again a second after it fails (exit status not 0, or a signal), as the
# systemd units' Restart=on-failure / RestartSec=1 do on a cluster; an exit 0 ends the supervision. SIGTERM
# stops CMD and ends the supervision. Used by deploy/rig/rig.sh for the vtorque services of each rig host.
child="" stopping=0
trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT
while :; do
  "$@" &
  child=$!
  rc=0
  # `wait` returns early when a trapped signal arrives: wait again until the service itself has ended. Waited
  # for at least once: a service that died before the first check (bash had already reaped it) was taken for
  # an exit 0 and never restarted; `wait` still gives a reaped child's status.
  while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  [ $stopping = 1 ] && exit 0
  [ $rc = 0 ] && { echo "supervise: $* exited 0, not restarted"; exit 0; }
  echo "supervise: $1 ${2:-} ${3:-} exited with status $rc; restarting in 1s"
  sleep 1 & wait $! || true
  [ $stopping = 1 ] && exit 0
done
