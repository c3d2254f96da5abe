import msgspec
import pytest

from vtorque.shared import messages as m


def owner():
    return m.Owner(user="alice", uid=1000, gid=1000)


def test_every_message_round_trips_and_carries_its_envelope():
    started = m.JobStarted.new(job_id="12.srv", deadline=60.0, scheduler="torque", owner=owner(),
                               nodes=[m.NodeAllocation(host="n1", ncpus=2, cores=[0, 1])],
                               spec={"img": "tiny"}, ssh_authorized_keys=["ssh-ed25519 AAAA x"])
    back = m.decode(m.encode(started))
    assert back == started
    assert back.deadline > back.created_at and len(back.message_id) == 32


def test_decoding_is_strict():
    good = msgspec.json.decode(m.encode(m.TeardownGuests.new(job_id="1", deadline=5.0, node="n1")))
    with pytest.raises(msgspec.ValidationError):
        m.decode(msgspec.json.encode({**good, "extra": 1}))
    with pytest.raises(msgspec.ValidationError):
        m.decode(msgspec.json.encode({**good, "type": "LaunchMissiles"}))
    with pytest.raises(msgspec.ValidationError):
        m.decode(msgspec.json.encode({k: v for k, v in good.items() if k != "deadline"}))
    with pytest.raises(msgspec.DecodeError):
        m.decode(b"{not json")


def test_routing_keys_keep_job_ids_in_one_word():
    event = m.JobRejected.new(job_id="1.vm", deadline=5.0, reason="x")
    assert event.routing_key() == "job.1%2Evm.job_rejected"
    assert m.routing_word("a.b*#c") == "a%2Eb%2A%23c"


def test_expiry():
    cmd = m.TeardownGuests.new(job_id="1", deadline=-1.0, node="n")
    assert cmd.expired()


def test_the_contract_schema_lists_every_message():
    schema = m.contract_schema()
    assert {t.__name__ for t in m.MESSAGE_TYPES} <= set(schema["$defs"])
