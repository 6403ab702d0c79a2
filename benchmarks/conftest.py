"""pytest-benchmark tests of the providers: collected only by ``pytest benchmarks/`` (the repository's
``testpaths`` is ``tests/``) and run only with ``--benchmark-only``. Published numbers come from
``python -m benchmarks.run``, never from these tests."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("benchmark_only", default=False):
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benchmarks/ --benchmark-only`")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
