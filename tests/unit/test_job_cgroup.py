"""services/node_worker/job_cgroup.py: the layout a site configures, the job's paths, what is moved where, and
the boot path's order (paused → moved → resumed). The I/O runs against a cgroup tree of files under tmp_path;
the real kernel, libvirt and Slurm are in tests/e2e/test_guest_cgroup.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types

import pytest

from vtorque.services.node_worker import job_cgroup as jc
from vtorque.shared.config import NodeConfig, load_config

SLURM = {"memory": "slurm_{node}/uid_{uid}/job_{job}/step_extern/task_0",
         "cpuacct": "slurm_{node}/uid_{uid}/job_{job}/step_extern/task_0",
         "freezer": "slurm_{node}/uid_{uid}/job_{job}/step_extern"}
TORQUE = {"memory": "torque/{job}", "cpuacct": "torque/{job}"}


def test_the_documented_layouts_are_valid():
    assert jc.layout_errors(SLURM) == [] and jc.layout_errors(TORQUE) == []
    assert jc.layout_errors({}) == []


@pytest.mark.parametrize("layout, says", [
    ({"cpuset": "slurm/job_{job}"}, "node.job_cgroup.cpuset: refused: moving QEMU into another cpuset cgroup"),
    ({"memory": "slurm/{user}/job_{job}"}, "unknown placeholder {user}"),
    ({"memory": "slurm/{job!r}"}, "unknown placeholder {job}"),
    ({"memory": "slurm/all_jobs"}, "must name the job"),
    ({"memory": "/slurm/job_{job}"}, "not a relative path"),
    ({"memory": "slurm/../job_{job}"}, "not a relative path"),
    ({"memory": "slurm//job_{job}"}, "not a relative path"),
    ({"memory": "job_{job"}, "node.job_cgroup.memory:"),
    ({"Memory!": "job_{job}"}, "not a cgroup controller name"),
])
def test_a_bad_layout_is_refused_naming_the_key(layout, says):
    errors = jc.layout_errors(layout)
    assert len(errors) == 1 and says in errors[0], errors


def test_the_watcher_refuses_to_start_on_a_bad_layout():
    worker = types.SimpleNamespace(config=types.SimpleNamespace(node=NodeConfig(job_cgroup={"cpuset": "x/{job}"})))
    with pytest.raises(jc.LayoutError, match="cpuset"):
        jc.start(worker, threading.Event())


def test_no_layout_no_watcher_and_a_plain_start():
    """The default: nothing changes where the scheduler has no cgroup (the single-host stack)."""
    assert NodeConfig().job_cgroup == {}
    calls = []
    hv = types.SimpleNamespace(start=lambda dom, **kw: calls.append(("start", kw)),
                               resume=lambda dom: calls.append(("resume",)))
    worker = types.SimpleNamespace(config=types.SimpleNamespace(node=NodeConfig()), hv=hv, node="n1")
    assert jc.start(worker, threading.Event()) is None
    jc.start_guest(worker, "dom", "12", types.SimpleNamespace(name="vt-12-n1-0"))
    assert calls == [("start", {})]


def test_job_paths_fill_in_the_job_the_owner_and_the_node():
    assert jc.job_paths(SLURM, "123", 1001, "vm") == {
        "memory": "slurm_vm/uid_1001/job_123/step_extern/task_0",
        "cpuacct": "slurm_vm/uid_1001/job_123/step_extern/task_0",
        "freezer": "slurm_vm/uid_1001/job_123/step_extern"}
    assert jc.job_paths(TORQUE, "12[3].server", 1001, "n1") == {"memory": "torque/12[3].server",
                                                                "cpuacct": "torque/12[3].server"}


@pytest.mark.parametrize("job, uid, node", [("../1", 1000, "n1"), ("1/2", 1000, "n1"), ("..", 1000, "n1"),
                                            ("1", 1000, "n1/../x"), ("1", -1, "n1"), ("1", True, "n1"),
                                            ("1", "1000", "n1"), ("", 1000, "n1")])
def test_a_job_id_node_or_uid_that_is_no_plain_name_never_becomes_a_path(job, uid, node):
    with pytest.raises(jc.LayoutError):
        jc.job_paths(SLURM, job, uid, node)


def test_proc_cgroup_lines_and_what_to_move():
    text = ("9:name=systemd:/\n8:pids:/\n6:freezer:/machine/qemu-2-vt.libvirt-qemu\n"
            "4:memory:/machine/qemu-2-vt.libvirt-qemu\n3:cpuset:/machine/qemu-2-vt.libvirt-qemu/emulator\n"
            "2:cpu,cpuacct:/machine/qemu-2-vt.libvirt-qemu/emulator\n0::/machine/qemu-2-vt.libvirt-qemu/emulator\n")
    current = jc.parse_proc_cgroup(text)
    assert current["memory"] == "machine/qemu-2-vt.libvirt-qemu" and current["cpuacct"] == current["cpu"]
    assert "" not in current  # the unified hierarchy's line is not a controller
    wanted = jc.job_paths(SLURM, "7", 0, "vm")
    assert jc.to_move(current, wanted) == ["cpuacct", "freezer", "memory"]
    assert jc.to_move({**current, **wanted}, wanted) == []


def test_qemu_pid_of_reads_libvirts_name_argument():
    cmd = b"\0".join([b"/usr/bin/qemu-system-x86_64", b"-name", b"guest=vt-1-n1-0,debug-threads=on", b"-S", b""])
    assert jc.qemu_pid_of(cmd, "vt-1-n1-0")
    assert not jc.qemu_pid_of(cmd, "vt-1-n1")  # a prefix is another guest
    assert not jc.qemu_pid_of(b"sleep\0guest=vt-1-n1-0\0", "vt-1-n1-0")


def _tree(root, paths):
    for controller, path in paths.items():
        d = root / controller / path
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("")


@pytest.fixture
def fake_qemu(tmp_path):
    """A process whose command line is a libvirt QEMU's, and libvirt's pid file for it."""
    name = "vt-77-n1-0"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name",
                             f"guest={name},debug-threads=on"])
    for _ in range(200):  # until the child has exec'd (its command line is the new program's)
        if b"-name" in open(f"/proc/{proc.pid}/cmdline", "rb").read():
            break
        time.sleep(0.01)
    run = tmp_path / "run"
    run.mkdir()
    (run / f"{name}.pid").write_text(f"{proc.pid}\n")
    yield name, proc.pid, run
    proc.kill()
    proc.wait()


def test_qemu_pid_is_libvirts_pid_file_checked_against_the_process(fake_qemu, tmp_path):
    name, pid, run = fake_qemu
    assert jc.qemu_pid(name, str(run)) == pid
    assert jc.qemu_pid("vt-other-n1-0", str(run)) is None  # no pid file
    (run / "vt-stale-n1-0.pid").write_text(f"{os.getpid()}\n")  # a stale file naming another process
    assert jc.qemu_pid("vt-stale-n1-0", str(run)) is None
    os.symlink(run / f"{name}.pid", run / "vt-link-n1-0.pid")  # never followed
    assert jc.qemu_pid("vt-link-n1-0", str(run)) is None


def test_move_writes_the_pid_into_every_controllers_cgroup_procs_or_none(tmp_path):
    root = tmp_path / "cgroup"
    wanted = jc.job_paths(SLURM, "77", 1000, "vm")
    partial = {c: p for c, p in wanted.items() if c != "freezer"}
    _tree(root, partial)
    # Slurm makes a job's cgroups one controller after another: none is written until all exist.
    assert jc.move(4242, wanted, str(root)) == ["freezer"]
    assert all((root / c / p / "cgroup.procs").read_text() == "" for c, p in partial.items())
    _tree(root, wanted)
    assert jc.move(4242, wanted, str(root)) == []
    assert all((root / c / p / "cgroup.procs").read_text() == "4242\n" for c, p in wanted.items())


def test_adopt_places_waits_or_finds_the_guest_gone(fake_qemu, tmp_path, monkeypatch):
    name, pid, _ = fake_qemu
    root = tmp_path / "cgroup"
    wanted = jc.job_paths(SLURM, "77", 1000, "vm")
    where = {"memory": "machine/qemu-1-x.libvirt-qemu", "freezer": "machine/qemu-1-x.libvirt-qemu",
             "cpuacct": "", "cpuset": "machine/qemu-1-x.libvirt-qemu/emulator"}
    monkeypatch.setattr(jc, "placed", lambda p: dict(where))
    assert jc.adopt(SLURM, str(root), name, "77", 1000, "vm", pid=pid) == "waiting"
    _tree(root, wanted)
    assert jc.adopt(SLURM, str(root), name, "77", 1000, "vm", pid=pid) == "placed"
    assert (root / "memory" / wanted["memory"] / "cgroup.procs").read_text() == f"{pid}\n"
    assert not (root / "cpuset").exists()  # libvirt's pinning is left alone
    where.update(wanted)
    (root / "memory" / wanted["memory"] / "cgroup.procs").write_text("")
    assert jc.adopt(SLURM, str(root), name, "77", 1000, "vm", pid=pid) == "placed"  # already there: no write
    assert (root / "memory" / wanted["memory"] / "cgroup.procs").read_text() == ""
    assert jc.adopt(SLURM, str(root), "vt-none-n1-0", "77", 1000, "vm") == "gone"


class _Hv:
    def __init__(self, domains, active):
        self.domains, self.active, self.calls = domains, active, []

    def start(self, dom, paused=False):
        self.calls.append(("start", paused))

    def resume(self, dom):
        self.calls.append(("resume",))

    def active_names(self):
        return set(self.active)

    def vtorque_domains(self):
        return dict(self.domains)


def _worker(tmp_path, hv, layout=SLURM):
    node = NodeConfig(name="vm", job_cgroup=layout, job_cgroup_root=str(tmp_path / "cgroup"))
    return types.SimpleNamespace(config=types.SimpleNamespace(node=node), hv=hv, node="vm")


def test_a_guest_starts_paused_is_moved_then_runs(tmp_path, monkeypatch):
    hv = _Hv({}, [])
    worker = _worker(tmp_path, hv)
    order = []
    monkeypatch.setattr(jc, "adopt", lambda *a, **k: order.append(("adopt", hv.calls[-1])) or "placed")
    guest = types.SimpleNamespace(name="vt-5-vm-0", owner=types.SimpleNamespace(uid=1000))
    jc.start_guest(worker, "dom", "5", guest)
    assert hv.calls == [("start", True), ("resume",)] and order == [("adopt", ("start", True))]


def test_a_failed_move_never_leaves_the_guest_paused(tmp_path, monkeypatch):
    hv = _Hv({}, [])

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(jc, "adopt", refuse)
    guest = types.SimpleNamespace(name="vt-5-vm-0", owner=types.SimpleNamespace(uid=1000))
    jc.start_guest(_worker(tmp_path, hv), "dom", "5", guest)
    assert hv.calls == [("start", True), ("resume",)]


def test_the_watcher_moves_this_nodes_running_guests_once_their_job_cgroup_exists(tmp_path, monkeypatch):
    me = os.getuid()
    import pwd

    owner = pwd.getpwuid(me).pw_name
    domains = {"vt-5-vm-0": {"job": "5", "owner": owner, "node": "vm"},
               "vt-6-vm-0": {"job": "6", "owner": owner, "node": "vm"},  # defined, not running
               "vt-7-n2-0": {"job": "7", "owner": owner, "node": "n2"},  # another node worker's
               "vt-8-vm-0": {"job": "8", "owner": "no-such-user-here", "node": "vm"}}
    hv = _Hv(domains, ["vt-5-vm-0", "vt-7-n2-0", "vt-8-vm-0"])
    worker = _worker(tmp_path, hv)
    where: dict[str, str] = {}
    monkeypatch.setattr(jc, "placed", lambda pid: dict(where))
    warnings = []
    monkeypatch.setattr(jc, "log", lambda logger, level, msg, **kw: warnings.append(msg))
    watcher = jc.Watcher(worker, pid_of=lambda name: 4242)
    states = watcher.tick(0.0)
    assert states == {"vt-5-vm-0": "waiting", "vt-8-vm-0": states["vt-8-vm-0"]}
    assert states["vt-8-vm-0"].startswith("error:")
    root = tmp_path / "cgroup"
    wanted = jc.job_paths(SLURM, "5", me, "vm")
    _tree(root, wanted)  # slurmd made the job's cgroups (after PrologSlurmctld)
    assert watcher.tick(1.0)["vt-5-vm-0"] == "placed"
    assert (root / "memory" / wanted["memory"] / "cgroup.procs").read_text() == "4242\n"
    assert not (root / "memory" / "slurm_vm" / "uid_0" / "job_7").exists()
    # A guest that never gets there is said once, after a while: a layout that names no real cgroup.
    watcher.tick(jc.WARN_AFTER + 5)
    watcher.tick(jc.WARN_AFTER + 10)
    assert warnings.count("guest still outside its job's cgroup") == 1


def test_the_admin_guides_layouts_load_and_are_these(tmp_path):
    import re
    from pathlib import Path

    guide = (Path(__file__).parents[2] / "docs" / "admin-guide.md").read_text()
    section = guide[guide.index("## 4b."):guide.index("## 5.")]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    loaded = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"{i}.toml"
        path.write_text(block)
        loaded.append(load_config(path, env={}).node.job_cgroup)
    assert loaded == [SLURM, TORQUE] and all(jc.layout_errors(layout) == [] for layout in loaded)


def test_the_layout_is_site_configuration(tmp_path):
    path = tmp_path / "vtorque.toml"
    path.write_text('[node]\njob_cgroup = {memory = "torque/{job}", cpuacct = "torque/{job}"}\n')
    config = load_config(path, env={})
    assert config.node.job_cgroup == TORQUE and config.node.job_cgroup_root == "/sys/fs/cgroup"
