"""Mixpert LoRA experts (`expert_adapter="lora"`): low-rank updates of the versatile expert instead of full copies.

Exactly the versatile expert at creation, the math of `W + alpha / r * B @ A`, gradients under gradient
checkpointing, the expert phase of `train.mixpert` training only the tuned domain's LoRA parameters, the
`trust_remote_code` round trip, the parameter accounting, the config's checks, and the storage at LLaVA-OneVision-7B
width (meta device: no memory, no arithmetic)."""

import copy
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from chimera_mixpert.data.export import export_sft_jsonl
from chimera_mixpert.model_card import render_model_card
from chimera_mixpert.tiny import (
    FAMILIES,
    build_generalist_config,
    build_tiny_mixpert,
    build_tokenizer,
    chat_prompt,
    random_images,
)
from configuration_mixpert import MixpertConfig
from modeling_mixpert import MixpertForConditionalGeneration, MixpertLoraLinear, versatile_modules
from tests.test_mixpert import DOMAINS, batch, build

LORA = {"expert_adapter": "lora", "expert_lora_rank": 4, "expert_lora_alpha": 8}


def lora_linears(expert):
    return [m for m in expert.modules() if isinstance(m, MixpertLoraLinear)]


def randomise_b(model, seed=1):
    """Give every expert a non-zero update (as after tuning)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for expert in model.model.vision_experts.values():
            for linear in lora_linears(expert):
                linear.lora_B.normal_(0.0, 0.1)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_experts_equal_the_versatile_expert_exactly_at_creation(family):
    model, twin, processor = build(family, **LORA)
    inputs = batch(processor)
    with torch.no_grad():
        reference = twin(**inputs).logits
        for expert in range(len(DOMAINS) + 1):
            logits = model(**inputs, expert_labels=torch.full((3,), expert)).logits
            assert (logits - reference).abs().max().item() == 0.0, expert
        assert (model(**inputs).logits - reference).abs().max().item() == 0.0
    for expert in model.model.vision_experts.values():
        linears = lora_linears(expert)
        assert linears and all(not m.lora_B.any() and m.lora_A.abs().sum() > 0 for m in linears)  # PEFT's init
        assert all(m.lora_A.shape[0] == 4 and m.lora_B.shape[1] == 4 for m in linears)
        assert expert.lora_scaling == 2.0
    # The versatile matrices are stored once: an expert holds LoRA pairs and vectors (norms, biases, layer scales).
    expert_keys = {k: v for k, v in model.state_dict().items() if ".vision_experts." in k}
    assert all(k.endswith(("lora_A", "lora_B")) or v.ndim == 1 for k, v in expert_keys.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_expert_runs_the_versatile_weights_plus_the_low_rank_update(family):
    """A full-copy expert holding `W + alpha / r * B @ A` (and the LoRA expert's vectors) gives the same features."""
    lora, _, processor = build(family, **LORA)
    full, _, _ = build(family)
    randomise_b(lora)
    with torch.no_grad():  # the LoRA expert's vectors differ from the versatile ones too
        for p in lora.model.vision_experts["math"].parameters():
            if p.ndim == 1:
                p.add_(0.05)
    layers, norm, projector = versatile_modules(lora.model.family, lora.config)
    expert = lora.model.vision_experts["math"]
    target = full.model.vision_experts["math"]
    pairs = [(layer, m, t) for layer, m, t in zip(layers, expert.layers, target.layers)]
    pairs += [(projector, expert.projector, target.projector)]
    pairs += [(norm, expert.norm, target.norm)] if norm is not None else []
    with torch.no_grad():
        for source, mirror, twin_module in pairs:
            for name, value in mirror.parameters_for(source, expert.lora_scaling).items():
                twin_module.get_parameter(name).copy_(value)
            for linear in (m for m in source.modules() if isinstance(m, nn.Linear)):  # the update is not zero
                merged = mirror.parameters_for(source, expert.lora_scaling)[_name_in(source, linear) + ".weight"]
                assert not torch.equal(merged, linear.weight)
    inputs = batch(processor)
    keys = {k: inputs[k] for k in ("image_sizes", "batch_num_images", "image_grid_thw") if k in inputs}
    labels = torch.tensor([3, 0, 3])
    with torch.no_grad():
        ours = lora.model.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids, expert_labels=labels,
                                             **keys)
        theirs = full.model.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids, expert_labels=labels,
                                               **keys)
        versatile = lora.model.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids,
                                                  expert_labels=torch.zeros(3, dtype=torch.long), **keys)
    for a, b in zip(ours.image_features, theirs.image_features):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(ours.image_features[0], versatile.image_features[0], atol=1e-3)  # the update matters
    # image 1 went to the versatile expert (up to the kernels' batch-size-dependent rounding: Qwen2-VL packs patches)
    assert torch.allclose(ours.image_features[1], versatile.image_features[1], atol=1e-6)


