from vtorque.hooks import slurm
from vtorque.hooks.job_hook import Outcome, Verdict
from vtorque.hooks.torque import exit_codes


def test_torque_prologue_codes_follow_torque_rules():
    assert exit_codes.prologue_exit_code(Outcome(Verdict.READY), 0, 2) == 0
    assert exit_codes.prologue_exit_code(Outcome(Verdict.REJECTED), 0, 2) == 1
    assert exit_codes.prologue_exit_code(Outcome(Verdict.FAILED), 0, 2) == 2
    assert exit_codes.prologue_exit_code(Outcome(Verdict.FAILED), 1, 2) == 2
    assert exit_codes.prologue_exit_code(Outcome(Verdict.FAILED), 2, 2) == 1  # never an endless requeue


def test_slurm_cancels_rejections_and_the_last_failure():
    assert slurm.should_cancel(Outcome(Verdict.REJECTED), 0, 2)
    assert not slurm.should_cancel(Outcome(Verdict.FAILED), 1, 2)
    assert slurm.should_cancel(Outcome(Verdict.FAILED), 2, 2)


def test_slurm_cpus_per_node_expands():
    assert slurm.expand_cpus_per_node("4(x2),2", 3) == [4, 4, 2]
    assert slurm.expand_cpus_per_node("2", 1) == [2]
    assert slurm.Slurm().hostnames("a,b") == ["a", "b"]  # a plain list: no scontrol asked


def test_the_hooks_reply_queue_is_in_vtorques_namespace():
    """Not a broker-named amq.gen-…: a broker user limited to '^vtorque\\.' (admin guide §2) may declare it."""
    import re

    from vtorque.shared.hook_channel import queue_name

    name = queue_name(["job.12%2Evm.#", "image.abc.#"])
    assert re.fullmatch(r"vtorque\.hook\.12%2Evm\.[0-9a-f]{12}", name), name
    assert re.match(r"^vtorque\.", name)
    assert queue_name(["job.1%2Evm.#"]) != queue_name(["job.1%2Evm.#"])  # two waiters of one job: two queues
    assert queue_name([]).startswith("vtorque.hook.hook.")
    assert queue_name([], label="7%2Evm").startswith("vtorque.hook.7%2Evm.")


def test_every_broker_failure_is_broker_unreachable():
    import pika.exceptions
    import pytest

    from vtorque.shared.hook_channel import BrokerUnreachable, HookChannel, describe

    refused = pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED - access to queue 'x' refused")
    assert describe(refused) == "the broker refused: 403 ACCESS_REFUSED - access to queue 'x' refused"
    with pytest.raises(BrokerUnreachable, match="URL"):
        HookChannel("amqp://127.0.0.1:notaport/", [], attempts=1, timeout=0.5)
