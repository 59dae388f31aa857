"""Shared fixtures: offline, deterministic, tiny."""

import os

# Nothing may reach the network: without this a Hub lookup waits ~50 s on retries before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
