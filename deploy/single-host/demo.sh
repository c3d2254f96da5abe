#!/bin/sh
# The demo job: a VM job submitted with vsub through Slurm's qsub, run in a guest; its output and its trace.
set -eu
PREFIX=${PREFIX:-/opt/vtorque}
STACK=${VTORQUE_STACK_DIR:-/var/lib/vtorque-stack}
. "$STACK/env"
export PATH="$PREFIX/venv/bin:$PATH"
JOBS="$STACK/jobs"
cd "$JOBS"
elapsed() { awk -v a="$1" -v b="${2:-$(date +%s.%N)}" 'BEGIN { printf "%.1f", b - a }'; }

cat > vmdemo.sh <<'JOB'
#!/bin/sh
#PBS -N vmdemo
echo "VTORQUE-DEMO-MARKER running on $(hostname)"
echo "kernel release: $(uname -r)"
echo "cpus: $(nproc)"
JOB

echo "== submitting: vsub -vm img=tiny,vcpus=1,ram=256M vmdemo.sh   (host kernel $(uname -r))"
t0=$(date +%s.%N)
job=$(vsub -vm img=tiny,vcpus=1,ram=256M vmdemo.sh)
echo "== job $job submitted; waiting for it (the guest boots under TCG: expect 10-30 s)"
last=""
while squeue -h -j "$job" 2>/dev/null | grep -q .; do
  state=$(squeue -h -j "$job" -o %T 2>/dev/null || true)
  [ "$state" = "$last" ] || { printf '   %6.1fs  %s\n' "$(elapsed "$t0")" "$state"; last=$state; }
  sleep 0.2
done
t1=$(date +%s.%N)
printf '== job %s finished after %ss\n' "$job" "$(elapsed "$t0" "$t1")"
echo "== output ($JOBS/vmdemo.sh.o$job):"
sed 's/^/   | /' "vmdemo.sh.o$job"
[ -s "vmdemo.sh.e$job" ] && { echo "== stderr:"; sed "s/^/   | /" "vmdemo.sh.e$job"; }
sleep 1.5  # the services export spans in batches every 0.5 s
echo "== trace:"
vtorque trace "$job"
cat <<MSG

The stack keeps running. Submit another VM job:
  . $STACK/env; export PATH=$PREFIX/venv/bin:\$PATH; cd $JOBS
  vsub -vm img=tiny,vcpus=2 -l walltime=00:05:00 your-script.sh
Stop everything: make down
MSG
