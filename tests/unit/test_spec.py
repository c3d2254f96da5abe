import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtorque.shared.config import Config, ImageEntry, ImagesConfig, SpecConfig
from vtorque.shared.spec import (
    KEYS,
    SpecError,
    help_table,
    parse_options,
    parse_size_mib,
    validate,
    validate_user_metadata,
)


def test_a_full_spec_parses(config):
    spec = validate(parse_options(["img=tiny,vcpus=2", "ram=1G,distro=Ubuntu,vms_per_node=2,fs_type=ramdisk",
                                   "iocm=yes,iocm_min_cores=1,iocm_max_cores=3,vrdma=on,disk=10G",
                                   "vm_prologue=/home/a/pre.sh,vm_epilogue=/home/a/post.sh,metadata=/home/a/m.yaml",
                                   "vcpu_pinning=off,arch=x86_64"]), config)
    assert (spec.img, spec.vcpus, spec.ram_mib, spec.distro, spec.vms_per_node) == ("tiny", 2, 1024, "ubuntu", 2)
    assert (spec.iocm, spec.iocm_min_cores, spec.iocm_max_cores, spec.vrdma) == (True, 1, 3, True)
    assert spec.fs_type == "ramdisk" and spec.disk.size_mib == 10240 and spec.vcpu_pinning is False
    assert (spec.vm_prologue, spec.vm_epilogue, spec.metadata) == (
        "/home/a/pre.sh",
        "/home/a/post.sh",
        "/home/a/m.yaml",
    )
    assert validate(spec.as_options(), config) == spec  # normalised options give the same spec back


def test_defaults_come_from_the_site(config):
    spec = validate(parse_options(["img=tiny"]), config)
    assert spec.vcpus == config.spec.default_vcpus
    assert spec.ram_mib == parse_size_mib(config.spec.default_ram)
    assert spec.distro == "debian" and spec.vms_per_node == 1 and spec.fs_type == "sharedfs"
    assert spec.vcpu_pinning is True and spec.pin_map is None and not spec.iocm and not spec.vrdma


@pytest.mark.parametrize("text,value", [("true", True), ("Yes", True), ("on", True), ("1", True),
                                        ("enabled", True), ("false", False), ("NO", False), ("off", False),
                                        ("0", False), ("Disabled", False)])
def test_booleans_mean_what_they_usually_mean(config, text, value):
    assert validate({"img": "tiny", "vrdma": text}, config).vrdma is value


def test_a_core_map_pins_each_vcpu(config):
    spec = validate({"img": "tiny", "vcpus": "3", "vcpu_pinning": "2:0:1"}, config)
    assert spec.pin_map == [2, 0, 1] and spec.vcpu_pinning


def test_the_distro_comes_from_the_image_when_not_given():
    config = Config(images=ImagesConfig(catalog={"c7": ImageEntry(source="/x", sha256="c" * 64, distro="centos")}))
    assert validate({"img": "c7"}, config).distro == "centos"


def test_a_disk_may_be_the_users_image(config):
    assert validate({"img": "tiny", "disk": "/home/a/data.qcow2"}, config).disk.image == "/home/a/data.qcow2"


@pytest.mark.parametrize("text,mib", [("512M", 512), ("2G", 2048), ("1T", 1024 * 1024), ("262144K", 256),
                                      ("1025K", 2), ("300", 300), ("4g", 4096), ("1GiB", 1024)])
def test_sizes_use_binary_units(text, mib):
    assert parse_size_mib(text) == mib


