"""Training scripts: what each stage trains and freezes (TRL's pattern), expert isolation, DPO, resume, data parallel,
and the router loss under gradient accumulation."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chimera_mixpert.data.export import export_preference_jsonl, export_sft_jsonl
from chimera_mixpert.tiny import chat_prompt, random_images

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "train" / "configs" / "tiny"
DOMAINS = ["chart", "table", "math", "document", "ocr", "general"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """12 SFT rows (2 per domain, identical text lengths) and 12 preference rows, as local files."""
    folder = tmp_path_factory.mktemp("data")
    images = random_images(12, seed=3, sizes=((32, 32),))
    rows = [{"image": images[i], "question": "What is the value?", "answer": str(i % 10), "domain": DOMAINS[i % 6]}
            for i in range(12)]
    export_sft_jsonl(rows, str(folder), "sft")
    pairs = [{**r, "chosen": r["answer"], "rejected": str((int(r["answer"]) + 1) % 10)} for r in rows]
    export_preference_jsonl(pairs, str(folder), "pref")
    return folder


def run_script(module, config, *overrides):
    """Parse like the command line (YAML config + overrides) and run the script's `main` in this process."""
    script = __import__(f"train.{module}", fromlist=["main", "make_parser"])
    args = script.make_parser().parse_args_and_config(["--config", str(TINY / config), *map(str, overrides)])
    return script.main(*args)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_chimera_stage_1_trains_router_and_projectors_only(data_dir, tmp_path):
    from chimera_mixpert.tiny import build_tiny_chimera

    experts = {"table": "pix2struct_vision_model", "chart": "siglip_vision_model", "math": "clip_vision_model"}
    initial = snapshot(build_tiny_chimera("internvl", experts, image_size=32, patch_size=8, seed=0,
                                          generalist_kwargs={"hidden_size": 32})[0])
    trainer = run_script("chimera", "chimera_stage1.yaml", "--output_dir", tmp_path, "--max_steps", 3,
                         "--train_file", data_dir / "sft.jsonl", "--save_strategy", "no", "--logging_steps", 1)
    model = trainer.model
    moved = changed(initial, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Chimera §3.4: stage 1 trains the router, the expert projectors and the generalist's projector
    assert trainable and all(n.startswith(("model.router.", "model.expert_projectors.",
                                           "model.generalist.multi_modal_projector.")) for n in trainable)
    assert any(n.startswith("model.generalist.multi_modal_projector.") for n in trainable)
    assert moved == trainable  # every trainable parameter changed, nothing else did
    assert model.config.gscm_ratio == 0.0
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["groups"] == ["router", "expert_projectors", "generalist_projector"]
    assert summary["global_step"] == 3
    history = [h for h in trainer.state.log_history if "lm_loss" in h]
    assert history and "router_loss" in history[0]

    frozen = run_script("chimera", "chimera_stage1.yaml", "--output_dir", tmp_path / "frozen", "--max_steps", 1,
                        "--train_file", data_dir / "sft.jsonl", "--save_strategy", "no",
                        "--train_generalist_projector", "false").model
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".multi_modal_projector." in n)


