"""Test configuration: hypothesis profiles (DESIGN §4) and deterministic torch settings.

The layout mirrors ``src/hybridssm`` (DESIGN §3): ``ops/``, ``mixers/``, ``models/``,
``streaming/``, ``tasks/``, ``training/`` and ``bench/`` hold the tests of those packages,
``benchmarks/`` the scripts' tests, and the top level the package-wide modules (cli, io, export,
convert, config, registry) and the conformance suite. Shared helpers live here at the top (``helpers.py``,
``conformance_cases.py``): pytest puts this directory on ``sys.path`` before any test module is
imported, so every subfolder imports them.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Tests run tiny ops, where a second intra-op thread costs more than it gives (and oversubscribes
# the 2-core CI machine when a test starts subprocesses). HYBRIDSSM_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("HYBRIDSSM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_process_left():
    """A process a test started from tests/forked.py's server and left running (it failed before it
    waited) is killed after the test, not left to run on beside the rest of the suite."""
    yield
    forked = sys.modules.get("forked")
    if forked is not None:
        forked.end_leftovers()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
