#!/bin/bash
# bench-up-down.sh [ROUNDS]: `rig.sh up` then `rig.sh down`, ROUNDS times (default 5); one line per round and
# the medians, as docs/benchmarks.md reports them. Needs no rig up (and refuses to run over one).
set -euo pipefail
RIG=$(cd "$(dirname "$0")" && pwd)/rig.sh
ROUNDS=${1:-5}
ups=() downs=()
t() { local a b; a=$(date +%s.%N); "$@" >/tmp/rig-bench.$$.log 2>&1 || { cat /tmp/rig-bench.$$.log >&2; exit 1; }
      b=$(date +%s.%N); awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}'; }
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
echo "| round | rig up | rig down | load average before |"
echo "|---|---|---|---|"
for i in $(seq 1 "$ROUNDS"); do
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  u=$(t "$RIG" up); d=$(t "$RIG" down)
  ups+=("$u"); downs+=("$d")
  echo "| $i | $u s | $d s | $load |"
done
echo "| median | $(median "${ups[@]}") s | $(median "${downs[@]}") s | |"
rm -f /tmp/rig-bench.$$.log
