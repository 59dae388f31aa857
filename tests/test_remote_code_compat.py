"""The remote-code files on more than one transformers release: save with one, load with another, identical results.

A Hub user who loads Chimera or Mixpert with `trust_remote_code=True` runs our files on whatever transformers they have,
not the version `setup.py` asks for. Each setup (Chimera on LLaVA-OneVision / Qwen2-VL / InternVL, Mixpert on the same
three bases) is saved by this project's venv together with a reference (`tests/remote_code_compat.py`); then an
interpreter where the project is not importable loads it by folder or by repo id and must reproduce forward, generate
(greedy, beams, sampling), pipeline and a gradient-checkpointed training step bit for bit
(`tests/remote_code_check.py`).

* The unmarked test does this within the installed transformers (the README's test command).
* The `compat` tests run in a *second* venv (e.g. the newest transformers and TRL that pip serves, this project not
  installed) against references written by the project's venv, named by `COMPAT_REFERENCE_PYTHON`; `.ci/run` runs
  them as its second stage:

      COMPAT_REFERENCE_PYTHON=.venv/bin/python \\
          .venv-newest/bin/python -m pytest -m compat tests/test_remote_code_compat.py
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.utils import ROOT_DIR, run_without_project


CHECK_SCRIPT = os.path.join(ROOT_DIR, "tests", "remote_code_check.py")


def write_references(out: Path, python: str | None = None) -> Path:
    """Save every setup with its reference, using `python` (the project's venv; default: this interpreter)."""
    import sys

    result = subprocess.run(
        [python or sys.executable, "-m", "tests.remote_code_compat", str(out)], cwd=ROOT_DIR, capture_output=True,
        text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return out


def check(reference_dir, model_root=None, save_dir=None, python=None, env=None, cwd=None) -> list[dict]:
    """Run `tests/remote_code_check.py` where the project cannot be imported; return its per-setup reports."""
    argv = ["--reference_dir", str(reference_dir)]
    argv += ["--model_root", str(model_root)] if model_root else []
    argv += ["--save_dir", str(save_dir)] if save_dir else []
    out = run_without_project(
        f"""
        import runpy, sys
        sys.argv = [{CHECK_SCRIPT!r}] + {argv!r}
        runpy.run_path({CHECK_SCRIPT!r}, run_name="__main__")
        """,
        cwd=cwd or reference_dir, python=python, env=env, timeout=600,
    )
    reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(r) for r in reports))
    return reports


def assert_all_identical(reports):
    assert sorted(r["setup"] for r in reports) == sorted(
        f"{kind}-{family}" for kind in ("chimera", "mixpert") for family in ("internvl", "llava_onevision", "qwen2_vl")
    )
    for report in reports:
        assert report["differ"] == [], report
        assert {"logits", "logits_forced", "greedy", "beam", "sample", "pipeline", "loss", "grads"} <= set(
            report["checked"]
        ), report


def test_saved_setups_reload_without_the_project_and_reproduce_everything(tmp_path):
    """Within the installed transformers: every setup, loaded from its folder by a clean process, matches exactly."""
    references = write_references(tmp_path / "ref")
    assert_all_identical(check(references))


# ------------------------------------------------------------------------------ second venv (`-m compat`)


@pytest.fixture(scope="module")
def reference_python():
    python = os.environ.get("COMPAT_REFERENCE_PYTHON")
    if not python:
        pytest.fail(
            "The `compat` tests compare this interpreter's transformers with another venv's: set "
            "COMPAT_REFERENCE_PYTHON to the python of the venv where this project is installed (e.g. .venv/bin/python "
            "after the README's test command)."
        )
    return python


@pytest.fixture(scope="module")
def references(reference_python, tmp_path_factory):
    return write_references(tmp_path_factory.mktemp("compat") / "ref", python=reference_python)


@pytest.fixture(scope="module")
def saved_here(references, tmp_path_factory):
    """Load every reference folder here (by folder), check it, and re-save it with this transformers."""
    out = tmp_path_factory.mktemp("compat") / "saved-here"
    reports = check(references, save_dir=out)
    return out, reports


@pytest.mark.compat
def test_folders_saved_by_the_reference_venv_load_here_identically(saved_here):
    _, reports = saved_here
    assert_all_identical(reports)


@pytest.mark.compat
def test_repo_ids_from_a_hub_load_here_identically(references, tmp_path):
    from huggingface_hub import HfApi

    from tests.hub_server import HubServer

    with HubServer() as hub:
        with hub.patch_client(hf_home=tmp_path / "home-push"):
            api = HfApi()
            for folder in sorted(p.parent for p in Path(references).glob("*/reference.pt")):
                api.create_repo(f"org/{folder.name}", exist_ok=True)
                api.upload_folder(folder_path=folder, repo_id=f"org/{folder.name}", ignore_patterns=["reference.pt"])
        reports = check(references, model_root="hub:org", env=hub.env(hf_home=tmp_path / "home-pull"), cwd=tmp_path)
        assert not hub.errors and not hub.unhandled_requests
    assert all(r["loaded_from"].startswith("org/") for r in reports)
    assert_all_identical(reports)


@pytest.mark.compat
def test_folders_saved_here_load_in_the_reference_venv_identically(references, saved_here, reference_python):
    out, _ = saved_here
    assert_all_identical(check(references, model_root=out, python=reference_python))