BAD = [
    (["img=tiny,vcpus=abc"], "vcpus"), (["img=tiny,vcpus=0"], "vcpus"), (["img=tiny,vcpus=65"], "vcpus"),
    (["img=nosuch"], "img"), (["img=../../etc/passwd"], "img"), (["img=/etc/passwd"], "img"),
    (["img=tiny,ram=lots"], "ram"), (["img=tiny,ram=1P"], "ram"), (["img=tiny,ram=1M"], "ram"),
    (["img=tiny,ram=999G"], "ram"), (["img=tiny,colour=blue"], "colour"),
    (["img=tiny,novalue"], "novalue"), ([""], "-vm"), (["vcpus=2"], "img"), ([","], "-vm"),
    (["img=tiny,distro=windows"], "distro"), (["img=tiny,arch=arm64"], "arch"),
    (["img=tiny,vcpu_pinning=maybe"], "vcpu_pinning"), (["img=tiny,vcpus=2,vcpu_pinning=0:0"], "vcpu_pinning"),
    (["img=tiny,vcpus=2,vcpu_pinning=0:1:2"], "vcpu_pinning"), (["img=tiny,vms_per_node=0"], "vms_per_node"),
    (["img=tiny,vms_per_node=9"], "vms_per_node"), (["img=tiny,vm_prologue=pre.sh"], "vm_prologue"),
    (["img=tiny,vm_epilogue=/home/a/../../etc/shadow"], "vm_epilogue"), (["img=tiny,vrdma=2"], "vrdma"),
    (["img=tiny,iocm=sure"], "iocm"), (["img=tiny,iocm_min_cores=2"], "iocm_min_cores"),
    (["img=tiny,iocm=true,iocm_min_cores=0"], "iocm_min_cores"),
    (["img=tiny,iocm=true,iocm_min_cores=3,iocm_max_cores=2"], "iocm_max_cores"),
    (["img=tiny,iocm=true,iocm_max_cores=5"], "iocm_max_cores"), (["img=tiny,fs_type=nfs"], "fs_type"),
    (["img=tiny,disk=101G"], "disk"), (["img=tiny,disk=0"], "disk"), (["img=tiny,disk=/home/a/x.iso"], "disk"),
    (["img=tiny,disk=/home/a/../x.img"], "disk"), (["img=tiny,metadata=/home/a/m.txt"], "metadata"),
    (["img=tiny,metadata=m.yaml"], "metadata"),
]


@pytest.mark.parametrize("options,key", BAD)
def test_every_bad_value_names_its_key(config, options, key):
    with pytest.raises(SpecError) as err:
        validate(parse_options(options), config)
    assert err.value.key == key
    assert str(err.value).startswith(f"-vm {key}")
    assert "\n" not in str(err.value)


def test_site_switches_and_per_node_limits():
    site = SpecConfig(vrdma_enabled=False, iocm_enabled=False, host_reserve_cores=2, max_cores_per_node=8,
                      host_reserve_ram="1G", max_ram_per_node="4G")
    config = Config(spec=site, images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256="a" * 64)}))
    for options, key in [({"vrdma": "true"}, "vrdma"), ({"iocm": "true"}, "iocm"),
                         ({"vcpus": "4", "vms_per_node": "2"}, "vcpus"), ({"ram": "2G", "vms_per_node": "2"}, "ram")]:
        with pytest.raises(SpecError) as err:
            validate({"img": "tiny", **options}, config)
        assert err.value.key == key
    spec = validate({"img": "tiny", "vcpus": "3", "vms_per_node": "2"}, config)
    assert spec.cores_per_node(site) == 8 and spec.ram_mib_per_node(site) == 1024 + 2 * 512


@pytest.mark.parametrize("doc,ok", [
    ({"packages": ["htop", "openmpi-bin"], "timezone": "Europe/Berlin"}, True),
    ({"runcmd": ["id"]}, False), ({"users": [{"name": "root"}]}, False), ({"write_files": []}, False),
    ({"bootcmd": ["x"]}, False), ({"ssh_authorized_keys": ["k"]}, False), ({"mounts": []}, False),
    ({"packages": ["; rm -rf /"]}, False), ({"packages": "htop"}, False), ({"package_upgrade": "yes"}, False),
    (["not", "a", "mapping"], False), ({"final_message": "a\nb"}, False),
])
def test_user_metadata_may_not_give_root(doc, ok):
    if ok:
        assert validate_user_metadata(doc) == doc
    else:
        with pytest.raises(SpecError) as err:
            validate_user_metadata(doc)
        assert err.value.key == "metadata"


def test_help_lists_every_key_with_default_and_limit(config):
    table = help_table(config.spec)
    for key in KEYS:
        assert f"  {key} " in table
    assert "1..64" in table


@given(st.text(max_size=120))
def test_any_input_parses_or_names_a_key(text):
    config = Config(images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256="b" * 64)}))
    try:
        spec = validate(parse_options([text]), config)
    except SpecError as exc:
        assert exc.key and "\n" not in str(exc)
        return
    site = config.spec
    assert spec.img == "tiny"
    assert 1 <= spec.vcpus <= site.max_vcpus and 1 <= spec.vms_per_node <= site.max_vms_per_node
    assert parse_size_mib(site.min_ram) <= spec.ram_mib <= parse_size_mib(site.max_ram)
    assert spec.cores_per_node(site) <= site.max_cores_per_node


@given(st.dictionaries(st.sampled_from(KEYS), st.text(alphabet=st.characters(blacklist_characters=","),
                                                      max_size=20), max_size=8))
def test_any_key_value_map_parses_or_names_a_key(options):
    config = Config(images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256="b" * 64)}))
    try:
        validate(options, config)
    except SpecError as exc:
        assert exc.key in KEYS or exc.key == "-vm"
