import pytest

from vtorque.shared.config import Config, ImageEntry, ImagesConfig

DIGEST = "a" * 64


@pytest.fixture
def config() -> Config:
    return Config(images=ImagesConfig(catalog={"tiny": ImageEntry(source="/nonexistent/tiny.qcow2", sha256=DIGEST)}))
