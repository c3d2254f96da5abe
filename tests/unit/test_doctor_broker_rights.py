"""doctor's comparison of a vhost's rights with the topology table (cli/doctor.py broker_user_differences), on
listings as `rabbitmqctl list_permissions`/`list_topic_permissions` print them."""

from vtorque.cli.broker import permission_commands, plan_users
from vtorque.cli.doctor import broker_user_differences
from vtorque.shared import topology as t

PREFIX = "vtorque-"


def listings(nodes=("n1",)):
    """What `vtorque broker setup` leaves on the vhost, as rabbitmqctl lists it."""
    perms, topics = [], []
    for user in plan_users(list(nodes), None, PREFIX):
        for argv in permission_commands("v", user):
            (perms if argv[0] == "set_permissions" else topics).append(argv[3:])
    return perms, topics


def test_what_setup_makes_is_what_the_topology_derives():
    assert broker_user_differences("v", *listings(), PREFIX) == []


def test_a_widened_read_and_a_narrowed_topic_are_each_named():
    perms, topics = listings()
    perms = [[u, c, w, ".*" if u == "vtorque-stager" else r] for u, c, w, r in perms]
    topics = [[u, e, "^$" if u == "vtorque-bridge" and e == "vtorque.commands" else w, r] for u, e, w, r in topics]
    found = broker_user_differences("v", perms, topics, PREFIX)
    assert len(found) == 2
    assert found[0] == f"vtorque-bridge topic rights on vtorque.commands are ('^$', '^$'), the topology gives " \
                       f"{t.broker_permissions('bridge').topics['vtorque.commands']}"
    assert found[1] == f"vtorque-stager read is '.*', the topology gives {t.broker_permissions('stager').read!r}"


def test_guest_a_stranger_and_a_missing_part_are_named():
    perms, topics = listings()
    perms = [p for p in perms if p[0] != "vtorque-hook"] + [["guest", ".*", ".*", ".*"], ["monitor", "", "", ".*"]]
    found = broker_user_differences("v", perms, [t_ for t_ in topics if t_[0] != "vtorque-hook"], PREFIX)
    assert found == ["guest has rights on vhost v (delete it: vtorque broker setup --remove-guest)",
                     "monitor has rights on vhost v but is no vtorque part",
                     "vtorque-hook has no rights on vhost v (vtorque broker setup)"]