def test_chimera_router_phase_fits_the_router_alone_on_cached_features(data_dir, tmp_path):
    from chimera_mixpert.data.collators import make_domain_labels
    from chimera_mixpert.data.loading import load_vl_dataset
    from modeling_chimera import ChimeraForConditionalGeneration
    from processing_chimera import ChimeraProcessor
    from train.chimera import routing_features

    run_script("chimera", "chimera_stage1.yaml", "--output_dir", tmp_path / "s1", "--max_steps", 1,
               "--train_file", data_dir / "sft.jsonl", "--save_strategy", "no", "--gscm_ratio", 0.3)
    initial = ChimeraForConditionalGeneration.from_pretrained(tmp_path / "s1")
    processor = ChimeraProcessor.from_pretrained(tmp_path / "s1")
    run_script("chimera", "chimera_stage1.yaml", "--stage", "router", "--output_dir", tmp_path / "r",
               "--model_name_or_path", tmp_path / "s1", "--train_file", data_dir / "sft.jsonl",
               "--max_steps", -1, "--num_train_epochs", 60, "--learning_rate", 5e-2, "--save_strategy", "no")
    after = ChimeraForConditionalGeneration.from_pretrained(tmp_path / "r")
    assert changed(snapshot(initial), after) == {"model.router.weight"}
    summary = json.loads((tmp_path / "r" / "run_summary.json").read_text())
    assert summary["stage"] == "router" and summary["results"]["cached_rows"] == 12
    assert summary["results"]["train_accuracy"] == 1.0  # 12 random images, 4 classes: a linear router memorises them

    # The cached features are exactly what the model's router reads in forward().
    labels = make_domain_labels(list(after.config.domains), none_domains=["general", "document", "ocr"])
    data = load_vl_dataset(str(data_dir / "sft.jsonl"), domains=list(labels)[:-1])
    cache = routing_features(after, processor, data, labels, str(tmp_path / "cache"))
    features, targets = cache.features, cache.targets
    assert features.dtype == torch.float32
    assert features.shape == (12, after.config.generalist_config.vision_config.hidden_size)
    rows = [data[i] for i in range(4)]
    inputs = processor(images=[r["images"] for r in rows], text=[chat_prompt(processor)] * 4, return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        routed = after(**inputs).router_logits
    torch.testing.assert_close(routed, after.model.router(features[:4]), rtol=1e-5, atol=1e-5)  # batch of 16 vs 4
    assert targets.tolist() == [labels[d] for d in DOMAINS] * 2
    assert (routed.argmax(-1) == targets[:4]).all()
    with pytest.raises(ValueError, match="--stage router trains the router alone; drop --use_lora."):
        run_script("chimera", "chimera_stage1.yaml", "--stage", "router", "--use_lora", "true",
                   "--output_dir", tmp_path)


def test_chimera_stage_2_adds_the_llm_and_gscm_and_keeps_experts_frozen(data_dir, tmp_path):
    run_script("chimera", "chimera_stage1.yaml", "--output_dir", tmp_path / "s1", "--max_steps", 1,
               "--train_file", data_dir / "sft.jsonl", "--save_strategy", "no")
    from modeling_chimera import ChimeraForConditionalGeneration

    initial = snapshot(ChimeraForConditionalGeneration.from_pretrained(tmp_path / "s1"))
    trainer = run_script("chimera", "chimera_stage2.yaml", "--output_dir", tmp_path / "s2", "--max_steps", 3,
                         "--model_name_or_path", tmp_path / "s1", "--train_file", data_dir / "sft.jsonl",
                         "--save_strategy", "no")
    model = trainer.model
    moved = changed(initial, model)
    assert not any(n.startswith(("model.expert_encoders.", "model.generalist.vision_tower.")) for n in moved)
    assert any(n.startswith("model.generalist.language_model.") for n in moved)
    assert any(n.startswith("model.generalist.multi_modal_projector.") for n in moved)  # Chimera §3.4
    assert "model.router.weight" in moved and "lm_head.weight" in moved
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable
    assert model.config.gscm_ratio == 0.25
    reloaded = ChimeraForConditionalGeneration.from_pretrained(tmp_path / "s2")
    assert reloaded.config.gscm_ratio == 0.25


def test_chimera_stage_2_with_lora_merges_into_a_plain_checkpoint(data_dir, tmp_path):
    from modeling_chimera import ChimeraForConditionalGeneration

    run_script("chimera", "chimera_stage1.yaml", "--output_dir", tmp_path / "s1", "--max_steps", 1,
               "--train_file", data_dir / "sft.jsonl", "--save_strategy", "no")
    before = ChimeraForConditionalGeneration.from_pretrained(tmp_path / "s1")
    run_script("chimera", "chimera_stage2.yaml", "--output_dir", tmp_path / "s2", "--max_steps", 3,
               "--use_lora", "true", "--model_name_or_path", tmp_path / "s1", "--train_file", data_dir / "sft.jsonl",
               "--save_strategy", "no")
    after = ChimeraForConditionalGeneration.from_pretrained(tmp_path / "s2")  # strict: a plain Chimera state dict
    moved = changed(snapshot(before), after)
    assert "model.router.weight" in moved
    assert any(".self_attn.q_proj.weight" in n for n in moved)  # LoRA merged into the LLM
    assert any(n.startswith("model.generalist.multi_modal_projector.") for n in moved)  # fully trained, as in stage 1
    assert not any(n.startswith("model.expert_encoders.") for n in moved)


def test_mixpert_expert_tuning_for_one_domain_changes_only_that_expert(data_dir, tmp_path):
    from chimera_mixpert.tiny import build_tiny_mixpert

    initial = snapshot(build_tiny_mixpert("internvl", DOMAINS, image_size=32, patch_size=8, seed=0,
                                          generalist_kwargs={"hidden_size": 32})[0])
    model, results = run_script("mixpert", "mixpert_experts.yaml", "--output_dir", tmp_path, "--domains", "math",
                                "--max_steps", 2, "--train_file", data_dir / "sft.jsonl", "--save_strategy", "no")
    moved = changed(initial, model)
    assert moved and all(n.startswith("model.model.vision_experts.math.") or n.startswith("model.vision_experts.math.")
                         for n in moved)
    assert {n for n in initial if n.startswith("model.vision_experts.math.")} == moved
    assert results["math"]["rows"] == 2 and results["math"]["trainable"]["fraction"] < 0.2


def spy_optimizer(monkeypatch):
    """Record, per learning rate, the names of the parameters the trainer's optimizer gives it."""
    from chimera_mixpert.training import GroupLearningRateTrainer

    seen = {}
    original = GroupLearningRateTrainer.create_optimizer

    def spy(self, model=None):
        optimizer = original(self, model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        seen["optimizer"] = optimizer
        seen["names"] = names
        for group in optimizer.param_groups:
            seen.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
        return optimizer

    monkeypatch.setattr(GroupLearningRateTrainer, "create_optimizer", spy)
    return seen


def names_of(group, seen):
    return [seen["names"][id(p)] for p in group["params"]]


def test_mixpert_expert_tuning_uses_two_learning_rates(data_dir, tmp_path, monkeypatch):
    seen = spy_optimizer(monkeypatch)
    run_script("mixpert", "mixpert_experts.yaml", "--output_dir", tmp_path, "--domains", "chart", "--max_steps", 1,
               "--train_file", data_dir / "sft.jsonl", "--save_strategy", "no", "--learning_rate", 2e-6,
               "--projector_learning_rate", 1e-5, "--adam_beta2", 0.98)
    assert sorted(k for k in seen if isinstance(k, float)) == [2e-6, 1e-5]
    assert seen[1e-5] and all(".vision_experts.chart.projector." in n for n in seen[1e-5])
    assert any(".vision_experts.chart.layers." in n for n in seen[2e-6])
    assert all(".vision_experts.chart." in n and ".projector." not in n for n in seen[2e-6])
    assert seen["optimizer"].param_groups[0]["betas"] == (0.9, 0.98)  # TrainingArguments' betas are kept


def test_chimera_router_learning_rate_and_optim_flag(data_dir, tmp_path, monkeypatch):
    seen = spy_optimizer(monkeypatch)
    run_script("chimera", "chimera_stage1.yaml", "--output_dir", tmp_path, "--max_steps", 1, "--save_strategy", "no",
               "--train_file", data_dir / "sft.jsonl", "--learning_rate", 1e-3, "--router_learning_rate", 3e-2,
               "--optim", "sgd", "--weight_decay", 0.1)
    assert seen[3e-2] == {"model.router.weight"}
    assert seen[1e-3] and all(n.startswith(("model.expert_projectors.", "model.generalist.multi_modal_projector."))
                              for n in seen[1e-3])
    optimizer = seen["optimizer"]
    assert isinstance(getattr(optimizer, "optimizer", optimizer), torch.optim.SGD)  # --optim is honoured
    decay = {n: g["weight_decay"] for g in optimizer.param_groups for n in names_of(g, seen)}
    assert decay["model.router.weight"] == 0.1
    assert all(wd == 0.0 for n, wd in decay.items() if n.endswith(".bias"))  # as in Trainer.create_optimizer


def test_mixpert_router_phase_trains_only_the_router_on_cached_features(data_dir, tmp_path):
    from chimera_mixpert.tiny import build_tiny_mixpert

    initial = snapshot(build_tiny_mixpert("internvl", DOMAINS, image_size=32, patch_size=8, seed=0,
                                          generalist_kwargs={"hidden_size": 32})[0])
    model, results = run_script("mixpert", "mixpert_router.yaml", "--output_dir", tmp_path,
                                "--train_file", data_dir / "sft.jsonl", "--num_train_epochs", 5)
    moved = changed(initial, model)
    assert moved == {n for n in initial if n.startswith("model.vision_router.")}
    assert results["cached_rows"] == 12


def test_router_phase_in_a_bf16_model_trains_an_fp32_router_on_the_training_device_and_saves_first(
    data_dir, tmp_path, monkeypatch
):
    import chimera_mixpert.training
    import train.mixpert
    from chimera_mixpert.tiny import build_tiny_mixpert
    from modeling_mixpert import MixpertForConditionalGeneration

    model, processor = build_tiny_mixpert("internvl", DOMAINS, image_size=32, patch_size=8, seed=0,
                                          generalist_kwargs={"hidden_size": 32})
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    initial = MixpertForConditionalGeneration.from_pretrained(tmp_path / "start", dtype=torch.bfloat16)
    assert initial.model.vision_router.fc1.weight.dtype == torch.float32  # kept fp32 in a bf16 model
    before = initial.model.vision_router.fc1.weight.detach().clone()
    seen = {}
    real_device, real_features = train.mixpert.training_device, train.mixpert.pooled_shared_features
    monkeypatch.setattr(train.mixpert, "training_device",
                        lambda model, args: seen.setdefault("device", real_device(model, args)))
    monkeypatch.setattr(train.mixpert, "pooled_shared_features", lambda *a, **k: seen.setdefault(
        "features_on", a[4] if len(a) > 4 else k.get("device")) and real_features(*a, **k))

    def broken(router, cache):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(chimera_mixpert.training, "router_accuracy", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_script("mixpert", "mixpert_router.yaml", "--output_dir", tmp_path / "r", "--model_name_or_path",
                   tmp_path / "start", "--dtype", "bfloat16", "--train_file", data_dir / "sft.jsonl",
                   "--num_train_epochs", 3)
    assert seen["features_on"] == seen["device"] == torch.device("cpu")  # one device for features and training
    saved = MixpertForConditionalGeneration.from_pretrained(tmp_path / "r")  # on disk before the evaluation failed
    after = saved.model.vision_router.fc1.weight
    assert after.dtype == torch.float32 and saved.model.backbone.dtype == torch.bfloat16
    assert (after != before).float().mean() > 0.99  # fp32 master weights: every update is kept


def test_router_samples_per_domain_draws_a_balanced_seeded_subset(data_dir, tmp_path):
    from chimera_mixpert.data.loading import load_vl_dataset
    from chimera_mixpert.training import sample_per_domain

    data = load_vl_dataset(str(data_dir / "sft.jsonl"))
    first, again = sample_per_domain(data, 1, seed=0), sample_per_domain(data, 1, seed=0)
    assert sorted(first["domain"]) == sorted(DOMAINS) and first["messages"] == again["messages"]
    assert len(sample_per_domain(data, 5, seed=0)) == 12 and sample_per_domain(data, None, seed=0) is data
    with pytest.raises(ValueError, match="--router_samples_per_domain must be a positive"):
        sample_per_domain(data, 0, seed=0)
    _, results = run_script("mixpert", "mixpert_router.yaml", "--output_dir", tmp_path, "--num_train_epochs", 1,
                            "--train_file", data_dir / "sft.jsonl", "--router_samples_per_domain", 1)
    assert results["cached_rows"] == 6


def test_router_feature_cache_is_float32_memory_mapped_and_exact(tmp_path):
    import numpy as np

    from chimera_mixpert.training import RouterFeatureCache

    chunks = [torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7).bfloat16()]
    cache = RouterFeatureCache(str(tmp_path))
    for i, chunk in enumerate(chunks):
        cache.append(chunk, [i] * len(chunk))
    cache.close()
    assert cache.features.dtype == torch.float32 and cache.features.shape == (8, 7)
    assert isinstance(cache._mapped, np.memmap) and cache.features.data_ptr() == cache._mapped.ctypes.data
    assert torch.equal(cache.features, torch.cat([c.float() for c in chunks]))
    assert cache[6]["labels"] == 1 and torch.equal(cache[6]["features"], chunks[1][1].float())
    path = cache.path
    del cache
    import gc

    gc.collect()
    assert not os.path.exists(path)  # the file goes with the cache


@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_dpo_trains_the_llm_and_leaves_router_and_experts(data_dir, tmp_path, kind):
    from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert

    kwargs = dict(image_size=32, patch_size=8, seed=0, generalist_kwargs={"hidden_size": 32})
    if kind == "chimera":
        experts = {"table": "pix2struct_vision_model", "chart": "siglip_vision_model", "math": "clip_vision_model"}
        initial = snapshot(build_tiny_chimera("internvl", experts, **kwargs)[0])
    else:
        initial = snapshot(build_tiny_mixpert("internvl", DOMAINS, **kwargs)[0])
    trainer = run_script("dpo", f"{kind}_dpo.yaml", "--output_dir", tmp_path, "--max_steps", 2,
                         "--train_file", data_dir / "pref.jsonl", "--save_strategy", "no")
    moved = changed(initial, trainer.model)
    assert moved and all(".language_model." in n or n == "lm_head.weight" for n in moved)
    assert any(h.get("rewards/accuracies") is not None for h in trainer.state.log_history)


def test_dpo_refuses_a_max_length_that_would_cut_image_tokens(data_dir, tmp_path, monkeypatch):
    import train.dpo

    longest = {}
    real = train.dpo.check_lengths
    monkeypatch.setattr(train.dpo, "check_lengths", lambda *a, **k: longest.setdefault("n", real(*a, **k)))
    run_script("dpo", "chimera_dpo.yaml", "--output_dir", tmp_path / "ok", "--max_steps", 1,
               "--train_file", data_dir / "pref.jsonl", "--save_strategy", "no")  # TRL's default, 1024: fits
    assert 0 < longest["n"] < 1024
    short = longest["n"] - 1  # one token short: the longest row would lose a token
    with pytest.raises(ValueError, match=rf"row \d+ is {longest['n']} tokens long .* --max_length is {short}: TRL "
                                         rf"would cut it, image tokens included. Pass --max_length {longest['n']}"):
        run_script("dpo", "chimera_dpo.yaml", "--output_dir", tmp_path / "short", "--max_steps", 1,
                   "--train_file", data_dir / "pref.jsonl", "--save_strategy", "no", "--max_length", short)
    longest.clear()
    run_script("dpo", "chimera_dpo.yaml", "--output_dir", tmp_path / "exact", "--max_steps", 1,
               "--train_file", data_dir / "pref.jsonl", "--save_strategy", "no", "--max_length", short + 1)
    assert longest["n"] == short + 1


def test_bad_training_inputs_raise_clear_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="--stage must be 1, 2 or router"):
        run_script("chimera", "chimera_stage1.yaml", "--output_dir", tmp_path, "--stage", 3,
                   "--train_file", data_dir / "sft.jsonl")
    with pytest.raises(ValueError, match="--phase must be 'experts' or 'router'"):
        run_script("mixpert", "mixpert_experts.yaml", "--output_dir", tmp_path, "--phase", "all",
                   "--train_file", data_dir / "sft.jsonl")
    with pytest.raises(ValueError, match="router does not train with DPO"):
        run_script("dpo", "chimera_dpo.yaml", "--output_dir", tmp_path, "--train_groups", "router",
                   "--train_file", data_dir / "pref.jsonl")
    with pytest.raises(ValueError, match=r"--domains \['poetry'\] are not experts"):
        run_script("mixpert", "mixpert_experts.yaml", "--output_dir", tmp_path, "--domains", "poetry",
                   "--train_file", data_dir / "sft.jsonl")


def test_router_loss_is_scaled_for_gradient_accumulation(data_dir, tmp_path):
    """One optimizer step on the same 4 rows: batch 4 x GA 1 and batch 2 x GA 2 must give the same weights (plain
    SGD), which holds only if the router loss is not counted once per micro-batch."""
    results = {}
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = run_script("chimera", "chimera_stage1.yaml", "--output_dir", tmp_path / f"b{batch}",
                             "--train_file", data_dir / "sft.jsonl", "--max_steps", 1, "--save_strategy", "no",
                             "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation,
                             "--optim", "sgd", "--learning_rate", 1.0, "--lr_scheduler_type", "constant",
                             "--warmup_steps", 0, "--max_grad_norm", 0)
        results[batch] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trainer.model_accepts_loss_kwargs  # Trainer passes num_items_in_batch and does not divide by GA
    for name, value in results[4].items():
        assert torch.allclose(value, results[2][name], atol=1e-5), name


def _train_subprocess(code: str, cwd, timeout=300):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return result


# Slow tier (about 23 s: it trains, is killed, and trains again); CI runs it in its slow stage.
@pytest.mark.slow
def test_kill_and_resume_reaches_the_same_weights(data_dir, tmp_path):
    """Stage 2 (GSCM's random masks included) for 4 steps, checkpoints every 2: a run killed right after its step-2
    checkpoint and resumed with `--resume_from_checkpoint last` ends with the same weights as an uninterrupted run."""
    common = ["--config", str(TINY / "chimera_stage2.yaml"), "--train_file", str(data_dir / "sft.jsonl"),
              "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3", "--logging_steps", "1"]
    run = """
        import os, sys
        sys.argv = ["train.chimera"] + {args!r}
        import transformers
        if {kill}:
            original = transformers.Trainer._save_checkpoint
            def save_then_die(self, *a, **k):
                original(self, *a, **k)
                if self.state.global_step == 2:
                    os._exit(17)  # killed: no cleanup, no final save
            transformers.Trainer._save_checkpoint = save_then_die
        from train.chimera import main, make_parser
        main(*make_parser().parse_args_and_config())
    """
    straight = _train_subprocess(run.format(args=common + ["--output_dir", str(tmp_path / "straight")], kill=False),
                                 ROOT)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _train_subprocess(run.format(args=common + ["--output_dir", str(tmp_path / "resumed")], kill=True), ROOT)
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = _train_subprocess(run.format(args=common + ["--output_dir", str(tmp_path / "resumed"),
                                                          "--resume_from_checkpoint", "last"], kill=False), ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_process_data_parallel_stage_1(data_dir, tmp_path):
    """`torchrun --nproc_per_node 2` starts two gloo processes on this CPU machine; the run sees world size 2."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "train.chimera",
               "--config", str(TINY / "chimera_stage1.yaml"), "--output_dir", str(tmp_path),
               "--train_file", str(data_dir / "sft.jsonl"), "--max_steps", "3", "--save_strategy", "no"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3


def test_assemble_cli_builds_loadable_starting_checkpoints(tmp_path):
    from transformers import AutoModelForImageTextToText

    from chimera_mixpert.tiny import (
        build_expert,
        build_expert_image_processor,
        build_generalist,
        build_processor,
        build_tokenizer,
    )
    from train.assemble import main as assemble, make_parser

    tokenizer = build_tokenizer("qwen2_vl")
    build_generalist("qwen2_vl", tokenizer, num_vision_layers=3).save_pretrained(tmp_path / "base")
    build_processor("qwen2_vl", tokenizer).save_pretrained(tmp_path / "base")
    for family in ("clip_vision_model", "siglip_vision_model"):
        build_expert(family).save_pretrained(tmp_path / family)
        build_expert_image_processor(family).save_pretrained(tmp_path / family)
    assemble(make_parser().parse_args([
        "chimera", "--generalist", str(tmp_path / "base"), "--expert", f"math={tmp_path / 'clip_vision_model'}",
        "--expert", f"chart={tmp_path / 'siglip_vision_model'}", "--expert_feature_layer", "math=-2",
        "--output_dir", str(tmp_path / "chimera"),
    ]))
    chimera = AutoModelForImageTextToText.from_pretrained(tmp_path / "chimera", trust_remote_code=True)
    assert chimera.config.domains == ["math", "chart"] and chimera.config.experts[0].feature_layer == -2
    assemble(make_parser().parse_args([
        "mixpert", "--base", str(tmp_path / "base"), "--domains", "chart", "document",
        "--output_dir", str(tmp_path / "mixpert"),
    ]))
    mixpert = AutoModelForImageTextToText.from_pretrained(tmp_path / "mixpert", trust_remote_code=True)
    assert mixpert.config.domains == ["chart", "document"] and mixpert.config.num_expert_layers == 2
    assemble(make_parser().parse_args([
        "mixpert", "--base", str(tmp_path / "base"), "--domains", "chart", "--num_expert_layers", "0",
        "--expert_adapter", "lora", "--expert_lora_rank", "4", "--output_dir", str(tmp_path / "mixpert-lora"),
    ]))
    lora = AutoModelForImageTextToText.from_pretrained(tmp_path / "mixpert-lora", trust_remote_code=True)
    assert (lora.config.num_expert_layers, lora.config.expert_adapter, lora.config.expert_lora_rank,
            lora.config.expert_lora_alpha) == (0, "lora", 4, 8)
    assert {name.rsplit(".", 1)[-1] for name, _ in lora.model.vision_experts.named_parameters()} >= {"lora_A", "lora_B"}
    with pytest.raises(ValueError, match="DOMAIN=VALUE"):
        assemble(make_parser().parse_args(["chimera", "--generalist", "x", "--expert", "nodomain",
                                           "--output_dir", str(tmp_path / "bad")]))


def test_per_group_learning_rates_refuse_optimizer_factories(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from chimera_mixpert.training import GroupLearningRateTrainer

    model = torch.nn.Linear(2, 2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = GroupLearningRateTrainer(model=model, args=args, lr_groups=[([model.bias], 1e-2)])
    monkeypatch.setattr(GroupLearningRateTrainer, "get_optimizer_cls_and_kwargs",
                        staticmethod(lambda args, model=None: (lambda: None, {})))
    with pytest.raises(ValueError, match="cannot take this script's per-group learning rates; use --optim adamw_torch"):
        trainer.create_optimizer()


def test_dpo_policy_and_reference_see_the_same_inputs_after_a_gscm_stage(tmp_path):
    """A stage-2 checkpoint keeps `gscm_ratio` > 0; DPO runs the policy in train mode and the reference in eval mode,
    so the ratio must be off for both, or the policy's image tokens are masked and the reference's are not
    (with policy = reference the log-probability ratios then differ from 0)."""
    import torch

    from chimera_mixpert.tiny import build_tiny_chimera, chat_prompt, random_images
    from train.dpo import load_models, make_parser

    model, processor = build_tiny_chimera("internvl", gscm_ratio=0.5)
    model.save_pretrained(tmp_path / "stage2")
    processor.save_pretrained(tmp_path / "stage2")
    script_args, _, model_args, _, _ = make_parser().parse_args_into_dataclasses(
        ["--model_name_or_path", str(tmp_path / "stage2"), "--output_dir", str(tmp_path / "dpo"), "--use_cpu", "true"]
    )
    _, policy, reference, processor = load_models(model_args, script_args)
    assert policy.config.gscm_ratio == 0.0 and reference.config.gscm_ratio == 0.0
    inputs = processor(images=random_images(1), text=[chat_prompt(processor)], return_tensors="pt")
    policy.train()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(policy(**inputs, expert_labels=torch.tensor([1])).logits,
                           reference(**inputs, expert_labels=torch.tensor([1])).logits)


def test_router_phases_ignore_gradient_checkpointing_from_a_stage_config(data_dir, tmp_path):
    # The real stage configs turn gradient checkpointing on; the router phase reuses them and trains a bare MLP.
    run_script("chimera", "chimera_stage1.yaml", "--stage", "router", "--output_dir", tmp_path / "c", "--max_steps", 2,
               "--train_file", data_dir / "sft.jsonl", "--save_strategy", "no", "--gradient_checkpointing", "true")
    _, results = run_script("mixpert", "mixpert_router.yaml", "--output_dir", tmp_path / "m", "--max_steps", 2,
                            "--train_file", data_dir / "sft.jsonl", "--gradient_checkpointing", "true")
    assert results["cached_rows"] == 12


def _small_updates_kept(use_master_weights, training_args, steps=40):
    """Fraction of a bf16 layer's weights changed by `steps` AdamW steps at the real expert phase's rate (2e-6)."""
    from chimera_mixpert.training import fp32_master_weights

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    start = layer.weight.detach().clone()
    inputs = torch.randn(8, 64)
    with fp32_master_weights(layer, training_args) if use_master_weights else torch.no_grad():
        optimizer = torch.optim.AdamW(layer.parameters(), lr=2e-6)
        for _ in range(steps):
            with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                layer(inputs.to(torch.bfloat16)).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert layer.weight.dtype == torch.bfloat16  # given back in the model's dtype
    return (layer.weight != start).float().mean().item()


def test_fp32_master_weights_keep_the_small_updates_bf16_rounds_away(tmp_path, caplog):
    from transformers import TrainingArguments

    from chimera_mixpert.training import fp32_master_weights

    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none")
    without, kept = _small_updates_kept(False, args), _small_updates_kept(True, args)
    assert without < 0.05 and kept > 0.2, (without, kept)  # measured: 0.011 and 0.256
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    weight = model[1].weight
    with fp32_master_weights(model, args) as upcast:
        assert [p is weight for p in upcast] == [True, False]  # the same Parameter objects: optimizers keep them
        assert (model[0].weight.dtype, model[1].weight.dtype) == (torch.bfloat16, torch.float32)
    assert model[1].weight.dtype == torch.bfloat16
    no_autocast = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with caplog.at_level("WARNING"), fp32_master_weights(model, no_autocast) as upcast:
        assert upcast == [] and model[1].weight.dtype == torch.bfloat16
    assert "no mixed precision is on" in caplog.text and "--bf16 true" in caplog.text


def test_under_deepspeed_or_fsdp_the_gathered_state_is_saved_with_the_router_in_fp32(tmp_path):
    """DeepSpeed casts the whole module to bf16 and ZeRO-3 / FSDP hold shards: `finish` saves what
    `accelerator.get_state_dict` gathers, as `Trainer.save_model` does, with the router back in fp32."""
    from types import SimpleNamespace

    from chimera_mixpert.tiny import build_tiny_chimera
    from chimera_mixpert.training import gathered_state_dict, save_atomically
    from modeling_chimera import ChimeraForConditionalGeneration

    model, _ = build_tiny_chimera("internvl")
    gathered = {n: t.to(torch.bfloat16) + 1 for n, t in model.state_dict().items()}  # what DeepSpeed would hold
    seen = []
    accelerator = SimpleNamespace(get_state_dict=lambda wrapped: seen.append(wrapped) or gathered)
    plain = SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=False)
    assert gathered_state_dict(plain, model) is None and gathered_state_dict(None, model) is None
    trainer = SimpleNamespace(is_deepspeed_enabled=True, is_fsdp_enabled=False, deepspeed="engine",
                              accelerator=accelerator, model=model)
    state = gathered_state_dict(trainer, model)
    assert seen == ["engine"]  # the engine, as Trainer.save_model passes it
    assert {t.dtype for n, t in state.items() if n.startswith("model.router.")} == {torch.float32}
    assert {t.dtype for n, t in state.items() if not n.startswith("model.router.")} == {torch.bfloat16}
    save_atomically(str(tmp_path), model, state_dict=state)
    loaded = ChimeraForConditionalGeneration.from_pretrained(tmp_path)
    name = "model.generalist.language_model.embed_tokens.weight"
    assert torch.equal(loaded.state_dict()[name], gathered[name])  # the gathered weights, not the module's