def _name_in(root, module):
    return next(name for name, m in root.named_modules() if m is module)


@pytest.mark.parametrize("family", ["qwen2_vl"])  # whose layers take their kwargs from `layers[0].attn.config`
def test_lora_gradients_are_the_same_with_gradient_checkpointing(family):
    """A checkpointed layer recomputes its forward in backward, after the expert's weights were put back: the LoRA
    expert checkpoints the merge with the call, so the gradients are those of the plain run."""
    model, _, processor = build(family, **LORA)
    randomise_b(model)
    model.train()
    inputs = batch(processor)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.zero_grad()
        model(**inputs, expert_labels=torch.tensor([1, 2, 1]), labels=inputs.input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if ".vision_experts." in n and p.grad is not None})
    plain, checkpointed = grads
    assert any("chart" in n and n.endswith("lora_A") for n in plain)
    assert not any(".vision_experts.math." in n for n in plain)  # expert 3 did not run
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6, rtol=1e-4), name
    assert model.model.family.vision_layers()[-1].gradient_checkpointing  # switched back on after each call


def test_expert_phase_trains_only_the_tuned_domains_lora_parameters(tmp_path):
    """`train.mixpert --phase experts --domains math` on a saved LoRA Mixpert: the math expert's A and B change, the
    versatile expert, the LLM, the router and the other experts stay bit-identical; its projector's LoRA parameters
    take the projector learning rate."""
    from chimera_mixpert.training import GroupLearningRateTrainer
    from train.mixpert import main, make_parser

    domains = ["chart", "math"]
    model, processor = build_tiny_mixpert("internvl", domains, image_size=32, patch_size=8, seed=0,
                                          generalist_kwargs={"hidden_size": 32}, **LORA)
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = random_images(4, seed=3, sizes=((32, 32),))
    rows = [{"image": images[i], "question": "What is the value?", "answer": str(i), "domain": domains[i % 2]}
            for i in range(4)]
    export_sft_jsonl(rows, str(tmp_path / "data"), "sft")
    lrs = {}
    original = GroupLearningRateTrainer.create_optimizer

    def spy(self, model=None):
        optimizer = original(self, model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in optimizer.param_groups:
            lrs.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
        return optimizer

    GroupLearningRateTrainer.create_optimizer = spy
    try:
        args = make_parser().parse_args_and_config([
            "--phase", "experts", "--model_name_or_path", str(tmp_path / "start"), "--domains", "math",
            "--train_file", str(tmp_path / "data" / "sft.jsonl"), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
            "--projector_learning_rate", "2e-2", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
            "--dataloader_num_workers", "0"])
        tuned, results = main(*args)
    finally:
        GroupLearningRateTrainer.create_optimizer = original
    after = dict(tuned.named_parameters())
    moved = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    math = {n for n in before if n.startswith("model.vision_experts.math.")}
    assert moved <= math
    lora_names = {n for n in math if n.endswith(("lora_A", "lora_B"))}
    assert lora_names and lora_names <= moved  # B moves at step 1, A from step 2 (its gradient is 0 while B = 0)
    assert {n for n, p in after.items() if p.requires_grad} == math
    assert lrs[2e-2] == {n for n in math if ".projector." in n} and lrs[1e-2] == math - lrs[2e-2]
    assert results["math"]["trainable"]["trainable"] == sum(before[n].numel() for n in math)


def test_saved_lora_mixpert_loads_through_trust_remote_code_with_identical_logits(tmp_path):
    model, processor = build_tiny_mixpert("qwen2_vl", ("chart", "table"), routing_strategy="direct", **LORA)
    randomise_b(model)
    model.save_pretrained(tmp_path)
    inputs = processor(images=random_images(2), text=[chat_prompt(processor)] * 2, return_tensors="pt", padding=True)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__module__.startswith("transformers_modules.")
    assert loaded.config.expert_adapter == "lora" and loaded.config.expert_lora_rank == 4
    with torch.no_grad():
        ours, theirs = model(**inputs), loaded(**inputs)
        forced = [model(**inputs, expert_labels=torch.tensor([e, e])).logits for e in (1, 2)]
        forced_loaded = [loaded(**inputs, expert_labels=torch.tensor([e, e])).logits for e in (1, 2)]
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.expert_index, theirs.expert_index)
    assert all(torch.equal(a, b) for a, b in zip(forced, forced_loaded))
    assert not torch.equal(forced[0], forced[1])  # the two experts differ: the LoRA weights were saved and loaded
    loaded_b = {n: p for n, p in loaded.named_parameters() if n.endswith("lora_B")}
    assert loaded_b and all(torch.equal(p, model.get_parameter(n)) for n, p in loaded_b.items())
    card = str(render_model_card(tmp_path))
    assert "adapted per domain by LoRA updates of rank 4 (alpha 8" in card and "cloned per domain" not in card


