"""Helpers shared by tests: run code in a process where this project is not importable."""

import os
import subprocess
import sys
import textwrap

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROJECT_MODULES = (
    "vlm_backbones",
    "modeling_routed_vlm",
    "expert_encoders",
    "configuration_chimera",
    "modeling_chimera",
    "processing_chimera",
    "configuration_mixpert",
    "modeling_mixpert",
    "train",
    "chimera_mixpert",
)

# Prepended to subprocess code: any import of a project module fails, as on a machine where only transformers is
# installed. Remote code must then come from the checkpoint folder (`transformers_modules.*`).
_BLOCKER = f"""
import importlib.abc, sys
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PROJECT_MODULES!r}:
            raise ImportError("this project is not installed here: " + name)
sys.meta_path.insert(0, _NotInstalled())
"""


def run_without_project(code: str, cwd, timeout: int = 240, env: dict | None = None, python: str | None = None) -> str:
    """Run `code` in a fresh interpreter (`python`, default this one) that cannot import this project; return stdout
    (raise on failure). `env` defaults to this process's environment with `HF_HUB_OFFLINE=1`."""
    env = {**(env if env is not None else {**os.environ, "HF_HUB_OFFLINE": "1"}), "PYTHONPATH": ""}
    result = subprocess.run(
        [python or sys.executable, "-c", _BLOCKER + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=str(cwd), env=env, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result.stdout
