"""Test setup shared by all packages: GPT-2's BPE ranks from the shared offline tiktoken cache, the
`integration` marker on everything under tests/integration/ (torchrun launches, injected faults), the
shipped Shakespeare sample prepared once per session for the tests that train, and, under CI=true, a test
or module skipped for a missing optional package (`pytest.importorskip`) reported as a failure: CI installs
every extra (scripts/test.sh), so such a skip means an install went wrong, not that the test may be left
out."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken"))

INTEGRATION = Path(__file__).resolve().parent / "integration"


MISSING_PACKAGE = "could not import"  # what pytest.importorskip's skip says


def fail_missing_package_under_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    if os.environ.get("CI") == "true" and report.skipped and MISSING_PACKAGE in str(report.longrepr):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (f"{reason}: under CI=true a missing optional package fails; install every extra "
                           "the tests use (bash scripts/test.sh does)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    fail_missing_package_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    fail_missing_package_under_ci(outcome.get_result())


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
