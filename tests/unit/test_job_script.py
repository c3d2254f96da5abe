from vtorque.shared.job_script import inline_vm_options, parse_header, render_wrapper, user_script_from_stdin

USER = "#!/bin/bash\n#PBS -N demo\n#PBS -vm img=tiny,vcpus=2\n#SBATCH --time=5\necho hi\n#PBS -vm ignored=1\n"


def test_inline_vm_lines_come_from_the_leading_block_only():
    assert inline_vm_options(USER) == ["img=tiny,vcpus=2"]


def test_wrapper_header_round_trips_and_keeps_directives():
    text = render_wrapper(USER, {"img": "tiny", "vcpus": "2"}, "ssh-ed25519 AAAA k", "/home/a/.vtorque/k",
                          "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "/opt/vtorque/venv/bin/vtorque-launch")
    header = parse_header(text)
    assert header.spec == {"img": "tiny", "vcpus": "2"}
    assert header.ssh_pubkeys == ["ssh-ed25519 AAAA k"]
    assert header.traceparent.startswith("00-")
    assert "#PBS -N demo" in text and "#SBATCH --time=5" in text and "#PBS -vm" not in text
    body = text.split("<<'VTORQUE_SCRIPT_END'\n", 1)[1].split("\nVTORQUE_SCRIPT_END", 1)[0]
    assert user_script_from_stdin(body).decode() == USER


def test_a_plain_script_has_no_header():
    assert parse_header("#!/bin/sh\necho hi\n") is None


def test_metadata_and_vm_scripts_travel_in_the_wrapper():
    text = render_wrapper("echo hi\n", {"img": "tiny", "vm_prologue": "/home/a/pre.sh"}, "ssh-ed25519 K", "/k",
                          None, "/opt/l", {"packages": ["htop"]})
    header = parse_header(text)
    assert header.user_metadata == {"packages": ["htop"]}
    assert "--vm-prologue /home/a/pre.sh" in text


def test_the_submit_time_travels_in_the_header():
    text = render_wrapper(
        "echo hi\n", {"img": "tiny"}, "ssh-ed25519 K", "/k", None, "/opt/l", None, 1795652523000000000
    )
    assert parse_header(text).submitted_ns == 1795652523000000000
    assert parse_header(render_wrapper("echo\n", {"img": "tiny"}, "k", "/k", None, "/l")).submitted_ns is None


def test_the_header_is_taken_apart_by_the_specs_own_parser():
    """One key=value parser (shared/spec.py split_pairs) for `-vm` and the header: the same text gives the same
    pairs, and an item without '=' names the spec as a malformed header, whoever wrote it."""
    import pytest

    from vtorque.shared.job_script import ScriptError
    from vtorque.shared.spec import parse_options

    text = render_wrapper("echo\n", {"img": "tiny", "vcpus": "2", "ram": "512M"}, "k", "/k", None, "/l")
    spec_line = next(line for line in text.splitlines() if line.startswith("# vtorque-spec: "))
    assert parse_header(text).spec == parse_options([spec_line.split(": ", 1)[1]])
    with pytest.raises(ScriptError, match="malformed vtorque-spec header: -vm vcpus: expected key=value"):
        parse_header("#!/bin/sh\n# vtorque-spec: img=tiny,vcpus\n")
    # Keys are judged by the validation at each trust boundary, not by the header's reader.
    assert parse_header("#!/bin/sh\n# vtorque-spec: img=tiny,,Colour=red\n").spec == {"img": "tiny", "Colour": "red"}
