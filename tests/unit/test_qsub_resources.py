from vtorque.cli.qsub_resources import fit, mem_to_mib


def test_raises_ppn_and_mem_and_says_so():
    out = fit(["-N", "x", "-l", "nodes=2:ppn=1,walltime=1:00:00", "-l", "mem=100mb"], cores=3, ram_mib=1024)
    # One -l list: slurm-wlm-torque's qsub keeps only the last -l.
    assert out.args == ["-N", "x", "-l", "nodes=2:ppn=3,walltime=1:00:00,mem=2048mb"]
    assert out.notes == ["raising ppn from 1 to 3", "raising mem from 100mb to 2048mb"]


def test_adds_what_is_missing():
    out = fit(["-N", "x"], cores=2, ram_mib=512)
    assert out.args == ["-N", "x", "-l", "nodes=1:ppn=2,mem=512mb"]


def test_leaves_enough_alone():
    args = ["-l", "nodes=1:ppn=8:gpus=1,mem=4gb"]
    out = fit(args, cores=3, ram_mib=1024)
    assert out.args == args and out.notes == []


def test_node_lists_and_select():
    assert fit(["-l", "nodes=n1:ppn=1+n2"], 2, 10).args[1] == "nodes=n1:ppn=2+n2:ppn=2,mem=20mb"
    assert fit(["-l", "select=2:ncpus=1:mem=100mb"], 4, 1024).args == ["-l", "select=2:ncpus=4:mem=1024mb"]
    assert fit(["-l", "ncpus=1"], 4, 10).args == ["-l", "ncpus=4,mem=10mb"]


def test_torque_sizes():
    assert mem_to_mib("100mb") == 100 and mem_to_mib("2gb") == 2048 and mem_to_mib("1024kb") == 1
    assert mem_to_mib("1w") == 8 / 2**20 and mem_to_mib("lots") is None
