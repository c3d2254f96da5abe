"""`vtorque doctor`'s job network check: what a node needs to carry a job's VXLAN segment."""

from vtorque.cli.checks import FAIL, OK, WARN
from vtorque.cli.doctor import job_network_problems
from vtorque.shared.config import NodeConfig

TOOLS = {"ip": "/usr/sbin/ip", "bridge": "/usr/sbin/bridge", "iptables": "/usr/sbin/iptables"}
HOST = {"127.0.0.1": ("lo", 65536), "10.0.0.11": ("eth0", 1500), "10.1.0.11": ("ib0", 2044)}


def test_a_cluster_node_with_the_tools_and_its_address_is_fine():
    check = job_network_problems(NodeConfig(job_network_localaddr="10.0.0.11"), TOOLS, HOST)
    assert check.status == OK and "eth0" in check.detail and "UDP 789" in check.detail


def test_what_breaks_or_weakens_the_job_network_is_said():
    assert job_network_problems(NodeConfig(), {**TOOLS, "iptables": None}, HOST).status == FAIL
    wrong = job_network_problems(NodeConfig(job_network_localaddr="10.9.9.9"), TOOLS, HOST)
    assert wrong.status == FAIL and "not an address of this host" in wrong.detail
    user_port = job_network_problems(NodeConfig(job_network_localaddr="10.0.0.11", job_network_port=4789), TOOLS, HOST)
    assert user_port.status == WARN and "a user can bind it first" in user_port.detail
    big = job_network_problems(NodeConfig(job_network_localaddr="10.1.0.11", job_network_mtu=2000), TOOLS, HOST)
    assert big.status == WARN and "exceeds ib0's 2044" in big.detail
    loop = job_network_problems(NodeConfig(), TOOLS, HOST)
    assert loop.status == WARN and "one test host only" in loop.detail
