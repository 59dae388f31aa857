"""Chimera on the three generalist families x several expert families: behaviour, values, errors."""

import copy

import pytest
import torch
from transformers import GenerationConfig

from chimera_mixpert.tiny import (
    FAMILIES,
    build_generalist,
    build_tiny_chimera,
    build_tokenizer,
    chat_prompt,
    random_images,
)
from modeling_chimera import ChimeraForConditionalGeneration


# Two expert families per generalist family, rotating so every expert family meets several generalists.
EXPERT_SETS = {
    "pix2struct+clip": {"table": "pix2struct_vision_model", "math": "clip_vision_model"},
    "siglip+got": {"chart": "siglip_vision_model", "ocr": "got_ocr2"},
    "got_vision+clip": {"document": "got_ocr2_vision", "math": "clip_vision_model"},
}
CASES = [(f, e) for f in FAMILIES for e in ("pix2struct+clip", "siglip+got")] + [("internvl", "got_vision+clip")]


def two_sample_batch(processor, seed=0):
    """Sample 0: one image; sample 1: two images (3 images in all), padded."""
    images = random_images(3, seed=seed, sizes=((16, 16), (24, 16), (16, 32)))
    text = [chat_prompt(processor, 1, "a"), chat_prompt(processor, 2, "b")]
    return processor(images=[[images[0]], images[1:]], text=text, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family,experts", CASES)
def test_forward_backward_with_and_without_labels(family, experts):
    model, processor = build_tiny_chimera(family, EXPERT_SETS[experts])
    inputs = two_sample_batch(processor)
    labels = torch.tensor([1, 0, 2])
    model.train()
    out = model(**inputs, expert_labels=labels, labels=inputs.input_ids)
    assert out.logits.shape == (*inputs.input_ids.shape, model.config.get_text_config().vocab_size)
    assert out.expert_index.tolist() == [1, 0, 2]  # teacher forcing
    assert out.router_logits.shape == (3, 3)
    expected_router = torch.nn.functional.cross_entropy(out.router_logits, labels)
    assert torch.allclose(out.router_loss, expected_router)
    assert torch.allclose(out.loss, out.lm_loss + out.router_loss)
    out.loss.backward()
    assert model.model.router.weight.grad is not None and model.model.router.weight.grad.abs().sum() > 0
    for domain in model.domains:
        assert model.model.expert_projectors[domain].linear_2.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.model.expert_encoders[domain].parameters())

    model.eval()
    with torch.no_grad():
        routed = model(**inputs)
    assert routed.loss is None
    assert torch.equal(routed.expert_index, routed.router_logits.argmax(-1))  # the router decides


