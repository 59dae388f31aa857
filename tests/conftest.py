"""Shared fixtures: offline, deterministic, tiny."""

import os

# Nothing may reach the network: without this a Hub lookup waits ~50 s on retries before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_ignore_collect(collection_path, config):
    # transformers' common tests are imported from the released sdist when their module is collected (a download on
    # first use): collect that module only when `common` tests are selected (`pytest -m common`).
    if collection_path.name == "test_transformers_common.py":
        expr = config.getoption("markexpr") or ""
        return None if "common" in expr and "not common" not in expr else True
    return None
