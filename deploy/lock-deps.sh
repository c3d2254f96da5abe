#!/bin/sh
# Regenerate requirements.lock: every Python package vtorque, its tests and its build use, at exact versions
# with their hashes (pip-tools' pip-compile, resolved by Debian's python3, the interpreter of the venv).
# Upgrading a dependency is this one command; commit the new lock with the change it brings.
#   deploy/lock-deps.sh [--upgrade | --upgrade-package NAME]
set -eu
cd "$(dirname "$0")/.."
PIP_TOOLS=7.6.2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
/usr/bin/python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "pip-tools==$PIP_TOOLS" 2>&1 | grep -v '^WARNING: Location' >&2 || true
"$tmp/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras --extra test \
  --no-emit-index-url --no-emit-find-links --output-file requirements.lock "$@" pyproject.toml deploy/build-requirements.in
echo "lock-deps: requirements.lock written ($(grep -c '==' requirements.lock) packages)"