@pytest.mark.parametrize("family", FAMILIES)
def test_no_expert_reproduces_the_generalist_exactly(family):
    tokenizer = build_tokenizer(family)
    model, processor = build_tiny_chimera(family, tokenizer=tokenizer, seed=3)
    generalist = build_generalist(family, tokenizer, seed=3)  # same weights as the one inside `model`
    inputs = two_sample_batch(processor)
    native = {k: v for k, v in inputs.items() if k != "expert_pixel_values"}
    with torch.no_grad():
        ours = model(**inputs, expert_labels=torch.zeros(3, dtype=torch.long)).logits
        theirs = generalist(**native).logits
    vocab = theirs.shape[-1]
    assert torch.equal(ours[..., :vocab], theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_tokens_follow_each_image_and_outputs_stay_aligned(family):
    model, processor = build_tiny_chimera(family)
    inputs = two_sample_batch(processor)
    with torch.no_grad():
        out = model.model(**inputs, expert_labels=torch.tensor([1, 0, 2]))
        compact_len = inputs.input_ids.shape[1]
        assert out.last_hidden_state.shape[1] == compact_len
        ids = out.expanded_input_ids
        image_id = model.model.generalist_image_token_id
        table_id, math_id = model.config.expert_token_ids
        table_tokens = model.model.expert_encoders["table"](inputs.expert_pixel_values[0][:1]).shape[1]
        math_tokens = model.model.expert_encoders["math"](inputs.expert_pixel_values[1][:1]).shape[1]
        assert int((ids == table_id).sum()) == table_tokens and int((ids == math_id).sum()) == math_tokens
        # Sample 0: its only image's block starts right after its last image token (InternVL, official layout:
        # after `</img>`, wrapped in `<domain>` ... `</domain>`).
        row0 = ids[0].tolist()
        last_image = max(i for i, t in enumerate(row0) if t == image_id)
        config = model.config
        offset = 3 if family == "internvl" else 1
        assert row0[last_image + offset : last_image + offset + table_tokens] == [table_id] * table_tokens
        if family == "internvl":
            end_image = processor.generalist.end_image_token_id
            assert row0[last_image + 1] == config.expert_insert_after_token_id == end_image
            assert row0[last_image + 2] == config.expert_start_token_id
            assert row0[last_image + offset + table_tokens] == config.expert_end_token_id
        else:
            assert config.expert_start_token_id is None and config.expert_insert_after_token_id is None
        # Sample 1: no block after image 1 (label 0), a math block right after image 2.
        row1 = ids[1].tolist()
        runs, start = [], None
        for i, t in enumerate(row1 + [-1]):
            if t == image_id and start is None:
                start = i
            if t != image_id and start is not None:
                runs.append((start, i - 1))
                start = None
        if family == "llava_onevision":  # adjacent images form one run: split it by the per-image token counts
            counts = [f.shape[0] for f in model.model.encode_generalist(
                inputs.pixel_values, input_ids=inputs.input_ids, image_sizes=inputs.image_sizes,
                batch_num_images=inputs.batch_num_images)[0]][1:]
            (s, _), = runs if len(runs) == 1 else (runs[0],)
            runs = [(s, s + counts[0] - 1), (s + counts[0], s + counts[0] + counts[1] - 1)]
        first_end, second_end = runs[0][1], runs[-1][1]
        assert row1[first_end + offset] not in (math_id, config.expert_start_token_id)
        assert row1[second_end + offset : second_end + offset + math_tokens] == [math_id] * math_tokens

        # Compact-mode outputs equal the expanded run, read at the caller's positions.
        expanded = model.model(
            input_ids=ids, attention_mask=out.expanded_attention_mask, pixel_values=inputs.pixel_values,
            expert_pixel_values=inputs.expert_pixel_values,
            **{k: inputs[k] for k in ("image_sizes", "batch_num_images", "image_grid_thw") if k in inputs},
            **({"mm_token_type_ids": _expand_types(inputs, ids, model)} if "mm_token_type_ids" in inputs else {}),
        )
        assert torch.equal(expanded.expert_index, out.expert_index)
        layout = model.model.layout(
            inputs.input_ids, model.get_image_features(
                inputs.pixel_values, input_ids=inputs.input_ids, expert_pixel_values=inputs.expert_pixel_values,
                expert_labels=torch.tensor([1, 0, 2]),
                **{k: inputs[k] for k in ("image_sizes", "batch_num_images", "image_grid_thw") if k in inputs},
            ), inputs.attention_mask, inputs.get("mm_token_type_ids"),
        )
        gathered = expanded.last_hidden_state.gather(
            1, layout.source_positions.unsqueeze(-1).expand(-1, -1, expanded.last_hidden_state.shape[-1])
        )
        assert torch.allclose(gathered, out.last_hidden_state, atol=1e-6)


def _expand_types(inputs, ids, model):
    # Expert tokens are text for Qwen2-VL's M-RoPE; image tokens keep type 1.
    return (ids == model.model.generalist_image_token_id).long()


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_side_and_batching_do_not_change_a_sample(family):
    model, processor = build_tiny_chimera(family)
    images = random_images(2, seed=5)
    prompts = [chat_prompt(processor, 1, "a short one"), chat_prompt(processor, 1, "a much longer question here")]
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        alone = model(**processor(images=[images[1]], text=[prompts[1]], return_tensors="pt"),
                      expert_labels=labels[1:]).logits[0]
        for side in ("left", "right"):
            processor.tokenizer.padding_side = side
            batch = processor(images=[[images[0]], [images[1]]], text=prompts, return_tensors="pt", padding=True)
            logits = model(**batch, expert_labels=labels).logits[1]
            keep = batch.attention_mask[1].bool()
            assert torch.allclose(logits[keep], alone, atol=1e-5), side
    processor.tokenizer.padding_side = "left"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_routes_before_decoding_and_matches_uncached_greedy(family):
    model, processor = build_tiny_chimera(family, {"chart": "siglip_vision_model", "ocr": "got_ocr2"})
    inputs = two_sample_batch(processor, seed=1)
    labels = torch.tensor([2, 1, 0])
    with torch.no_grad():
        out = model.generate(**inputs, expert_labels=labels, max_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True)
    prompt_len = inputs.input_ids.shape[1]
    assert torch.equal(out.sequences[:, :prompt_len], inputs.input_ids)  # expert tokens removed again
    assert out.expert_index.tolist() == [2, 1, 0]
    # Greedy decoding by full forward passes on the compact sequence (no cache) gives the same tokens.
    ids, mask = inputs.input_ids, inputs.attention_mask
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    types = inputs.get("mm_token_type_ids")
    with torch.no_grad():
        for _ in range(5):
            step = model(input_ids=ids, attention_mask=mask, expert_labels=labels, **extra,
                         **({"mm_token_type_ids": types} if types is not None else {}))
            next_token = step.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            if types is not None:
                types = torch.cat([types, torch.zeros_like(next_token)], dim=1)
    assert torch.equal(out.sequences, ids)


@pytest.mark.parametrize("family", ["internvl", "llava_onevision"])
def test_generate_max_length_counts_the_callers_prompt_not_the_expert_tokens(family):
    model, processor = build_tiny_chimera(family)
    model.generation_config.eos_token_id = None  # decode every allowed step
    inputs = two_sample_batch(processor, seed=3)
    prompt_len, labels = inputs.input_ids.shape[1], torch.tensor([1, 2, 1])
    with torch.no_grad():
        reference = model.generate(**inputs, expert_labels=labels, max_new_tokens=6, do_sample=False)
        by_length = model.generate(**inputs, expert_labels=labels, max_length=prompt_len + 6, do_sample=False)
        by_config = model.generate(**inputs, expert_labels=labels,
                                   generation_config=GenerationConfig(max_length=prompt_len + 6, do_sample=False))
        model.generation_config.max_length = prompt_len + 6  # the model's own default counts the same way
        by_default = model.generate(**inputs, expert_labels=labels, do_sample=False)
        model.generation_config.max_length = None
        eos = int(reference[0, prompt_len + 1])  # row 0 would stop at its second new token
        free = model.generate(**inputs, expert_labels=labels, max_new_tokens=6, do_sample=False, eos_token_id=eos)
        held = model.generate(**inputs, expert_labels=labels, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                              min_length=prompt_len + 4)
    assert reference.shape == (2, prompt_len + 6)
    for out in (by_length, by_config, by_default):
        assert torch.equal(out, reference)
    assert eos in free[0, prompt_len:prompt_len + 2].tolist()
    assert eos not in held[0, prompt_len:prompt_len + 4].tolist()  # min_length counts the caller's prompt too


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_a_prompt_that_already_holds_expert_tokens_keeps_its_experts(family):
    model, processor = build_tiny_chimera(family)
    model.generation_config.eos_token_id = None
    inputs = two_sample_batch(processor, seed=3)
    image_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        routed = model(**inputs).expert_index
        labels = torch.where(routed == 1, 2, 1)  # experts the router would not choose
        step = model.model(**inputs, expert_labels=labels)
        reference = model.generate(**inputs, expert_labels=labels, max_new_tokens=4, do_sample=False)
        expanded = dict(image_inputs, input_ids=step.expanded_input_ids, attention_mask=step.expanded_attention_mask)
        if "mm_token_type_ids" in inputs:
            expanded["mm_token_type_ids"] = (step.expanded_input_ids == model.model.generalist_image_token_id).long()
        out = model.generate(**expanded, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="disagree with the expert tokens"):
            model.generate(**expanded, expert_labels=routed, max_new_tokens=1)
    assert out.expert_index.tolist() == labels.tolist()
    prompt_len = step.expanded_input_ids.shape[1]
    assert torch.equal(out.sequences[:, :prompt_len], step.expanded_input_ids)  # the prompt as given
    assert torch.equal(out.sequences[:, prompt_len:], reference[:, inputs.input_ids.shape[1]:])


def test_generate_with_router_decision_beam_search_and_text_only_rows():
    model, processor = build_tiny_chimera("internvl")
    images = random_images(1, seed=2)
    text = [chat_prompt(processor, 1, "a"), processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "no image here"}]}], add_generation_prompt=True)]
    inputs = processor(images=[images[0]], text=text, return_tensors="pt", padding=True)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        beams = model.generate(**inputs, expert_labels=torch.tensor([1]), max_new_tokens=3, num_beams=2,
                               num_return_sequences=2, do_sample=False)
    assert greedy.shape == (2, inputs.input_ids.shape[1] + 3)
    assert beams.shape == (4, inputs.input_ids.shape[1] + 3)
    assert torch.equal(beams[:, : inputs.input_ids.shape[1]], inputs.input_ids.repeat_interleave(2, dim=0))