def test_parameter_counts_for_lora_experts():
    model, twin, _ = build("internvl", **LORA)
    counts = model.parameter_counts()
    base = sum(p.numel() for p in twin.parameters())
    experts = model.model.vision_experts
    lora = {d: sum(p.numel() for n, p in e.named_parameters() if n.endswith(("lora_A", "lora_B")))
            for d, e in experts.items()}
    assert counts["base"] == base
    assert counts["added_by_experts"] == sum(p.numel() for p in experts.parameters())
    assert counts["total"] == counts["base"] + counts["added_by_experts"] + counts["router"]
    # A LoRA expert adds its matrices to an image's path; its vectors replace the versatile ones.
    assert counts["activated"] == base + counts["router"] + max(lora.values())
    assert counts["added_activated"] == counts["router"] + max(lora.values()) > counts["router"]
    full = build("internvl")[0].parameter_counts()
    assert full["activated"] == full["base"] + full["router"]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"expert_adapter": "adapter"}, ValueError, r"`expert_adapter` must be one of \('full', 'lora'\), got 'adap"),
        ({"expert_adapter": "lora", "expert_lora_rank": 0}, ValueError, "`expert_lora_rank` must be a positive int"),
        ({"expert_adapter": "lora", "expert_lora_rank": 2.5}, ValueError, "`expert_lora_rank` must be a positive"),
        ({"expert_adapter": "lora", "expert_lora_rank": True}, ValueError, "`expert_lora_rank` must be a positive"),
        ({"expert_adapter": "lora", "expert_lora_alpha": 0}, ValueError, "`expert_lora_alpha` must be a positive"),
        ({"expert_lora_rank": 8}, ValueError, r"`expert_lora_rank` only apply to LoRA experts.*expert_adapter='lora'"),
        ({"expert_lora_alpha": 8}, ValueError, r"`expert_lora_alpha` only apply to LoRA experts"),
    ],
)
def test_config_rejects_bad_lora_settings(kwargs, error, message):
    base = build_generalist_config("internvl", build_tokenizer("internvl"), num_vision_layers=3)
    with pytest.raises(error, match=message):
        MixpertConfig(base_config=base, **kwargs)


def test_config_defaults_and_from_base_keywords():
    base = build_generalist_config("internvl", build_tokenizer("internvl"), num_vision_layers=3)
    lora = MixpertConfig(base_config=base, expert_adapter="lora")
    assert (lora.expert_lora_rank, lora.expert_lora_alpha) == (16, 32)
    full = MixpertConfig(base_config=base)
    assert (full.expert_adapter, full.expert_lora_rank, full.expert_lora_alpha) == ("full", None, None)
    reloaded = MixpertConfig.from_dict(lora.to_dict())
    assert (reloaded.expert_adapter, reloaded.expert_lora_rank, reloaded.expert_lora_alpha) == ("lora", 16, 32)
    with pytest.raises(TypeError, match="did you mean 'expert_lora_rank'"):
        build("internvl", expert_adapter="lora", expert_lora_rnak=8)


def test_rank_above_a_layer_width_warns(caplog):
    with caplog.at_level(logging.WARNING):
        model, _, _ = build("llava_onevision", expert_adapter="lora", expert_lora_rank=40)  # tiny widths are 32/64
    assert "expert_lora_rank=40 exceeds min(in, out)" in caplog.text and "layers.0.self_attn" in caplog.text
    assert model.model.vision_experts["chart"].layers[0].self_attn.q_proj.lora_A.shape == (40, 32)


# LLaVA-OneVision-7B (llava-hf/llava-onevision-qwen2-7b-si-hf config.json): SigLIP-so400m/14 at 384 px, 26 layers
# (the last one dropped), 1152 wide, MLP 4304; Qwen2-7B LLM 3584 wide (projector 1152 -> 3584 -> 3584). The LLM's
# depth does not enter an expert's size: one layer keeps the meta-device build quick.
LLAVA_OV_7B_VISION = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=26,
                          image_size=384, patch_size=14, vision_use_head=False, model_type="siglip_vision_model")
