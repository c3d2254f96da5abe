#!/bin/sh
# The single-host stack's broker users (docs/security.md): one per service, one for this node's worker, one for
# the hooks (readable by the slurm group: the Slurm hooks run as SlurmUser), all in the vhost `vtorque`, with
# the permissions shared/topology.py derives. Idempotent: secrets already on file are kept.
# RabbitMQ's guest stays (the tests give it vhosts of their own) but has no rights in `vtorque`.
set -eu
PREFIX=${PREFIX:-/opt/vtorque}
ETC=${ETC:-/etc/vtorque}
[ "$(id -u)" = 0 ] || { echo "broker: must run as root" >&2; exit 1; }
exec "$PREFIX/venv/bin/vtorque" broker setup --vhost vtorque --node "$(hostname -s)" \
  --credentials-dir "$ETC/broker" --hook-group "$(id -gn slurm 2>/dev/null || echo root)"