def test_text_only_samples_mix_with_image_samples():
    model, processor = build_tiny_chimera("qwen2_vl")
    images = random_images(1)
    text_only = processor.apply_chat_template([{"role": "user", "content": "just text"}], add_generation_prompt=True)
    batch = processor(images=[images[0]], text=[chat_prompt(processor, 1), text_only], return_tensors="pt",
                      padding=True)
    out = model(**batch, expert_labels=torch.tensor([1]), labels=batch.input_ids)
    assert torch.isfinite(out.loss)
    text_batch = processor(text=[text_only], return_tensors="pt")
    assert model(**text_batch, labels=text_batch.input_ids).router_logits is None


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_experts_unchanged_and_trainables_changed_after_steps(family):
    model, processor = build_tiny_chimera(family)
    inputs = two_sample_batch(processor)
    frozen = {n: p.clone() for n, p in model.model.expert_encoders.named_parameters()}
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in model.model.expert_encoders.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(**inputs, expert_labels=torch.tensor([1, 0, 2]), labels=inputs.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.model.expert_encoders.named_parameters():
        assert torch.equal(param, frozen[name]), name
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert "model.router.weight" in changed
    assert any(n.startswith("model.expert_projectors.table.") for n in changed)
    assert any(n.startswith("model.expert_projectors.math.") for n in changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_gscm_masks_exactly_the_fraction_and_only_in_training(family):
    model, processor = build_tiny_chimera(family, gscm_ratio=0.5)
    inputs = two_sample_batch(processor)
    labels = torch.tensor([1, 0, 2])
    image_id = model.model.generalist_image_token_id
    model.train()
    torch.manual_seed(0)
    out = model.model(**inputs, expert_labels=labels)
    features = model.get_image_features(
        inputs.pixel_values, input_ids=inputs.input_ids, expert_pixel_values=inputs.expert_pixel_values,
        expert_labels=labels,
        **{k: inputs[k] for k in ("image_sizes", "batch_num_images", "image_grid_thw") if k in inputs},
    )
    counts = [f.shape[0] for f in features.generalist_features]
    layout = model.model.layout(inputs.input_ids, features, inputs.attention_mask, inputs.get("mm_token_type_ids"))
    masked = [int((out.expanded_attention_mask[row, pos] == 0).sum()) for row, pos in
              zip(layout.image_rows, layout.image_positions)]
    assert masked == [int(0.5 * counts[0]), 0, int(0.5 * counts[2])]
    # Only generalist image tokens of expert images are masked; text, padding and expert tokens are untouched.
    expected = layout.attention_mask.clone()
    for row, pos, k in zip(layout.image_rows, layout.image_positions, labels.tolist()):
        if k:
            expected[row, pos] = out.expanded_attention_mask[row, pos]
    assert torch.equal(out.expanded_attention_mask, expected)
    newly_masked = (out.expanded_attention_mask == 0) & (layout.attention_mask == 1)
    assert int(newly_masked.sum()) == sum(masked)
    assert bool((out.expanded_input_ids[newly_masked] == image_id).all())
    # Fresh positions on every call (uniformly random), never in eval mode.
    again = model.model(**inputs, expert_labels=labels).expanded_attention_mask
    assert not torch.equal(again, out.expanded_attention_mask)
    model.eval()
    with torch.no_grad():
        evaluated = model.model(**inputs, expert_labels=labels)
    assert torch.equal(evaluated.expanded_attention_mask, layout.attention_mask)


def test_gscm_positions_are_uniform_over_the_image():
    model, processor = build_tiny_chimera("llava_onevision", gscm_ratio=0.25)
    inputs = processor(images=random_images(1), text=[chat_prompt(processor)], return_tensors="pt")
    model.train()
    hits = None
    torch.manual_seed(0)
    for _ in range(200):
        out = model.model(**inputs, expert_labels=torch.tensor([1]))
        zeros = (out.expanded_attention_mask[0] == 0).float()
        hits = zeros if hits is None else hits + zeros
    image_positions = (out.expanded_input_ids[0] == model.model.generalist_image_token_id).nonzero().squeeze(-1)
    rate = hits[image_positions] / 200
    assert int(hits.sum()) == 200 * int(0.25 * image_positions.numel())
    assert float(rate.min()) > 0.1 and float(rate.max()) < 0.4  # each position ~0.25


def test_only_the_routed_experts_encoder_runs(monkeypatch):
    model, processor = build_tiny_chimera("internvl")
    inputs = two_sample_batch(processor)
    seen = {}
    for domain, encoder in model.model.expert_encoders.items():
        original = encoder.forward
        monkeypatch.setattr(encoder, "forward",
                            lambda x, d=domain, f=original: (seen.setdefault(d, []).append(x.shape[0]), f(x))[1])
    with torch.no_grad():
        model(**inputs, expert_labels=torch.tensor([2, 0, 2]))
    assert seen == {"math": [2]}


def test_expert_encoders_stay_in_eval_mode_when_training():
    model, _ = build_tiny_chimera("internvl")
    model.train()
    assert model.training and model.model.router.training
    assert not any(m.training for m in model.model.expert_encoders.modules())


def test_from_generalist_reuses_modules_and_reserves_expert_tokens():
    tokenizer = build_tokenizer("internvl")
    generalist = build_generalist("internvl", tokenizer)
    vocab = generalist.config.get_text_config().vocab_size
    from chimera_mixpert.tiny import build_expert

    experts = {"table": build_expert("pix2struct_vision_model"), "math": build_expert("clip_vision_model")}
    with pytest.raises(ValueError, match=r"needs the id of `</img>`: pass image_end_token_id=processor.end_image_"):
        ChimeraForConditionalGeneration.from_generalist(generalist, experts)
    with pytest.raises(ValueError, match="a llava_onevision generalist takes expert_layout='plain'"):
        ChimeraForConditionalGeneration.from_generalist(
            build_generalist("llava_onevision", build_tokenizer("llava_onevision")), experts, expert_layout="official")
    image_end = tokenizer.convert_tokens_to_ids("</img>")
    model = ChimeraForConditionalGeneration.from_generalist(generalist, experts, image_end_token_id=image_end)
    assert model.model.generalist is generalist.model and model.lm_head is generalist.lm_head
    # The official layout `</img><domain><expert tokens></domain>`: two wrapper tokens get rows after the experts'
    assert model.config.expert_token_ids == [vocab, vocab + 1]
    assert (model.config.expert_start_token_id, model.config.expert_end_token_id) == (vocab + 2, vocab + 3)
    assert model.config.expert_insert_after_token_id == image_end
    assert model.get_input_embeddings().weight.shape[0] == vocab + 4
    assert model.config.get_text_config().vocab_size == vocab + 4
    assert set(model.generation_config.suppress_tokens) >= {vocab, vocab + 1, vocab + 2, vocab + 3}
    plain = ChimeraForConditionalGeneration.from_generalist(build_generalist("internvl", tokenizer), experts,
                                                            expert_layout="plain")
    assert plain.config.expert_start_token_id is None and plain.get_input_embeddings().weight.shape[0] == vocab + 2
    assert model.domains == ["table", "math"]
    assert not model.model.router.weight.is_meta and model.model.router.weight.abs().sum() > 0


def test_from_generalist_loads_paths(tmp_path):
    from chimera_mixpert.tiny import build_expert

    tokenizer = build_tokenizer("llava_onevision")
    build_generalist("llava_onevision", tokenizer).save_pretrained(tmp_path / "generalist")
    build_expert("siglip_vision_model").save_pretrained(tmp_path / "siglip")
    build_expert("got_ocr2").save_pretrained(tmp_path / "got")
    model = ChimeraForConditionalGeneration.from_generalist(
        str(tmp_path / "generalist"), {"chart": str(tmp_path / "siglip"), "ocr": {"model": str(tmp_path / "got")}}
    )
    assert [e.vision_config.model_type for e in model.config.experts] == ["siglip_vision_model", "got_ocr2"]
    reference = build_expert("got_ocr2")
    assert torch.equal(model.model.expert_encoders["ocr"].encoder.conv_upsampler2.weight,
                       reference.model.multi_modal_projector.conv_upsampler2.weight)


def test_from_generalist_takes_a_full_kosmos_2_5_as_an_expert(tmp_path):
    # The official table expert is Kosmos-2.5's encoder; a whole Kosmos-2.5 checkpoint (object or folder) gives it.
    from transformers import Kosmos2_5Config, Kosmos2_5ForConditionalGeneration

    torch.manual_seed(0)
    kosmos = Kosmos2_5ForConditionalGeneration(Kosmos2_5Config(
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           head_dim=6, patch_embed_hidden_size=48, max_num_patches=16),
        text_config=dict(vocab_size=64, embed_dim=24, ffn_dim=48, layers=1, attention_heads=4),
        latent_query_num=4,
    )).eval()
    kosmos.save_pretrained(tmp_path / "kosmos")
    tokenizer = build_tokenizer("internvl")
    for spec in (kosmos, str(tmp_path / "kosmos")):
        model = ChimeraForConditionalGeneration.from_generalist(build_generalist("internvl", tokenizer),
                                                                {"table": spec}, expert_layout="plain")
        encoder = model.model.expert_encoders["table"]
        assert model.config.experts[0].vision_config.model_type == "kosmos_2_5_vision_model"
        assert type(encoder.encoder).__name__ == "Kosmos2_5VisionModel"
        for name, weight in kosmos.vision_model.state_dict().items():
            assert torch.equal(encoder.encoder.state_dict()[name], weight), name
        rows_cols = torch.stack(torch.meshgrid(torch.arange(1, 5.0), torch.arange(1, 5.0), indexing="ij"), -1)
        patches = torch.cat([rows_cols.reshape(1, 16, 2).expand(2, -1, -1), torch.randn(2, 16, 48)], -1)
        with torch.no_grad():
            assert encoder(patches).shape == (2, 16, 24)


def test_config_copies_are_independent_and_deterministic():
    a, _ = build_tiny_chimera("qwen2_vl", seed=7)
    b, _ = build_tiny_chimera("qwen2_vl", seed=7)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    c = copy.deepcopy(a.config)
    c.gscm_ratio = 0.3
    assert a.config.gscm_ratio == 0.0


def test_from_generalist_takes_the_vision_half_of_full_clip_and_siglip_models():
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from chimera_mixpert.tiny import build_expert_config

    text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(vision_config=build_expert_config("clip_vision_model").to_dict(), text_config=text))
    siglip = SiglipModel(SiglipConfig(vision_config=build_expert_config("siglip_vision_model").to_dict(),
                                      text_config=text))
    tokenizer = build_tokenizer("internvl")
    model = ChimeraForConditionalGeneration.from_generalist(build_generalist("internvl", tokenizer),
                                                            {"math": clip, "chart": siglip}, expert_layout="plain")
    assert model.model.expert_encoders["math"].encoder is clip.vision_model
    assert model.model.expert_encoders["chart"].encoder is siglip.vision_model
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_kv_cache_is_honoured_under_either_name(cache_name):
    """transformers 5.24 passes the KV cache as `cache=`, 5.23 (and user code written for it) as `past_key_values=`:
    both reach the LLM, and both trigger the refusal to insert expert tokens into a sequence that continues a cache."""
    from vlm_backbones import CACHE_NAME, take_cache

    model, processor = build_tiny_chimera("internvl")
    model.eval()
    inputs = processor(images=random_images(1), text=[chat_prompt(processor)], return_tensors="pt")
    ids = inputs.input_ids
    with torch.no_grad():
        full = model(**inputs, expert_labels=torch.tensor([0])).logits
        prefix = model(**inputs, expert_labels=torch.tensor([0]), use_cache=True)
        cache = getattr(prefix, CACHE_NAME)
        assert cache is not None and cache.get_seq_length() == ids.shape[1]
        # Continue the cached prompt by its own last token under `cache_name`: the logits of a cache-aware
        # continuation equal those of a full forward on the longer sequence.
        next_token = full[:, -1:].argmax(-1)
        step = model(input_ids=next_token, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long),
                     **{cache_name: cache})
        longer = model(**{**inputs, "input_ids": torch.cat([ids, next_token], 1),
                          "attention_mask": torch.ones(1, ids.shape[1] + 1, dtype=torch.long)},
                       expert_labels=torch.tensor([0])).logits
        torch.testing.assert_close(step.logits[:, -1], longer[:, -1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="continues a KV cache; use `generate\\(\\)`"):
            model(**inputs, expert_labels=torch.tensor([1]), **{cache_name: getattr(
                model(**inputs, expert_labels=torch.tensor([0]), use_cache=True), CACHE_NAME)})
    with pytest.raises(ValueError, match="Pass the KV cache once"):
        take_cache(object(), {"cache": object()})


def test_assembly_keeps_only_the_router_in_fp32_when_a_nested_model_lists_fp32_modules(monkeypatch):
    # `post_init` adds every nested model's `_keep_in_fp32_modules_strict` name patterns to the instance's list (some
    # text models declare such names); assembly must still find the router alone, by the class's own list.
    from chimera_mixpert.tiny import build_tiny_mixpert
    from transformers import Qwen2Model

    monkeypatch.setattr(Qwen2Model, "_keep_in_fp32_modules_strict", ["some_norm"], raising=False)
    chimera, _ = build_tiny_chimera("llava_onevision")
    mixpert, _ = build_tiny_mixpert("llava_onevision")
    for model, router in ((chimera, chimera.model.router), (mixpert, mixpert.model.vision_router)):
        assert "some_norm" in model._keep_in_fp32_modules_strict  # what the old code looked up on `model.model`
        assert {p.dtype for p in router.parameters()} == {torch.float32}
