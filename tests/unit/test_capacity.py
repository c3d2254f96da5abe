from datetime import timedelta

from vtorque.services.scheduler_bridge.capacity import check_nodes
from vtorque.shared import messages as m
from vtorque.shared.config import Config, ImageEntry, ImagesConfig, SpecConfig
from vtorque.shared.spec import validate

CONFIG = Config(images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256="a" * 64, kernel="/k")}))


def beat(node, caps=("tcg", "direct-kernel-boot", "iocm", "vrdma-ivshmem"), free=4096, age=0.0):
    b = m.NodeHeartbeat.new(job_id="", deadline=30.0, node=node, cores=4, mem_free_mib=free, guests_running=0,
                            domain_type="qemu", capabilities=list(caps), interval=10.0)
    return b, b.created_at + timedelta(seconds=age)


def nodes(*hosts):
    return [m.NodeAllocation(host=h, ncpus=2) for h in hosts]


def test_capable_fresh_nodes_pass():
    b, now = beat("n1")
    assert check_nodes(validate({"img": "tiny", "vrdma": "true", "iocm": "true"}, CONFIG), nodes("n1"),
                       {"n1": b}, CONFIG, now) is None


def test_a_silent_or_stale_node_is_a_retryable_problem():
    b, now = beat("n1", age=31)
    spec = validate({"img": "tiny"}, CONFIG)
    unfit = check_nodes(spec, nodes("n1"), {"n1": b}, CONFIG, now)
    assert unfit.retryable and "n1" in unfit.reason and "31 s ago" in unfit.reason
    fresh, now = beat("n1")
    unfit = check_nodes(spec, nodes("n1", "n2"), {"n1": fresh}, CONFIG, now)
    assert unfit.retryable and "node n2" in unfit.reason and "never" in unfit.reason


def test_missing_capabilities_fail_for_good_naming_the_node():
    b, now = beat("n1", caps=("tcg", "direct-kernel-boot"))
    for options, word in [({"vrdma": "true"}, "vRDMA"), ({"iocm": "true"}, "IOcm")]:
        unfit = check_nodes(validate({"img": "tiny", **options}, CONFIG), nodes("n1"), {"n1": b}, CONFIG, now)
        assert not unfit.retryable and "node n1" in unfit.reason and word in unfit.reason
    required = Config(images=CONFIG.images, spec=SpecConfig(vrdma_require=["sriov-vf"]))
    b2, _ = beat("n1")
    unfit = check_nodes(validate({"img": "tiny", "vrdma": "true"}, required), nodes("n1"), {"n1": b2}, required, now)
    assert "sriov-vf" in unfit.reason and "ivshmem" in unfit.reason


def test_too_little_free_memory_waits():
    b, now = beat("n1", free=100)
    unfit = check_nodes(validate({"img": "tiny", "ram": "256M"}, CONFIG), nodes("n1"), {"n1": b}, CONFIG, now)
    assert unfit.retryable and "100 MiB free" in unfit.reason
