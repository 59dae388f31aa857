"""The repository's promises about itself: README commands, CI entry point, installable Hub modules."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fenced_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r"\s*```bash\n(.*?)\n```", text, re.S)
    assert match, f"README has no bash block after {marker}"
    return match.group(1)


def test_ci_runs_exactly_the_readme_test_command():
    awk = re.search(r"cmd=\$\((awk .*?) README.md\)", (ROOT / ".ci/run").read_text()).group(1)
    command = subprocess.run(["bash", "-c", f"{awk} README.md"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
    assert command == _fenced_after("<!-- test-command -->")
    assert command.endswith("python -m pytest")


def test_main_command_runs_an_existing_module():
    command = _fenced_after("<!-- main-command -->")
    module = re.search(r"python -m ([\w.]+)", command.split("&&")[-1]).group(1)
    assert importlib.util.find_spec(module) is not None, module


def test_setup_installs_every_top_level_hub_module():
    tree = ast.parse((ROOT / "setup.py").read_text())
    modules = next(
        ast.literal_eval(node.value) for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HUB_MODULES"
    )
    top_level = {p.stem for p in ROOT.glob("*.py") if p.name != "setup.py"}
    assert set(modules) == top_level


def test_readme_commands_install_the_oldest_supported_transformers_and_ci_tests_the_newest():
    setup = (ROOT / "setup.py").read_text()
    lower, upper = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', setup).groups()
    for marker in ("<!-- test-command -->", "<!-- main-command -->"):
        assert f"transformers=={lower}.0" in _fenced_after(marker), marker
    ci = (ROOT / ".ci/run").read_text()
    # The second stage: an unpinned venv without the project, compared against the README venv's references.
    assert "--upgrade transformers trl peft" in ci
    assert 'COMPAT_REFERENCE_PYTHON="$PWD/.venv/bin/python"' in ci
    assert "pytest -m compat tests/test_remote_code_compat.py" in ci
    assert ".venv/bin/python -m pytest -m common" in ci  # transformers' common model tests
    readme = (ROOT / "README.md").read_text()
    assert f"transformers>={lower},<{upper}" in readme  # the Compatibility section states setup.py's range


def test_real_mixpert_recipes_upcycle_the_checkpoint_of_the_papers_main_results():
    # Mixpert's main table upcycles LLaVA-OneVision-7B-SI; the -ov (multi-image) checkpoint is its "MI" row only.
    texts = {path: (ROOT / path).read_text() for path in (
        "README.md", "train/assemble.py", "train/configs/real/mixpert_llava_ov_7b_experts.yaml")}
    for path, text in texts.items():
        assert "llava-onevision-qwen2-7b-si-hf" in text, path
        assert "qwen2-7b-ov-hf\",  " not in text and "--base llava-hf/llava-onevision-qwen2-7b-ov" not in text, path


def test_every_shipped_config_parses_with_its_script(tmp_path):
    # The real configs are never run here at full size: parsing them is what catches an argument the installed
    # transformers / TRL no longer has (`warmup_ratio` left in 5.x).
    configs = sorted((ROOT / "train" / "configs").glob("*/*.yaml"))
    checked = 0
    for path in configs:
        if path.parent.name in ("accelerate", "data"):  # launcher configs; data recipes' mapping files
            continue
        name = "dpo" if path.stem.endswith("dpo") else path.stem.split("_")[0]  # chimera / mixpert / sft / dpo
        script = __import__(f"train.{name}", fromlist=["make_parser"])
        script.make_parser().parse_args_and_config(["--config", str(path), "--output_dir", str(tmp_path),
                                                    "--use_cpu", "true"])  # bf16 configs: no GPU here
        checked += 1
    assert checked >= 10


def test_train_holds_entry_points_and_the_library_does_not_import_them():
    # `train/` is scripts only (`python -m train.X`); what they share lives in the `chimera_mixpert` package.
    scripts = [path for path in (ROOT / "train").rglob("*.py") if path.name != "__init__.py"]
    assert len(scripts) >= 9
    for path in scripts:
        assert 'if __name__ == "__main__":' in path.read_text(), path
    library = list((ROOT / "chimera_mixpert").rglob("*.py"))
    assert {"training.py", "tiny.py", "real_shapes.py", "model_card.py", "loading.py", "collators.py"} <= {
        path.name for path in library}
    for path in library:
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not any(name.split(".")[0] == "train" for name in imported), path


def test_ruff_check_passes():
    # The rules are ruff.toml's (pyflakes, pycodestyle errors, 120 columns, imports at the top, complexity <= 15);
    # ruff is pinned in setup.py's dev extra, so every machine checks the same way.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"`ruff check .` failed:\n{result.stdout}{result.stderr}"


MAX_HUB_FUNCTION_LINES = 60


def test_hub_model_files_keep_functions_short():
    # The files a Hub user runs with trust_remote_code stay readable: every function or method is at most 60 lines
    # (from `def` to its last line: decorators excluded, docstring included). Their complexity is ruff's C901.
    hub_files = sorted(path for path in ROOT.glob("*.py") if path.name != "setup.py")
    assert {"configuration_chimera.py", "modeling_chimera.py", "processing_chimera.py", "modeling_mixpert.py",
            "vlm_backbones.py", "expert_encoders.py"} <= {path.name for path in hub_files}
    offenders = []
    for path in hub_files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_HUB_FUNCTION_LINES:
                    offenders.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not offenders, f"functions over {MAX_HUB_FUNCTION_LINES} lines:\n" + "\n".join(offenders)
