"""The per-guest cloud-init NoCloud seed: its files' contents. Pure; shared/ writes nothing here."""

from __future__ import annotations

import json
import shlex

from vtorque.shared import messages as m
from vtorque.shared.config import GuestMount

from .domain import USER_NET_MAC

READY_MESSAGE = "VTORQUE-GUEST-READY uptime=$UPTIME"


def seed_files(guest: m.GuestPlan, job_id: str, peers: list[m.GuestPeer] | None = None,
               network: m.JobNetwork | None = None, mac: str | None = None,
               mounts: list[GuestMount] | None = None) -> dict[str, bytes]:
    """meta-data and user-data for cloud images; vtorque.env for minimal guests that have no cloud-init.
    The user's own cloud-init keys (already checked: shared/spec.py validate_user_metadata) are merged in;
    vtorque's keys win."""
    owner = guest.owner
    home = "/root" if owner.uid == 0 else f"/home/{owner.user}"
    meta = {"instance-id": guest.name, "local-hostname": guest.name}
    if guest.distro == "osv":
        # OSv has no users or sshd: its cloud-init takes files and a command to run (vTorque's metadata.osv).
        user_data = "#cloud-config\n" + json.dumps({**guest.user_metadata, "files": {
            "/etc/vtorque.env": f"VT_JOB_ID={shlex.quote(job_id)}\n"}}, indent=1, sort_keys=True) + "\n"
        return {"meta-data": json.dumps(meta, indent=1).encode() + b"\n", "user-data": user_data.encode(),
                "vtorque.env": f"VT_HOSTNAME={shlex.quote(guest.name)}\nVT_JOB_ID={shlex.quote(job_id)}\n".encode()}
    user = {
        "name": owner.user,
        "uid": owner.uid,
        "homedir": home,
        "shell": "/bin/sh",
        "lock_passwd": True,
        "ssh_authorized_keys": guest.ssh_authorized_keys,
    }
    ours: dict = {"hostname": guest.name, "users": [user], "ssh_pwauth": False, "disable_root": owner.uid != 0,
                  # One host key type is enough for the job's own ssh: under TCG each more costs seconds of boot.
                  "ssh_genkeytypes": ["ed25519"],
                  # cloud-init writes this to the console when it is done: the readiness marker of cloud images
                  # (readiness.py); the user's own final_message follows it.
                  "final_message": " ".join(filter(None, [READY_MESSAGE, guest.user_metadata.get("final_message")]))}
    if owner.uid != 0:
        # The owner's own gid: cloud-init's users have no gid key, and useradd would make a group of its choosing.
        # bootcmd runs before users-groups; the group keeps the gid if the image has one already.
        user["primary_group"] = str(owner.gid)
        ours["bootcmd"] = [["sh", "-c", 'getent group "$1" >/dev/null || groupadd -g "$1" "$2"', "vtorque-gid",
                            str(owner.gid), owner.user]]
    if guest.distro in ("redhat", "centos"):
        user["shell"] = "/bin/bash"
    env = {
        "VT_HOSTNAME": guest.name,
        "VT_USER": owner.user,
        "VT_UID": str(owner.uid),
        "VT_GID": str(owner.gid),
        "VT_HOME": home,
        "VT_JOB_ID": job_id,
        "VT_SSH_AUTHORIZED_KEYS": "\n".join(guest.ssh_authorized_keys),
    }
    files: dict[str, bytes] = {}
    if peers:
        ranked = sorted(peers, key=lambda p: p.index)
        # As PBS_NODEFILE lists a host once per core: each guest once per vCPU, rank 0 first.
        nodefile = "".join(f"{p.name}\n" * p.vcpus for p in ranked)
        env["VT_NODEFILE"] = nodefile
        write_files: list[dict[str, object]] = [
            {"path": "/etc/vtorque/nodefile", "permissions": "0644", "content": nodefile}]
        if network and mac:
            me = next(p for p in peers if p.name == guest.name)
            hosts = "".join(f"{p.address} {p.name}\n" for p in ranked)
            env |= {"VT_JOB_IP": f"{me.address}/{network.prefix}", "VT_JOB_MAC": mac, "VT_HOSTS": hosts}
            files["network-config"] = json.dumps({"version": 2, "ethernets": {"jobnet": {
                "match": {"macaddress": mac}, "addresses": [f"{me.address}/{network.prefix}"]},
                # A network-config turns off cloud-init's fallback DHCP: the user-mode NIC (sshd's port forward) too.
                "usernet": {"match": {"macaddress": USER_NET_MAC}, "dhcp4": True}}}, indent=1).encode()
            write_files.append({"path": "/etc/hosts", "permissions": "0644", "append": True, "content": hosts})
            ours["manage_etc_hosts"] = False
        ours["write_files"] = write_files
    if mounts:
        def fill(text: str) -> str:
            return text.replace("{user}", owner.user).replace("{home}", home)

        table = [[fill(mt.source), fill(mt.target), mt.fstype, mt.options, "0", "0"] for mt in mounts]
        ours["mounts"] = table
        env["VT_MOUNTS"] = "".join(" ".join(row[:4]) + "\n" for row in table)
    user_data = "#cloud-config\n" + json.dumps({**guest.user_metadata, **ours}, indent=1, sort_keys=True) + "\n"
    env_text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items())
    return files | {
        # JSON is a subset of YAML: cloud-init reads it, and no YAML library is needed to write it safely.
        "meta-data": json.dumps(meta, indent=1).encode() + b"\n",
        "user-data": user_data.encode(),
        "vtorque.env": env_text.encode(),
    }
