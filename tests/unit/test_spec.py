import pytest
from hypothesis import given, strategies as st

from vtorque.shared.spec import SpecError, parse_options, parse_size_mib, validate


def test_a_full_spec_parses(config):
    spec = validate(parse_options(["img=tiny,vcpus=2", "ram=1G"]), config)
    assert (spec.img, spec.vcpus, spec.ram_mib) == ("tiny", 2, 1024)


def test_defaults_come_from_the_site(config):
    spec = validate(parse_options(["img=tiny"]), config)
    assert spec.vcpus == config.spec.default_vcpus
    assert spec.ram_mib == parse_size_mib(config.spec.default_ram)


@pytest.mark.parametrize("text,mib", [("512M", 512), ("2G", 2048), ("1T", 1024 * 1024), ("262144K", 256),
                                      ("1025K", 2), ("300", 300), ("4g", 4096), ("1GiB", 1024)])
def test_sizes_use_binary_units(text, mib):
    assert parse_size_mib(text) == mib


@pytest.mark.parametrize("options,key", [
    (["img=tiny,vcpus=abc"], "vcpus"),
    (["img=tiny,vcpus=0"], "vcpus"),
    (["img=tiny,vcpus=65"], "vcpus"),
    (["img=nosuch"], "img"),
    (["img=../../etc/passwd"], "img"),
    (["img=/etc/passwd"], "img"),
    (["img=tiny,ram=lots"], "ram"),
    (["img=tiny,ram=1P"], "ram"),
    (["img=tiny,ram=1M"], "ram"),
    (["img=tiny,ram=999G"], "ram"),
    (["img=tiny,colour=blue"], "colour"),
    (["img=tiny", "img=tiny"], "img"),
    (["img=tiny,novalue"], "novalue"),
    ([""], "-vm"),
    (["vcpus=2"], "img"),
])
def test_every_bad_value_names_its_key(config, options, key):
    with pytest.raises(SpecError) as err:
        validate(parse_options(options), config)
    assert err.value.key == key
    assert str(err.value).startswith(f"-vm {key}")
    assert "\n" not in str(err.value)


@given(st.text(max_size=80))
def test_any_input_parses_or_names_a_key(text):
    from vtorque.shared.config import Config, ImageEntry, ImagesConfig

    config = Config(images=ImagesConfig(catalog={"tiny": ImageEntry(source="/x", sha256="b" * 64)}))
    try:
        spec = validate(parse_options([text]), config)
    except SpecError as exc:
        assert exc.key
        return
    assert spec.img == "tiny"
    assert 1 <= spec.vcpus <= config.spec.max_vcpus
    assert parse_size_mib(config.spec.min_ram) <= spec.ram_mib <= parse_size_mib(config.spec.max_ram)
