"""Prefetch while a job is queued: following Torque's accounting log in a TORQUE_HOME of the test's own
(the recorded TORQUE 6.1 log replayed into it, across a day change, with restarts), the whole path from a `Q`
record to a staged image through the real services, and a pending job on the real single-host Slurm."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from vtorque.services.scheduler_bridge.accounting import SlurmPrefetch, TorquePrefetch
from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher
from vtorque.shared.config import Config, ImagesConfig, PrefetchConfig, SchedulerConfig
from vtorque.shared.image_store import ImageStore
from vtorque.shared.job_script import render_wrapper

from . import stager_support as ss

RECORDED = Path(__file__).parents[1] / "data" / "torque-recorded" / "accounting" / "20261126"
MiB = 2**20


@pytest.fixture(scope="module")
def broker():
    with ss.vhost() as url:
        yield url


def vm_script(img: str = "tiny") -> str:
    return render_wrapper("#!/bin/sh\nhostname\n", {"img": img, "vcpus": "1", "ram": "256M"},
                          "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test", "/nonexistent/key", None,
                          "/opt/vtorque/venv/bin/vtorque-launch")


def torque_home(tmp_path: Path, vm_jobs, subdirs: bool = False) -> Path:
    home = tmp_path / "torque"
    (home / "server_priv" / "accounting").mkdir(parents=True)
    jobs = home / "server_priv" / "jobs"
    jobs.mkdir()
    for job_id in vm_jobs:
        where = jobs / job_id.split(".")[0][-1] if subdirs else jobs
        where.mkdir(exist_ok=True)
        (where / f"{job_id}.SC").write_text(vm_script())
    (jobs / "2.vm.SC").write_text("#!/bin/sh\n#PBS -N plain\necho no vm here\n")
    return home


def drain(waiter, quiet: float = 0.6) -> list[m.Message]:
    """Every event until none came for `quiet` seconds."""
    got = []
    while (event := waiter.next(time.monotonic() + quiet)) is not None:
        got.append(event)
    return got


def test_following_the_recorded_log_across_a_day_change_and_restarts(tmp_path, broker):
    lines = RECORDED.read_text().splitlines(keepends=True)
    vm_jobs = {f"{n}.vm" for n in range(13)} - {"2.vm"}
    home = torque_home(tmp_path, vm_jobs)
    acct = home / "server_priv" / "accounting"
    config = Config(state_dir=str(tmp_path / "state"), prefetch=PrefetchConfig(torque_home=str(home)))
    state = tmp_path / "state" / "prefetch.json"
    waiter = EventWaiter(broker, ["job.*.job_queued", "job.*.job_deleted"])
    publisher = Publisher(broker)
    seen: list[m.Message] = []

    def prefetcher():
        return TorquePrefetch(config, publisher, state)

    try:
        p = prefetcher()
        assert p.step() == 0  # no accounting file yet
        # Day one: the first 100 lines, written in three bursts, the last line of a burst torn mid-way.
        with open(acct / "20261126", "w") as day1:
            for start, end in ((0, 40), (40, 70), (70, 100)):
                chunk = "".join(lines[start:end])
                day1.write(chunk[:-25])
                day1.flush()
                p.step()
                day1.write(chunk[-25:])
                day1.flush()
                p.step()
                if end == 70:
                    p = prefetcher()  # a restart: from the saved state, nothing missed or repeated
        seen += drain(waiter)
        # Midnight: the rest goes to the next day's file; the prefetcher restarts in between.
        (acct / "20261127").write_text("".join(lines[100:150]))
        p = prefetcher()
        p.step()
        seen += drain(waiter)
        with open(acct / "20261127", "a") as day2:
            day2.write("".join(lines[150:]))
        p.step()
        p = prefetcher()
        assert p.step() == 0
        seen += drain(waiter)
    finally:
        waiter.close()
        publisher.close()
    queued = [e.job_id for e in seen if isinstance(e, m.JobQueued)]
    deleted = [e.job_id for e in seen if isinstance(e, m.JobDeleted)]
    assert queued == ["0.vm", "1.vm", "3.vm", "4.vm", "5.vm", "6.vm", "7.vm", "8.vm", "9.vm", "10.vm", "11.vm",
                      "12.vm", "0.vm", "1.vm", "3.vm"]
    assert deleted == ["4.vm", "5.vm", "6.vm", "9.vm", "10.vm", "3.vm"]
    assert all(e.scheduler == "torque" for e in seen)
    first = next(e for e in seen if isinstance(e, m.JobQueued))
    assert first.spec == {"img": "tiny", "ram": "256M", "vcpus": "1"}
    assert len({e.message_id for e in seen}) == len(seen)


def test_a_first_start_stages_only_the_jobs_still_queued(tmp_path, broker):
    home = torque_home(tmp_path, ["20.vm", "21.vm", "22.vm"], subdirs=True)
    (home / "server_priv" / "accounting" / "20261201").write_text(
        "12/01/2026 10:00:00;Q;20.vm;queue=batch\n"
        "12/01/2026 10:00:01;S;20.vm;user=u exec_host=vm/0\n"
        "12/01/2026 10:00:02;Q;21.vm;queue=batch\n"
        "12/01/2026 10:00:03;Q;22.vm;queue=batch\n"
        "12/01/2026 10:00:04;D;22.vm;requestor=u@vm\n")
    config = Config(state_dir=str(tmp_path / "state"), prefetch=PrefetchConfig(torque_home=str(home)))
    waiter = EventWaiter(broker, ["job.*.job_queued", "job.*.job_deleted"])
    publisher = Publisher(broker)
    try:
        p = TorquePrefetch(config, publisher, tmp_path / "state" / "p.json")
        p.step()
        with open(home / "server_priv" / "accounting" / "20261201", "a") as fh:
            fh.write("12/01/2026 10:00:05;D;21.vm;requestor=u@vm\n")
        p.step()
        seen = drain(waiter)
    finally:
        waiter.close()
        publisher.close()
    assert [(type(e).__name__, e.job_id) for e in seen] == [("JobQueued", "21.vm"), ("JobDeleted", "21.vm")]


def test_a_queued_job_gets_its_image_before_it_starts_and_a_deleted_one_stops_its_staging(tmp_path, broker):
    home = torque_home(tmp_path, [])
    jobs = home / "server_priv" / "jobs"
    (jobs / "31.vm.SC").write_text(vm_script("fast"))
    (jobs / "32.vm.SC").write_text(vm_script("slow"))
    with ss.ImageServer() as server:
        fast = ss.make_image(tmp_path / "fast.raw", 8 * MiB, seed=31)
        slow = ss.make_image(tmp_path / "slow.raw", 64 * MiB, seed=32)
        site = ss.Site(tmp_path, broker, tmp_path / "store", extra="")
        site.catalog = {
            "fast": {"source": server.add("fast.raw", tmp_path / "fast.raw"), "sha256": fast, "format": "raw"},
            "slow": {"source": server.add("slow.raw", tmp_path / "slow.raw", rate=6 * MiB), "sha256": slow,
                     "format": "raw"},
        }
        site.write()
        env = {"VTORQUE_PREFETCH__TORQUE_HOME": str(home), "VTORQUE_PREFETCH__POLL_INTERVAL": "0.1"}
        services = [ss.ServiceProcess(site, "stager"), ss.ServiceProcess(site, "bridge"),
                    ss.ServiceProcess(site, "prefetch", **env)]
        waiter = EventWaiter(broker, [f"image.{fast}.#", f"image.{slow}.#"])
        acct = home / "server_priv" / "accounting" / time.strftime("%Y%m%d")
        try:
            now = time.strftime("%m/%d/%Y %H:%M:%S")
            with open(acct, "a") as fh:
                fh.write(f"{now};Q;31.vm;queue=batch\n{now};Q;32.vm;queue=batch\n")
            events = ss.events_until(waiter, lambda ev: any(isinstance(e, m.ImageStaged) for e in ev)
                                     and any(isinstance(e, m.ImageStagingProgress) and e.digest == slow for e in ev),
                                     timeout=60)
            staged = next(e for e in events if isinstance(e, m.ImageStaged))
            assert (staged.job_id, staged.image, staged.cached) == ("31.vm", "fast", False)
            with open(acct, "a") as fh:
                fh.write(f"{time.strftime('%m/%d/%Y %H:%M:%S')};D;32.vm;requestor=someone@vm\n")
            events += ss.events_until(waiter, lambda ev: any(isinstance(e, (m.ImageStageCancelled, m.ImageStaged))
                                                             and e.digest == slow for e in ev), timeout=60)
        finally:
            waiter.close()
            for proc in services:
                proc.stop()
    cancelled = [e for e in events if isinstance(e, m.ImageStageCancelled)]
    assert [(e.job_id, e.image) for e in cancelled] == [("32.vm", "slow")]
    store = ImageStore(site.store)
    assert store.has(fast) and not store.has(slow)
    assert "image prefetch asked" in services[1].text()


@pytest.mark.slow
@pytest.mark.slurm
def test_a_pending_slurm_job_is_prefetched_and_its_cancellation_withdraws_it(tmp_path, broker):
    env_file = Path(os.environ.get("VTORQUE_STACK_DIR", "/var/lib/vtorque-stack")) / "env"
    if not env_file.exists():
        pytest.fail(f"{env_file} missing: the single-host Slurm is not set up (`make test` does it)")
    env = dict(os.environ)
    for line in env_file.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    os.environ.setdefault("SLURM_CONF", env["SLURM_CONF"])
    work = Path(env.get("VTORQUE_JOBS_DIR", "/tmp")) / f"prefetch-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    os.chmod(work, 0o1777)
    script = work / "vmjob.sh"
    script.write_text(vm_script())
    plain = work / "plain.sh"
    plain.write_text("#!/bin/sh\nhostname\n")
    # The stack's Slurm (this test submits held jobs there and looks only at those), its binaries in /usr/bin.
    config = Config(state_dir=str(tmp_path / "state"), images=ImagesConfig(store=str(tmp_path / "store")),
                    scheduler=SchedulerConfig(kind="slurm", bin_dir="/usr/bin"))
    waiter = EventWaiter(broker, ["job.*.job_queued", "job.*.job_deleted"])
    publisher = Publisher(broker)
    held = []
    try:
        prefetcher = SlurmPrefetch(config, publisher, tmp_path / "state" / "slurm.json")
        prefetcher.step()  # whatever is pending already (other tests' jobs) is not this test's business
        drain(waiter, 0.3)
        for path in (script, plain):
            out = subprocess.run(["sbatch", "--hold", "--parsable", "-o", str(work / "out.%j"), str(path)],
                                 env=env, cwd=work, capture_output=True, text=True, timeout=60, check=True)
            held.append(out.stdout.strip().split(";")[0])
        prefetcher.step()
        queued = [e for e in drain(waiter) if e.job_id in held]  # other tests may queue jobs meanwhile
        subprocess.run(["scancel", *held], env=env, check=True, timeout=60)
        deadline = time.monotonic() + 30
        deleted: list = []
        while not deleted and time.monotonic() < deadline:
            prefetcher.step()
            deleted = [e for e in drain(waiter, 0.3) if e.job_id in held]
        restarted = SlurmPrefetch(config, publisher, tmp_path / "state" / "slurm.json")
        restarted.step()
        again = [e for e in drain(waiter, 0.5) if e.job_id in held]
    finally:
        if held:
            subprocess.run(["scancel", *held], env=env, timeout=60)
        waiter.close()
        publisher.close()
    vm_job = held[0]
    assert [(type(e).__name__, e.job_id) for e in queued] == [("JobQueued", vm_job)]
    assert queued[0].spec == {"img": "tiny", "ram": "256M", "vcpus": "1"} and queued[0].scheduler == "slurm"
    assert [(type(e).__name__, e.job_id, e.reason) for e in deleted] == [
        ("JobDeleted", vm_job, "cancelled while pending")]
    assert again == []  # its saved state: a restart announces nothing twice
