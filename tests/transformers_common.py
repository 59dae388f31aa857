"""transformers' own common model tests, obtained at test time from the released sdist — never copied into this repo.

`load_common_tests()` downloads the sdist of the *installed* transformers release once (`pip download
transformers==<version> --no-binary :all: --no-deps`, from PyPI), extracts `tests/test_modeling_common.py` and
`tests/test_configuration_common.py` into a cache folder as the package `transformers_common_tests`, and imports it.

The sdist leaves out three modules those files import; the loader writes a one-line stand-in for each, which points at
this project's own code (nothing of transformers is reproduced):

* `generation/test_utils.py` → `GenerationTesterMixin` from `tests/generation_common.py`: our tests of the same names
  and assertions as transformers' generation mixin (the file is not in the sdist);
* `exporters/test_export.py` → an empty `ExportTesterMixin` (torch.export tests; not in the sdist, and Chimera's
  per-image routing is data-dependent control flow that `torch.export` cannot trace anyway);
* `utils/test_configuration_utils.py` → `config_common_kwargs = {}`: read only by `check_config_arguments_init`,
  which returns before using it for composite configs such as ours.

The cache is `$TRANSFORMERS_COMMON_TESTS_CACHE` or `~/.cache/chimera-mixpert/transformers-tests/<version>/`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers


PACKAGE = "transformers_common_tests"
FILES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py")
STAND_INS = {
    "__init__.py": "",
    "generation/__init__.py": "",
    "generation/test_utils.py": "from tests.generation_common import GenerationTesterMixin  # noqa: F401\n",
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:  # torch.export tests are not in the sdist\n    pass\n",
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}  # unused for composite configs\n",
}


def _cache_root(version: str) -> Path:
    root = os.environ.get("TRANSFORMERS_COMMON_TESTS_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "chimera-mixpert" / "transformers-tests"
    return base / version


def common_tests_dir(version: str | None = None) -> Path:
    """The folder holding the `transformers_common_tests` package for `version` (default: the installed one)."""
    version = version or transformers.__version__
    root = _cache_root(version)
    package = root / PACKAGE
    if all((package / Path(f).name).exists() for f in FILES):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:", "--no-deps",
             "-q", "-d", tmp],
            capture_output=True, text=True, timeout=600,
        )
        sdists = list(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise RuntimeError(
                f"Could not download the transformers {version} sdist to get its common tests "
                f"(`pip download transformers=={version} --no-binary :all: --no-deps`): {result.stderr[-2000:]}\n"
                "These tests need PyPI once; afterwards the files are cached in "
                f"{root}. Put the two files there by hand on a machine without PyPI."
            )
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                relative = member.name.split("/", 1)[-1]
                if relative in FILES:
                    (package / Path(relative).name).write_bytes(tar.extractfile(member).read())
    missing = [f for f in FILES if not (package / Path(f).name).exists()]
    if missing:
        raise RuntimeError(f"The transformers {version} sdist has no {missing}: its common tests moved.")
    for name, text in STAND_INS.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return root


def load_common_tests():
    """`(ModelTesterMixin, ConfigTester, test_modeling_common module)` of the installed transformers release."""
    root = str(common_tests_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling.ModelTesterMixin, configuration.ConfigTester, modeling
