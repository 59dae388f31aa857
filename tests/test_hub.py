"""Push to a Hub-API server on 127.0.0.1 with the real `huggingface_hub` client, pull by repo id in a clean process
(where this project cannot be imported): identical logits, and everything a Hub repo needs is there."""

import json
import subprocess
import sys

import pytest
import torch

from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert, chat_prompt, random_images
from tests.hub_server import HubServer
from tests.utils import ROOT_DIR, run_without_project


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


def _save(kind, folder):
    model, processor = build_tiny_chimera("internvl") if kind == "chimera" else build_tiny_mixpert("qwen2_vl")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = processor(images=random_images(2), text=[chat_prompt(processor)] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"inputs": dict(inputs), "logits": logits}, folder / "reference.pt")
    (folder / "report.json").write_text(json.dumps({
        "dataset": "synthetic", "split": "test", "num_samples": 4,
        "per_domain": {"chart": {"metric": "relaxed_accuracy", "score": 0.25, "num_samples": 4}},
    }))


# Slow tier (about 23 s); `test_hub_server` keeps a push / pull in the main suite.
@pytest.mark.slow
def test_push_then_pull_by_repo_id(hub, tmp_path):
    for kind in ("chimera", "mixpert"):
        _save(kind, tmp_path / kind)
        push = subprocess.run(
            [sys.executable, "-m", "train.push", "--model_dir", str(tmp_path / kind), "--repo_id", f"org/{kind}-tiny",
             "--report", str(tmp_path / kind / "report.json"), "--max_shard_size", "200KB"],
            cwd=ROOT_DIR, env=hub.env(hf_home=tmp_path / "home-push"), capture_output=True, text=True, timeout=300,
        )
        assert push.returncode == 0, push.stderr[-4000:]
    out = run_without_project(
        f"""
        import torch
        from huggingface_hub import HfApi, ModelCard
        from transformers import AutoModelForImageTextToText, AutoProcessor
        for kind in ("chimera", "mixpert"):
            repo = f"org/{{kind}}-tiny"
            files = set(HfApi().list_repo_files(repo))
            needed = {{"config.json", "model.safetensors.index.json", "generation_config.json", "README.md",
                      "chat_template.jinja", "processor_config.json", "tokenizer.json", "vlm_backbones.py",
                      "modeling_routed_vlm.py", *(["expert_encoders.py"] if kind == "chimera" else []),
                      f"configuration_{{kind}}.py", f"modeling_{{kind}}.py"}}
            assert needed <= files, needed - files
            assert len([f for f in files if f.startswith("model-") and f.endswith(".safetensors")]) > 1  # sharded
            assert not any(f.endswith(".bin") for f in files)
            card = ModelCard.load(repo)
            assert card.data.eval_results[0].metric_value == 0.25 and card.data.pipeline_tag == "image-text-to-text"
            model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
            processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules.")
            ref = torch.load({str(tmp_path)!r} + f"/{{kind}}/reference.pt", weights_only=False)
            with torch.no_grad():
                logits = model(**ref["inputs"]).logits
            assert torch.equal(logits, ref["logits"]), kind
            print(kind, type(processor).__name__, "ok")
        """,
        cwd=tmp_path, env=hub.env(hf_home=tmp_path / "home-pull"),
    )
    assert out.split() == ["chimera", "ChimeraProcessor", "ok", "mixpert", "Qwen2VLProcessor", "ok"]
    assert not hub.errors and not hub.unhandled_requests


def test_push_rejects_bad_inputs_before_uploading(tmp_path):
    from train.push import main, make_parser

    def push(*argv):
        return main(make_parser().parse_args(list(map(str, argv))))

    with pytest.raises(FileNotFoundError, match="has no config.json; pass a folder written by save_pretrained"):
        push("--model_dir", tmp_path, "--repo_id", "org/x")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(FileNotFoundError, match="--report .* does not exist; run `python -m train.evaluate"):
        push("--model_dir", tmp_path, "--repo_id", "org/x", "--report", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="must be 'name' or 'org/name'"):
        push("--model_dir", tmp_path, "--repo_id", "a/b/c")
    with pytest.raises(ValueError, match="holds a 'llava' model; train.push publishes Chimera or Mixpert"):
        push("--model_dir", tmp_path, "--repo_id", "org/x")


def test_training_script_push_to_hub_uploads_the_whole_model(hub, tmp_path):
    """`--push_to_hub` on a router phase (where `Trainer` holds only the router) uploads the full saved model."""
    from huggingface_hub import HfApi, ModelCard

    from chimera_mixpert.tiny import build_tiny_mixpert
    from modeling_mixpert import MixpertForConditionalGeneration
    from tests.test_training import run_script

    model, processor = build_tiny_mixpert("internvl", image_size=32, patch_size=8, seed=0)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    with hub.patch_client(hf_home=tmp_path / "home"):
        run_script("mixpert", "mixpert_router.yaml", "--output_dir", tmp_path / "out", "--num_train_epochs", 1,
                   "--model_name_or_path", tmp_path / "base", "--push_to_hub", "true",
                   "--hub_model_id", "org/mixpert-router", "--save_strategy", "steps", "--save_steps", 1)
        files = set(HfApi().list_repo_files("org/mixpert-router"))
        assert {"config.json", "model.safetensors", "README.md", "modeling_mixpert.py", "run_summary.json",
                "processor_config.json"} <= files
        assert not any(f.startswith(("checkpoint-", "tiny_data/")) or f.endswith(".bin") for f in files)
        assert ModelCard.load("org/mixpert-router").data.pipeline_tag == "image-text-to-text"
        pulled = MixpertForConditionalGeneration.from_pretrained("org/mixpert-router")
    local = MixpertForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(pulled.state_dict().values(), local.state_dict().values()))
    assert any((tmp_path / "out").glob("checkpoint-*"))  # they exist locally but were not uploaded