QWEN2_7B_TEXT = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, num_hidden_layers=1, vocab_size=152_064)


def _expert_sizes(adapter_kwargs):
    tokenizer = build_tokenizer("llava_onevision")
    config = LlavaOnevisionConfig(vision_config=LLAVA_OV_7B_VISION, text_config=QWEN2_7B_TEXT,
                                  image_token_index=tokenizer.image_token_id,
                                  video_token_index=tokenizer.video_token_id, vision_feature_layer=-1)
    with torch.device("meta"):
        base = LlavaOnevisionForConditionalGeneration(config)
    model = MixpertForConditionalGeneration.from_base(base, domains=("chart", "document", "math", "ocr", "general"),
                                                      num_expert_layers=2, **adapter_kwargs)
    return model, [sum(p.numel() for p in e.parameters()) for e in model.model.vision_experts.values()]


def test_lora_expert_is_under_ten_percent_of_a_full_copy_at_llava_onevision_7b_width():
    full_model, full = _expert_sizes({})
    lora_model, lora = _expert_sizes({"expert_adapter": "lora"})  # default rank 16, alpha 32
    # A full copy: 2 SigLIP layers (4 attention 1152x1152 + 2 MLP 1152x4304 matrices, biases, 2 LayerNorms) and the
    # 2-layer projector: ~47.5M; 5 domains ~237M.
    layer = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    projector = 1152 * 3584 + 3584 + 3584 * 3584 + 3584
    assert full == [2 * layer + projector] * 5
    # LoRA: r * (in + out) per matrix, plus the vectors (biases, LayerNorms) as copies.
    matrices = 2 * (4 * 16 * (1152 + 1152) + 2 * 16 * (1152 + 4304)) + 16 * (1152 + 3584) + 16 * (3584 + 3584)
    vectors = 2 * (4 * 1152 + 4304 + 1152 + 4 * 1152) + 2 * 3584
    assert lora == [matrices + vectors] * 5
    assert lora[0] <= 0.10 * full[0]
    counts = lora_model.parameter_counts()
    assert counts["added_by_experts"] == 5 * lora[0]
    assert counts["activated"] - counts["base"] - counts["router"] == matrices
    assert full_model.parameter_counts()["added_by_experts"] == 5 * full[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_added_flops_are_the_router_and_one_merge_per_adapted_weight(family):
    """A LoRA expert adds to an image's path the router and, per adapted `nn.Linear`, the merge `B @ A`: an
    (out x r) @ (r x in) product, 2 * out * r * in FLOPs (its layers then run at the versatile layers' cost)."""
    model, _, _ = build(family, **LORA)
    router = model.model.vision_router
    router_flops = 2 * (router.fc1.in_features * router.fc1.out_features
                        + router.fc2.in_features * router.fc2.out_features)
    linears = lora_linears(model.model.vision_experts["chart"])
    merges = sum(2 * m.lora_B.shape[0] * 4 * m.lora_A.shape[1] for m in linears)
    # 2 layers of 6 matrices (q, k, v, o, fc1, fc2; Qwen2-VL 4: fused qkv) and the projector's 2
    assert len(linears) == 2 * (4 if family == "qwen2_vl" else 6) + 2
    assert model.parameter_counts()["added_flops_per_image"] == router_flops + merges


def test_from_pretrained_lora_overrides_are_checked_and_must_match_the_weights(tmp_path):
    """Keyword overrides of `from_pretrained` are set on the config after its `__post_init__`: the model checks the
    config again and fills the LoRA defaults (alpha = 2 r), so a mismatch with the saved weights is the load's clear
    error, never a TypeError on an unset alpha and never randomly initialised experts."""
    full, _ = build_tiny_mixpert("internvl", ("chart", "math"), num_vision_layers=2, num_expert_layers=1)
    full.save_pretrained(tmp_path / "full")
    lora, _ = build_tiny_mixpert("internvl", ("chart", "math"), num_vision_layers=2, num_expert_layers=1, **LORA)
    lora.save_pretrained(tmp_path / "lora")
    missing = r"does not match its MixpertConfig: missing weights \[.*lora_A.*Nothing is initialised at random"
    for overrides in ({"expert_adapter": "lora", "expert_lora_rank": 4}, {"expert_adapter": "lora"}):
        with pytest.raises(ValueError, match=missing):
            MixpertForConditionalGeneration.from_pretrained(tmp_path / "full", **overrides)
    with pytest.raises(ValueError, match=r"holds weights whose shapes do not match its MixpertConfig"):
        MixpertForConditionalGeneration.from_pretrained(tmp_path / "lora", expert_lora_rank=8)
    with pytest.raises(ValueError, match=r"`expert_lora_rank`, `expert_lora_alpha` only apply to LoRA experts"):
        MixpertForConditionalGeneration.from_pretrained(tmp_path / "lora", expert_adapter="full")
    with pytest.raises(ValueError, match=r"`expert_lora_rank` must be a positive integer"):
        MixpertForConditionalGeneration.from_pretrained(tmp_path / "lora", expert_lora_rank=0)
    # a matching override loads, with the default alpha filled in: alpha 8 (= 2 * 4, as saved)
    loaded = MixpertForConditionalGeneration.from_pretrained(tmp_path / "lora", expert_lora_alpha=None)
    assert (loaded.config.expert_lora_rank, loaded.config.expert_lora_alpha) == (4, 8)
    assert loaded.model.vision_experts["chart"].lora_scaling == 2.0


def test_lora_expert_in_fp32_over_a_bf16_model_matches_the_fp32_model():
    """The fp32-master-weights training mode (`chimera_mixpert.training.fp32_master_weights`) keeps the trained
    expert in fp32 inside a bf16 model: the expert's weights and vectors are cast to the shared layers' dtype where
    they meet them, the forward runs, equals the fp32 model up to bf16 rounding, and the gradient reaches B in fp32."""
    model, _, processor = build("internvl", **LORA)
    randomise_b(model)
    with torch.no_grad():
        for p in model.model.vision_experts.parameters():
            if p.ndim == 1:
                p.add_(0.05)
    inputs = batch(processor)
    labels = torch.tensor([2, 0, 2])
    with torch.no_grad():
        reference = model.model.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids,
                                                   expert_labels=labels).image_features
        versatile = model.model.get_image_features(inputs.pixel_values, input_ids=inputs.input_ids,
                                                   expert_labels=torch.zeros(3, dtype=torch.long)).image_features
    model.to(torch.bfloat16)
    for p in model.model.vision_experts.parameters():  # as `fp32_master_weights` upcasts the trained parameters
        p.data = p.data.float()
    features = model.model.get_image_features(inputs.pixel_values.to(torch.bfloat16), input_ids=inputs.input_ids,
                                              expert_labels=labels).image_features
    assert all(f.dtype == torch.bfloat16 for f in features)
    for ours, ref in zip(features, reference):
        assert torch.allclose(ours.float(), ref, atol=0.05, rtol=0.05)
    assert not torch.allclose(reference[0], versatile[0], atol=0.05, rtol=0.05)  # the expert's update shows
    features[0].float().square().sum().backward()
    grads = [m.lora_B.grad for m in lora_linears(model.model.vision_experts["document"])]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_lora_mirror_computes_on_the_shared_modules_device_and_dtype():
    """Under an accelerate `device_map` the expert can sit on another device than the versatile module it updates
    (and no hook moves it: the mirror runs no forward). The merged weights and copied vectors go to the module's
    device and dtype (here: a bf16 module on the meta device, the expert on the CPU in fp32), with autograd kept."""
    model, _, _ = build("llava_onevision", **LORA)
    randomise_b(model)
    expert = model.model.vision_experts["chart"]
    projector = copy.deepcopy(model.model.family.projector()).to(device="meta", dtype=torch.bfloat16)
    params = expert.projector.parameters_for(projector, expert.lora_scaling)
    assert set(params) == {n for n, _ in projector.named_parameters()}
    assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in params.values())
    out = torch.func.functional_call(projector, params, (torch.empty(2, 5, 32, device="meta", dtype=torch.bfloat16),))
    assert out.device.type == "meta" and out.shape == (2, 5, 32)
    # On one device the merge keeps autograd through the moves and casts (fp32 B over a bf16 W).
    layer = copy.deepcopy(model.model.family.projector()).to(torch.bfloat16)
    linear = expert.projector.linear_1
    merged = linear.merged_weight(layer.linear_1.weight, expert.lora_scaling)
    expected = layer.linear_1.weight.float() + expert.lora_scaling * linear.lora_B.detach() @ linear.lora_A.detach()
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected.to(torch.bfloat16))
    merged.float().sum().backward()
    assert linear.lora_B.grad is not None and linear.lora_B.grad.dtype == torch.float32
