"""IOcm decisions (pure): how many I/O cores a guest gets from its measured I/O rate, with hysteresis."""

import pytest
from conftest import FakeHost

from vtorque.services.node_worker import iocm
from vtorque.services.node_worker.iocm import Counters, Policy, State, decide, io_rate

MB = 2**20
POLICY = Policy(high=10 * MB, low=4 * MB, up_samples=2, down_samples=3)


def run(rates, min_cores=1, max_cores=3, start=1, policy=POLICY):
    state, trail = State(start), []
    for r in rates:
        state = decide(state, r * MB, policy, min_cores, max_cores)
        trail.append(state.active)
    return trail


def test_widens_after_consecutive_high_samples_one_core_at_a_time():
    assert run([50, 50, 50, 50, 50]) == [1, 2, 2, 3, 3]


def test_a_single_spike_does_not_widen():
    assert run([50, 0, 50, 0, 50, 0]) == [1] * 6


def test_narrows_only_after_a_longer_quiet_spell():
    assert run([0, 0, 0, 0, 0, 0], start=3) == [3, 3, 2, 2, 2, 1]


def test_steady_load_between_the_thresholds_does_not_flap():
    # 15 MB/s: > high on 1 core, so it widens to 2 (7.5 each, below high); on 1 core it would be 15 > low,
    # so it never narrows back: hysteresis holds it at 2.
    assert run([15] * 12) == [1, 2] + [2] * 10


def test_stays_within_min_and_max():
    assert run([1000] * 10, min_cores=1, max_cores=2)[-1] == 2
    assert run([0] * 10, min_cores=2, max_cores=3, start=3)[-1] == 2
    # A state outside the bounds (plan changed, bad read-back) is brought inside at once.
    assert decide(State(5), 0, POLICY, 1, 2).active == 2
    assert decide(State(0), 0, POLICY, 1, 2).active == 1


def test_min_equals_max_never_moves():
    assert run([1000, 1000, 0, 0, 0, 0], min_cores=1, max_cores=1) == [1] * 6


def test_policy_rejects_thresholds_without_a_gap():
    with pytest.raises(ValueError):
        Policy(high=1, low=1)
    with pytest.raises(ValueError):
        Policy(up_samples=0)


def test_rate_from_counters_ignores_resets_and_time_going_nowhere():
    assert io_rate(Counters(at=10, bytes=0), Counters(at=12, bytes=4 * MB)) == 2 * MB
    assert io_rate(Counters(at=10, bytes=9 * MB), Counters(at=12, bytes=1 * MB)) == 0
    assert io_rate(Counters(at=10, bytes=0), Counters(at=10, bytes=5)) == 0


def test_stats_tuples_from_libvirt():
    assert iocm.block_bytes((3, 4096, 2, 8192, 0)) == (12288, 5)
    assert iocm.block_bytes((-1, -1, 2, 100, 0)) == (100, 2)  # -1: libvirt does not know
    assert iocm.interface_bytes((100, 2, 0, 0, 50, 1, 0, 0)) == (150, 3)


GUEST_XML = """<domain type='qemu'><name>vt-1-n1-0</name><iothreads>2</iothreads>
<cputune><vcpupin vcpu='0' cpuset='0'/><iothreadpin iothread='1' cpuset='3'/><iothreadpin iothread='2' cpuset='3'/>
</cputune><devices><disk><target dev='vda'/></disk><disk><target dev='vdb'/></disk>
<interface type='network'><target dev='vnet3'/></interface></devices></domain>"""
META = {"job": "1", "iocm-cores": "3,4", "iocm-min": "1", "iocm-max": "2"}


def test_guest_facts_from_the_live_definition():
    g = iocm.guest_iocm(GUEST_XML, META)
    assert (g.name, g.io_cores, g.min_cores, g.max_cores) == ("vt-1-n1-0", [3, 4], 1, 2)
    assert g.iothreads == [1, 2] and g.disks == ["vda", "vdb"] and g.interfaces == ["vnet3"]
    assert g.pinned == [3] and g.active_now() == 1
    widened = GUEST_XML.replace("cpuset='3'", "cpuset='3-4'")
    assert iocm.guest_iocm(widened, META).active_now() == 2
    # Pinned somewhere that is not a prefix of its I/O cores (someone re-pinned by hand): back to min.
    odd = GUEST_XML.replace("cpuset='3'", "cpuset='4'")
    assert iocm.guest_iocm(odd, META).active_now() == 1
    assert iocm.guest_iocm(GUEST_XML, {"job": "1"}) is None


def test_cpuset_and_cpumap():
    assert iocm.parse_cpuset("0-2,5") == [0, 1, 2, 5]
    assert iocm.cpumap([1, 3], 4) == (False, True, False, True)


def test_vhost_plan_one_worker_per_core_devices_spread():
    workers = [iocm.VhostWorker("w.0", 3, ["d.1"]), iocm.VhostWorker("w.1", 7, [])]
    create, remove, placement = iocm.plan_vhost(workers, ["d.2", "d.1"], [3, 4])
    assert create == [4] and remove == ["w.1"] and placement == {"d.1": 0, "d.2": 1}
    assert iocm.plan_vhost([], ["d.1"], []) == ([], [], {})


def test_without_the_skvm_module_libvirt_pins(fake_host):
    # Neither injected host (2 cores, 16 cores on 2 NUMA nodes) has sKVM's vhost interface.
    assert not iocm.SkvmIocm.present()
    assert iocm.detect_backend().name == "libvirt"
    assert iocm.capabilities() == ["iocm"]
    assert iocm.IocmController(hv=None, stop=None).backend.name == "libvirt"


@pytest.mark.parametrize("cores,numa_nodes", [(2, 1), (16, 2)])
def test_with_the_skvm_module_its_interface_is_used(make_fake_host, cores, numa_nodes):
    host = make_fake_host(FakeHost(f"{cores}-core-skvm", cores=cores, numa_nodes=numa_nodes, skvm=True))
    assert iocm.SkvmIocm.present() and iocm.SkvmIocm().root == host.vhost
    assert iocm.detect_backend().name == "skvm"
    assert iocm.capabilities() == ["iocm", "iocm-skvm"]
    assert iocm.IocmController(hv=None, stop=None).backend.name == "skvm"


def test_skvm_detection_needs_the_worker_interface(tmp_path):
    (tmp_path / "worker").mkdir()
    (tmp_path / "dev").mkdir()
    assert not iocm.SkvmIocm.present(str(tmp_path))
    (tmp_path / "worker" / "create").write_text("")
    assert iocm.SkvmIocm.present(str(tmp_path))
    assert iocm.detect_backend(str(tmp_path)).name == "skvm"
    assert iocm.capabilities(str(tmp_path)) == ["iocm", "iocm-skvm"]


def test_policy_from_config_names_the_bad_key():
    from vtorque.shared.config import NodeConfig

    policy = iocm.policy_from(NodeConfig(iocm_widen_mib_s=8, iocm_narrow_mib_s=2))
    assert (policy.high, policy.low, policy.up_samples, policy.down_samples) == (8 * MB, 2 * MB, 2, 5)
    with pytest.raises(ValueError, match=r"node.iocm_narrow_mib_s \(9\) must be at least 0 and below"):
        iocm.policy_from(NodeConfig(iocm_widen_mib_s=8, iocm_narrow_mib_s=9))
    with pytest.raises(ValueError, match="node.iocm_narrow_samples: must be at least 1"):
        iocm.policy_from(NodeConfig(iocm_narrow_samples=0))
