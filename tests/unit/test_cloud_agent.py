"""The Debian cloud guest's agent (tests/guest/cloud/vtorque-agent), its pure part and its port reader run here on
what the node worker's own `send_identity` writes: every value comes back as it was (newlines, quotes, `$(...)`
and backticks never run), anything but VT_ KEY=VALUE words is refused, and lines split across reads are joined."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import socket
import threading
from pathlib import Path

import pytest

from vtorque.services.node_worker import warm_boot
from vtorque.services.node_worker.identity_channel import IdentityChannel
from vtorque.services.node_worker.seed import seed_files
from vtorque.shared import messages as m

AGENT = Path(__file__).resolve().parents[2] / "tests/guest/cloud/vtorque-agent"


@pytest.fixture(scope="module")
def agent():
    loader = importlib.machinery.SourceFileLoader("vtorque_cloud_agent", str(AGENT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


GUEST = m.GuestPlan(name="vt-7-n1-0", node="n1", index=0, image="cloud", image_digest="a" * 64, vcpus=2, ram_mib=512,
                    cores=None, owner=m.Owner(user="alice", uid=1001, gid=1002), distro="debian",
                    ssh_authorized_keys=["ssh-ed25519 AAAA one", "ssh-ed25519 BBBB two 'quoted' $(touch /x) `id`"])
PEERS = [m.GuestPeer(name="vt-7-n1-0", node="n1", index=0, vcpus=2, address="10.200.0.1"),
         m.GuestPeer(name="vt-7-n2-0", node="n2", index=1, vcpus=2, address="10.200.0.2")]


def _wire(tmp_path: Path, env: bytes) -> bytes:
    """What send_identity puts on the channel for `env`."""
    a, b = socket.socketpair()
    with a, b:
        IdentityChannel(a).send_identity(env)
        a.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := b.recv(65536):
            out += chunk
    return out


def test_the_agent_reads_every_value_of_send_identity_as_it_was(agent, tmp_path):
    seed = seed_files(GUEST, "7.srv", PEERS)
    env = warm_boot.identity_env(seed, clock=1_700_000_000)
    wire = _wire(tmp_path, env)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, wire[:7]), os.write(w, wire[7:40]), os.write(w, wire[40:]),
                                              os.close(w)))
    writer.start()
    port = agent.Port.__new__(agent.Port)  # its reader over a pipe in place of the virtio port
    port.fd, port.buf = r, b""
    cmd, _, count = port.readline(0.01).partition(" ")
    assert cmd == "IDENTITY" and count.isdigit()
    got = agent.parse_env("\n".join(port.readline(0.01) for _ in range(int(count))))
    writer.join()
    os.close(r)
    assert got["VT_SSH_AUTHORIZED_KEYS"] == "\n".join(GUEST.ssh_authorized_keys)
    assert got["VT_NODEFILE"] == "vt-7-n1-0\nvt-7-n1-0\nvt-7-n2-0\nvt-7-n2-0\n"
    assert (got["VT_USER"], got["VT_UID"], got["VT_GID"], got["VT_HOSTNAME"]) == ("alice", "1001", "1002", GUEST.name)
    assert got["VT_CLOCK"] == "1700000000" and len(got["VT_RANDOM"]) == 64
    assert not Path("/x").exists()


@pytest.mark.parametrize("text", ["rm -rf /", "VT_A=1; reboot", "PATH=/tmp", "VT_A", "VT_A=1 other", "=1",
                                  "VT_$(id)=1", "VT_A='unterminated"])
def test_the_agent_refuses_anything_but_vt_key_value_words(agent, text):
    with pytest.raises(ValueError):
        agent.parse_env(text)


def test_an_empty_identity_is_empty(agent):
    assert agent.parse_env("") == {}
