"""Chimera + Mixpert for transformers: installs the Hub-repo modules (top level), the `chimera_mixpert` library
and the `train` entry points (`python -m train.X`)."""

from pathlib import Path

from setuptools import find_packages, setup


HUB_MODULES = [
    "vlm_backbones",
    "modeling_routed_vlm",
    "expert_encoders",
    "configuration_chimera",
    "modeling_chimera",
    "processing_chimera",
    "configuration_mixpert",
    "modeling_mixpert",
]

setup(
    name="chimera-mixpert",
    version="0.1.0",
    description="Chimera and Mixpert vision-language models for Hugging Face transformers, TRL and PEFT",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=HUB_MODULES,
    packages=find_packages(
        include=["chimera_mixpert", "chimera_mixpert.*", "train", "train.*", "evaluation", "evaluation.*"]
    ),
    package_data={"train": ["configs/*/*.yaml"],
                  "evaluation": ["lmms_eval_plugin/tasks/*/*.yaml", "lmms_eval_plugin/tasks/*/*.py"]},
    # lmms-eval finds the `chimera` and `mixpert` models through this entry point (its documented plugin mechanism,
    # `lmms_eval.models.registry_v2`); it is read only by lmms-eval, installed with the `lmms` extra.
    entry_points={"lmms_eval.models": ["chimera_mixpert = evaluation.lmms_eval_plugin.registry:manifests"]},
    # transformers and TRL: the releases CI tests (the README's test command pins the oldest, 5.23.0; a second CI
    # stage runs the newest pip serves). The remote-code files themselves read what differs between releases off the
    # installed transformers (`vlm_backbones.CACHE_NAME`), since a Hub user is bound by no pin.
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "transformers>=5.23,<5.25",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.22",
        "accelerate>=1.10",
        "datasets>=4.0",
        "peft>=0.17",
        "trl>=1.16,<1.17",
        "pillow>=10",
        "numpy>=1.26",
        "pyyaml>=6",
        "matplotlib>=3.8",
        "apted>=1.0.3",
        "lxml>=5",
        "tqdm>=4.66",
    ],
    extras_require={
        # parameterized, pytest-timeout: imported by transformers' common model tests (tests/transformers_common.py)
        # ruff: `ruff check .` is a test (tests/test_repo.py); pinned so the check is the same on every machine
        "dev": ["pytest>=8", "parameterized>=0.9", "pytest-timeout>=2", "ruff==0.17.6"],
        # `python -m lmms_eval --model chimera|mixpert` (evaluation/lmms_eval_plugin); lmms-eval pinned to the release
        # the plugin and tests/test_lmms_eval_plugin.py were written against (its model entry points are new in 0.7);
        # filelock < 4: lmms-eval 0.7.3 imports `filelock._api`, which filelock 4 removed (every run fails at start)
        "lmms": ["lmms-eval==0.7.3", "filelock<4"],
    },
)
