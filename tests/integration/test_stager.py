"""The stager as it runs (`vtorque run stager` processes) on the real RabbitMQ, in a vhost of the test's own,
with http(s) sources served from 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vtorque.shared import messages as m
from vtorque.shared.bus import EventWaiter, Publisher
from vtorque.shared.image_store import ImageStore

from . import stager_support as ss

MiB = 2**20


@pytest.fixture(scope="module")
def broker():
    with ss.vhost() as url:
        yield url


@pytest.fixture
def server():
    with ss.ImageServer() as srv:
        yield srv


@pytest.fixture
def site(tmp_path, broker):
    return ss.Site(tmp_path, broker, tmp_path / "store")


@pytest.fixture
def services():
    started: list[ss.ServiceProcess] = []
    yield started
    for proc in started:
        proc.stop()


def answers(events, kind):
    return {e.job_id: e for e in events if isinstance(e, kind)}


def test_three_stagers_and_twenty_requests_make_one_download(site, server, services, tmp_path):
    digest = ss.make_image(tmp_path / "img.raw", 48 * MiB, seed=1)
    url = server.add("img.raw", tmp_path / "img.raw", rate=40 * MiB)  # ~1.2 s: the requests overlap the copy
    site.catalog["img"] = {"source": url, "sha256": digest, "format": "raw"}
    site.write()
    services += [ss.ServiceProcess(site, "stager") for _ in range(3)]
    waiter = EventWaiter(site.broker_url, [f"image.{digest}.#"])
    publisher = Publisher(site.broker_url)
    jobs = [f"sf-{i}" for i in range(20)]
    try:
        for job in jobs:
            publisher.publish(m.StageImage.new(job_id=job, deadline=120.0, image="img", digest=digest))
        events = ss.events_until(waiter, lambda ev: len(answers(ev, m.ImageStaged)) == 20
                                 or answers(ev, m.ImageStageFailed), timeout=120)
    finally:
        waiter.close()
        publisher.close()
    staged = answers(events, m.ImageStaged)
    assert set(staged) == set(jobs), answers(events, m.ImageStageFailed)
    assert sorted(e.cached for e in staged.values()) == [False] + [True] * 19
    store = ImageStore(site.store)
    copies = [j for j in store.read_journal() if j["event"] == "copied"]
    assert len(copies) == 1 and copies[0]["digest"] == digest  # the store's own count of copies
    assert len(server.gets("img.raw")) == 1  # and the server saw one download
    assert ss.sha256_of(store.path(digest)) == digest
    progress = [e for e in events if isinstance(e, m.ImageStagingProgress)]
    assert progress and progress[-1].bytes == 48 * MiB and progress[-1].total == 48 * MiB
    assert all(p.rate > 0 for p in progress)
    # Every request was answered by one of the three processes, and more than one of them took part.
    logs = [s.text() for s in services]
    assert sum(text.count('"image staged"') for text in logs) == 20
    assert sum(1 for text in logs if '"image staged"' in text) >= 2
    assert not list((site.store / "tmp").iterdir()) and not list((site.store / "wants" / digest).iterdir())


def test_a_deleted_job_stops_a_staging_nobody_else_needs(site, server, services, tmp_path):
    digest = ss.make_image(tmp_path / "slow.raw", 64 * MiB, seed=2)
    url = server.add("slow.raw", tmp_path / "slow.raw", rate=8 * MiB)  # 8 s if nobody stops it
    site.catalog["slow"] = {"source": url, "sha256": digest, "format": "raw"}
    site.write()
    services.append(ss.ServiceProcess(site, "stager"))
    waiter = EventWaiter(site.broker_url, [f"image.{digest}.#"])
    publisher = Publisher(site.broker_url)
    try:
        publisher.publish(m.StageImage.new(job_id="del-1", deadline=120.0, image="slow", digest=digest))
        ss.events_until(waiter, lambda ev: any(isinstance(e, m.ImageStagingProgress) for e in ev))
        publisher.publish(m.JobDeleted.new(job_id="del-1", deadline=60.0, scheduler="torque", reason="deleted"))
        events = ss.events_until(waiter, lambda ev: answers(ev, m.ImageStageCancelled) or answers(ev, m.ImageStaged)
                                 or answers(ev, m.ImageStageFailed), timeout=60)
    finally:
        waiter.close()
        publisher.close()
    cancelled = answers(events, m.ImageStageCancelled)
    assert "del-1" in cancelled and "no job needs it" in cancelled["del-1"].reason
    store = ImageStore(site.store)
    assert not store.has(digest)
    assert [j["event"] for j in store.read_journal()] == ["cancelled"]
    assert not list((site.store / "tmp").iterdir())  # a cancelled download leaves nothing behind
    assert sum(r.status in (200, 206) for r in server.gets("slow.raw")) == 1


def test_a_staging_another_job_still_wants_goes_on(site, server, services, tmp_path):
    digest = ss.make_image(tmp_path / "shared.raw", 32 * MiB, seed=3)
    url = server.add("shared.raw", tmp_path / "shared.raw", rate=12 * MiB)
    site.catalog["shared"] = {"source": url, "sha256": digest, "format": "raw"}
    site.write()
    services.append(ss.ServiceProcess(site, "stager"))  # 4 concurrent stagings: both requests are taken
    waiter = EventWaiter(site.broker_url, [f"image.{digest}.#"])
    publisher = Publisher(site.broker_url)
    try:
        for job in ("keep-a", "keep-b"):
            publisher.publish(m.StageImage.new(job_id=job, deadline=120.0, image="shared", digest=digest))
        ss.events_until(waiter, lambda ev: any(isinstance(e, m.ImageStagingProgress) for e in ev))
        publisher.publish(m.JobDeleted.new(job_id="keep-a", deadline=60.0, scheduler="slurm"))
        events = ss.events_until(waiter, lambda ev: answers(ev, m.ImageStaged).keys() >= {"keep-b"}
                                 or answers(ev, m.ImageStageCancelled), timeout=60)
    finally:
        waiter.close()
        publisher.close()
    assert not answers(events, m.ImageStageCancelled)
    assert ImageStore(site.store).has(digest)


def test_a_mismatch_fails_with_a_clear_event_and_leaves_nothing(site, server, services, tmp_path):
    ss.make_image(tmp_path / "bad.raw", 4 * MiB, seed=4)
    wrong = "0" * 64
    site.catalog["bad"] = {"source": server.add("bad.raw", tmp_path / "bad.raw"), "sha256": wrong, "format": "raw"}
    site.write()
    services.append(ss.ServiceProcess(site, "stager"))
    waiter = EventWaiter(site.broker_url, [f"image.{wrong}.#"])
    publisher = Publisher(site.broker_url)
    try:
        publisher.publish(m.StageImage.new(job_id="mm-1", deadline=60.0, image="bad", digest=wrong))
        events = ss.events_until(waiter, lambda ev: answers(ev, m.ImageStageFailed) or answers(ev, m.ImageStaged))
    finally:
        waiter.close()
        publisher.close()
    failed = answers(events, m.ImageStageFailed)["mm-1"]
    assert "sha256 mismatch" in failed.reason and "nothing was staged" in failed.reason
    assert not list((site.store / "sha256").iterdir()) and not list((site.store / "tmp").iterdir())


def test_images_pull_shows_progress_and_an_image_added_meanwhile_is_known(site, server, services, tmp_path):
    site.write()
    services.append(ss.ServiceProcess(site, "stager"))  # started before the image is in the catalog
    digest = ss.make_image(tmp_path / "pulled.raw", 24 * MiB, seed=5)
    url = server.add("pulled.raw", tmp_path / "pulled.raw", rate=16 * MiB)
    env = site.env(COLUMNS="100")
    add = subprocess.run([sys.executable, "-m", "vtorque.cli.main", "images", "add", "pulled", url],
                         env=env, capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    assert f"sha256 {digest[:12]}" in add.stdout and "raw" in add.stdout
    pull = subprocess.run(["script", "-qec", f"{sys.executable} -m vtorque.cli.main images pull pulled",
                           "/dev/null"], env=env, capture_output=True, text=True, timeout=120)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert "pulled: staged 24M" in pull.stdout
    assert "100%" in pull.stdout and "pulled" in pull.stdout  # the bar, drawn on the terminal
    again = subprocess.run([sys.executable, "-m", "vtorque.cli.main", "images", "pull", "pulled"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already in the store" in again.stdout
    assert ImageStore(site.store).has(digest)


def test_images_pull_of_a_failing_image_exits_non_zero_with_the_reason(site, server, services, tmp_path):
    ss.make_image(tmp_path / "gone.raw", 1 * MiB)
    site.catalog["gone"] = {"source": server.add("gone.raw", tmp_path / "gone.raw", status=404),
                            "sha256": "1" * 64, "format": "raw"}
    site.write()
    services.append(ss.ServiceProcess(site, "stager"))
    pull = subprocess.run([sys.executable, "-m", "vtorque.cli.main", "images", "pull", "gone"], env=site.env(),
                          capture_output=True, text=True, timeout=60)
    assert pull.returncode == 1
    assert "HTTP 404" in pull.stderr and pull.stderr.count("\n") == 1, pull.stderr


def test_only_root_changes_the_catalog_and_users_may_list(broker):
    tmp_path = Path(tempfile.mkdtemp(prefix="vtorque-users-"))  # pytest's tmp is root's alone
    os.chmod(tmp_path, 0o755)
    site = ss.Site(tmp_path, broker, tmp_path / "store")
    digest = ss.make_image(tmp_path / "u.raw", 1 * MiB)
    site.catalog["listed"] = {"source": str(tmp_path / "u.raw"), "sha256": digest, "format": "raw"}
    os.chmod(site.write(), 0o644)
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m",
              "vtorque.cli.main", "images"]
    env = site.env(HOME="/tmp")
    listed = subprocess.run(nobody + ["list"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "listed" in listed.stdout and digest[:12] in listed.stdout
    for args in (["add", "x", str(tmp_path / "u.raw")], ["remove", "listed"], ["update"], ["pull", "listed"]):
        refused = subprocess.run(nobody + args, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "only root" in refused.stderr, (args, refused.stderr)
    assert not (tmp_path / "images.toml").exists()
    shutil.rmtree(tmp_path)

