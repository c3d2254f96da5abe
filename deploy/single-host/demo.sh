#!/bin/sh
# The demo job: a VM job submitted with vsub through Slurm's qsub, run in a guest; its output, its state and
# exit code (from Slurm, through `vtorque status`), its phases and its trace.
# Exits 0 only when the job ran in its guest and succeeded; otherwise 1 with the reason on the last line.
# Env: PREFIX (/opt/vtorque), VTORQUE_STACK_DIR (/var/lib/vtorque-stack), DEMO_TIMEOUT (seconds, 420)
set -eu
PREFIX=${PREFIX:-/opt/vtorque}
STACK=${VTORQUE_STACK_DIR:-/var/lib/vtorque-stack}
TIMEOUT=${DEMO_TIMEOUT:-420}  # above [hooks] prologue_timeout (240 s) plus the run and the teardown
. "$STACK/env"
export PATH="$PREFIX/venv/bin:$PATH"
PY="$PREFIX/venv/bin/python"
JOBS="$STACK/jobs"
cd "$JOBS"
elapsed() { awk -v a="$1" -v b="${2:-$(date +%s.%N)}" 'BEGIN { printf "%.1f", b - a }'; }
fail() { echo "== demo FAILED: $*" >&2; exit 1; }
# One field of `vtorque status --json` (dotted path: scheduler.raw_state); empty when absent or null.
field() {
  printf '%s' "$status_json" | "$PY" -c '
import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else " ".join(map(str, value)) if isinstance(value, list) else value)' "$1"
}

host_name=$(hostname)
host_kernel=$(uname -r)
cat > vmdemo.sh <<'JOB'
#!/bin/sh
#PBS -N vmdemo
echo "VTORQUE-DEMO-MARKER running on $(hostname)"
echo "kernel release: $(uname -r)"
echo "cpus: $(nproc)"
JOB

echo "== submitting: vsub -vm img=tiny,vcpus=1,ram=256M vmdemo.sh   (host $host_name, kernel $host_kernel)"
t0=$(date +%s.%N)
job=$(vsub -vm img=tiny,vcpus=1,ram=256M vmdemo.sh) || fail "vsub did not submit the job (its error is above)"
[ -n "$job" ] || fail "vsub printed no job id"
echo "== job $job submitted; waiting for it (the guest boots under TCG: expect 10-30 s)"
last=""
while squeue -h -j "$job" 2>/dev/null | grep -q .; do
  state=$(squeue -h -j "$job" -o %T 2>/dev/null || true)
  [ "$state" = "$last" ] || { printf '   %6.1fs  %s\n' "$(elapsed "$t0")" "$state"; last=$state; }
  if [ "$(awk -v a="$t0" -v b="$(date +%s.%N)" -v t="$TIMEOUT" 'BEGIN { print (b - a > t) }')" = 1 ]; then
    scancel "$job" 2>/dev/null || true
    fail "job $job still $state after ${TIMEOUT}s: cancelled it (see \`vtorque status $job\` and the services' logs in /var/log/vtorque)"
  fi
  sleep 0.2
done
t1=$(date +%s.%N)
printf '== job %s finished after %ss\n' "$job" "$(elapsed "$t0" "$t1")"
sleep 1.5  # the services export spans in batches every 0.5 s

echo "== status (vtorque status $job: state and exit code from Slurm, phases from the trace):"
vtorque status "$job" | sed 's/^/   /' || true
status_json=$(vtorque status --json "$job") || fail "vtorque status $job failed (its error is above)"
state=$(field state)
exit_code=$(field exit_code)
raw_state=$(field scheduler.raw_state)
reason=$(field scheduler.reason)
out=$(field scheduler.stdout)
err=$(field scheduler.stderr)
[ -n "$out" ] || out="$JOBS/vmdemo.sh.o$job"  # where qsub puts it: the submit directory
[ -n "$err" ] || err="$JOBS/vmdemo.sh.e$job"
guest_names=$(printf '%s' "$status_json" | "$PY" -c '
import json, sys
print(" ".join(g["guest"] for g in json.load(sys.stdin)["guests"]))')

echo "== output ($out):"
if [ -r "$out" ]; then sed 's/^/   | /' "$out"; else echo "   (no output file)"; fi
if [ -s "$err" ]; then echo "== stderr ($err):"; sed 's/^/   | /' "$err"; fi
echo "== trace (vtorque trace $job; every span: vtorque trace --all $job):"
vtorque trace "$job" | sed 's/^/   /' || true

# Did it run, in its guest, and succeed? Each check says what it saw.
slurm_says="Slurm: ${raw_state:-no answer}${reason:+, $reason}, exit code ${exit_code:-unknown}"
first_error=$(sed -n '/./{p;q}' "$err" 2>/dev/null || true)
[ -r "$out" ] || fail "job $job left no output file at $out ($slurm_says)${first_error:+; its stderr: $first_error}"
grep -q '^VTORQUE-DEMO-MARKER' "$out" ||
  fail "the demo's marker line is not in $out: the job's script did not run ($slurm_says)${first_error:+; its stderr: $first_error}"
ran_on=$(sed -n 's/^VTORQUE-DEMO-MARKER running on //p' "$out" | head -n 1)
ran_kernel=$(sed -n 's/^kernel release: //p' "$out" | head -n 1)
[ "$ran_on" != "$host_name" ] || fail "job $job ran on the host ($host_name, kernel $ran_kernel), not in a guest"
case " $guest_names " in
  *" $ran_on "*) ;;
  *) [ "$ran_kernel" != "$host_kernel" ] ||
       fail "job $job ran on $ran_on with the host's kernel $host_kernel, and $ran_on is none of its guests (${guest_names:-none})" ;;
esac
[ "$(field state_from)" = scheduler ] || fail "Slurm did not say how job $job ended ($(field notes))"
[ "$state" = completed ] && [ "$exit_code" = 0 ] ||
  fail "job $job ran in its guest $ran_on but ended $state ($slurm_says)"

cat <<MSG
== demo OK: job $job ran in its guest $ran_on (kernel $ran_kernel; the host's is $host_kernel)
   Slurm: $raw_state, exit code $exit_code; output in $out, errors in $err

The stack keeps running. Submit another VM job:
  . $STACK/env; export PATH=$PREFIX/venv/bin:\$PATH; cd $JOBS
  vsub -vm img=tiny,vcpus=2 -l walltime=00:05:00 your-script.sh
  vtorque status JOBID; vtorque trace JOBID
A job's output lands where qsub puts it: SCRIPT.oJOBID and SCRIPT.eJOBID in the directory you submitted from
(here $JOBS), or where -o/-e say; \`vtorque status JOBID\` prints both paths.
Stop everything: make down
MSG
