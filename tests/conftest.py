"""Test setup shared by all packages: GPT-2's BPE ranks from the shared offline tiktoken cache, the
`integration` marker on everything under tests/integration/ (torchrun launches, injected faults), and the
shipped Shakespeare sample prepared once per session for the tests that train."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken"))

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick start's data (the shipped Shakespeare sample, byte-level), prepared once for the session."""
    from data.prepare import prepare
    from tests.hydra_compose import compose_train

    directory = tmp_path_factory.mktemp("data") / "shakespeare_byte"
    prepare(compose_train(["experiment=quickstart", f"data.dir={directory}"]).data)
    return directory
