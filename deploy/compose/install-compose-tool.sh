#!/bin/bash
# install-compose-tool.sh - podman-compose, pinned by hash (deploy/compose/podman-compose.txt), in a venv of its
# own: $VTORQUE_COMPOSE_TOOL_DIR/bin/podman-compose (default /opt/vtorque/podman-compose). Idempotent: nothing
# happens when the pinned version is already there. Needs python3-venv, python3-yaml, python3-dotenv (Debian).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${VTORQUE_COMPOSE_TOOL_DIR:-/opt/vtorque/podman-compose}
PIN=$(sed -n 's/^podman-compose==\([^ ]*\).*/\1/p' "$HERE/podman-compose.txt")
if [ -x "$DIR/bin/podman-compose" ] && [ "$("$DIR/bin/python" -c \
     'import importlib.metadata as m; print(m.version("podman-compose"))' 2>/dev/null)" = "$PIN" ]; then
  echo "install-compose-tool: podman-compose $PIN already in $DIR"
  exit 0
fi
/usr/bin/python3 -c 'import yaml, dotenv' 2>/dev/null \
  || { echo "install-compose-tool: ERROR: python3-yaml and python3-dotenv are missing (deploy/install-deps.sh)" >&2; exit 1; }
rm -rf "$DIR"
/usr/bin/python3 -m venv --system-site-packages "$DIR"
"$DIR/bin/pip" install -q --disable-pip-version-check --no-deps --require-hashes -r "$HERE/podman-compose.txt"
"$DIR/bin/podman-compose" --version >/dev/null
echo "install-compose-tool: podman-compose $PIN installed in $DIR"
