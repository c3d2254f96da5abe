from datetime import UTC, datetime, timedelta

from vtorque.services.node_worker.reconcile import Domain, decide

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def dom(name, job="1", ready=True, boot=None, end=None):
    return Domain(name=name, job_id=job, boot_deadline=boot, end_by=end, ready=ready)


def test_a_finished_job_loses_its_guests_and_a_running_one_keeps_them():
    alive = {"1": True, "2": False}.get
    removals, _ = decide([dom("a", "1"), dom("b", "2"), dom("c", "2")], {}, set(), alive, NOW, 0)
    assert [(r.name, r.reason) for r in removals] == [("b", "job 2 is no longer running"),
                                                      ("c", "job 2 is no longer running")]


def test_an_unknown_answer_removes_nothing():
    removals, _ = decide([dom("a")], {}, set(), lambda j: None, NOW, 0)
    assert removals == []


def test_walltime_and_boot_deadline_with_grace():
    late = NOW - timedelta(minutes=5)
    soon = NOW - timedelta(seconds=30)
    doms = [dom("w", end=late), dom("w2", end=soon), dom("b", ready=False, boot=late),
            dom("b2", ready=True, boot=late)]
    removals, _ = decide(doms, {}, set(), lambda j: None, NOW, 0)
    assert {r.name for r in removals} == {"w", "b"}


def test_files_without_a_domain_go_unless_booting_or_fresh():
    dirs = {"old": 1000.0, "fresh": 1990.0, "booting": 1000.0, "has-domain": 1000.0}
    _, stale = decide([dom("has-domain")], dirs, {"booting"}, lambda j: True, NOW, 2000.0)
    assert stale == ["old"]


def test_a_booting_guest_is_never_removed():
    removals, _ = decide([dom("x", "9")], {}, {"x"}, lambda j: False, NOW, 0)
    assert removals == []
