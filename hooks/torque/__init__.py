"""Torque's root prologue and epilogue for VM jobs, to the contract recorded from TORQUE 6.1
(../shared/reference/torque-hooks.md): prologue argv = jobid user group jobname resource_list queue account
script (8), epilogue argv = jobid user group jobname sid resource_list resources_used queue account
exit_status script (11); PBS_NODEFILE in the environment; cwd mom_priv; stdout/stderr are the job's.

Exit codes, as Torque reads them: 0 runs the job; 1 aborts it (Torque then keeps its .o/.e, so the reason also
goes to a file of the owner's, see write_reason); anything else requeues it with no limit, so an infrastructure
failure requeues at most hooks.max_requeues times, counted on disk, then aborts. The Python side answers
PY_REQUEUE for a requeue and the shell entry point (hooks/torque/prologue) turns it into 2; any other code
(a crash, an interpreter that cannot start) becomes 1 there: nothing but a deliberate decision ever requeues.

Cancel (qdel): Torque runs `epilogue.precancel` as the job's owner, with pbs_mom waiting for it, and users
hold no broker credentials. So the precancel only makes a directory (mkdir never blocks) inside the job's
cancel directory `<mom_priv>/vtorque-cancel/<jobid>/`, which the root prologue made for the owner; a small
root watcher that the prologue left behind (Torque does not kill a prologue's background children) sees it
and publishes JobEnded, so the teardown starts at once; the epilogue then confirms it. See docs/design.md.

The parts, one concern each: `entry` (the Python side of the shell entry points `prologue`, `epilogue`, which
live in this folder too and are what `vtorque install-hooks` copies into mom_priv; `python -m
vtorque.hooks.torque` runs `entry.main`), `job` (the job as Torque hands it over, and `qstat -f`'s exec_host;
what those say is read by shared/torque.py), `deadline` ($prologalarm), `exit_codes`, `owner_notes` (the reason
file and final note), `state_files` (requeue count, markers), `cancel` (precancel's request and the root
watcher), `channel` (the prologue's NodeWorkerChannel with Torque's cancel), `log`. Nothing is imported here:
the shell entry points' `python -m` and `vtorque doctor`'s import check load only what they use.
"""
