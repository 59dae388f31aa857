"""What transformers' own VLMs do and our models must do too (defects D1-D9 found by transformers' common tests).

The full common suites run with `pytest -m common` (`tests/test_transformers_common.py`); these are the fast, direct
regression tests of each defect, in the main suite.
"""

import pytest
import torch

from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert, chat_prompt, random_images


SETUPS = [("chimera", "internvl"), ("chimera", "llava_onevision"), ("chimera", "qwen2_vl"),
          ("mixpert", "internvl"), ("mixpert", "llava_onevision"), ("mixpert", "qwen2_vl")]


@pytest.fixture(scope="module", params=SETUPS, ids=lambda s: "-".join(s))
def setup(request):
    kind, family = request.param
    if kind == "chimera":
        model, processor = build_tiny_chimera(family)
    else:
        model, processor = build_tiny_mixpert(family, domains=("chart", "table"), routing_strategy="direct")
    model.eval()
    processor.tokenizer.padding_side = "left"
    prompts = [chat_prompt(processor, text="a"), chat_prompt(processor, text="a b c")]
    inputs = dict(processor(images=random_images(2, seed=4), text=prompts, return_tensors="pt", padding=True))
    return kind, model, processor, inputs, torch.tensor([1, 2])  # both experts used: tokens are inserted (Chimera)


def test_d1_attention_implementation_reaches_every_submodel(setup, tmp_path):
    kind, model, _, _, _ = setup
    model.save_pretrained(tmp_path)
    for implementation in ("eager", "sdpa"):
        loaded = type(model).from_pretrained(tmp_path, attn_implementation=implementation)
        found = {(type(m).__name__, m.config._attn_implementation) for m in loaded.modules()
                 if "Attention" in type(m).__name__ and hasattr(m, "config")}
        assert found and {impl for _, impl in found} == {implementation}, found
        loaded.set_attn_implementation("eager" if implementation == "sdpa" else "sdpa")
        flipped = {m.config._attn_implementation for m in loaded.modules()
                   if "Attention" in type(m).__name__ and hasattr(m, "config")}
        assert flipped == {"eager" if implementation == "sdpa" else "sdpa"}


def test_d2_return_dict_false_gives_the_tuple_of_the_output(setup):
    _, model, _, inputs, labels = setup
    with torch.no_grad():
        as_dict = model(**inputs, expert_labels=labels)
        as_tuple = model(**inputs, expert_labels=labels, return_dict=False)
        model.config.return_dict = False
        try:
            from_config = model(**inputs, expert_labels=labels)
        finally:
            model.config.return_dict = True
    expected = as_dict.to_tuple()
    for output in (as_tuple, from_config):
        assert isinstance(output, tuple) and len(output) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(output, expected) if isinstance(a, torch.Tensor))
    assert any(out is as_dict.logits or torch.equal(out, as_dict.logits) for out in as_tuple
               if isinstance(out, torch.Tensor) and out.shape == as_dict.logits.shape)


def test_d3_inputs_embeds_with_images_equal_input_ids(setup):
    kind, model, _, inputs, labels = setup
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    if kind == "mixpert" and hasattr(model.model, "get_rope_index"):
        # Qwen2-VL's 3D positions come from ids: give them, as for the native model. (Chimera recovers the
        # placeholders from the embeddings and computes them itself.)
        rest["position_ids"] = model.model.get_rope_index(**inputs)[0]
    with torch.no_grad():
        from_ids = model(**inputs, expert_labels=labels).logits
        from_embeds = model(**rest, inputs_embeds=embeds, expert_labels=labels).logits
    assert torch.equal(from_ids, from_embeds)


def test_d5_get_image_features_follows_the_vlm_contract(setup):
    kind, model, _, inputs, _ = setup
    image_inputs = {k: v for k, v in inputs.items() if "pixel" in k or "image" in k}  # no input_ids
    with torch.no_grad():
        features = model.get_image_features(**image_inputs)
        with_states = model.get_image_features(**image_inputs, output_hidden_states=True)
        as_tuple = model.get_image_features(**image_inputs, return_dict=False)
    vision = model.config.vision_config
    assert features.last_hidden_state.shape[-1] == vision.hidden_size
    assert len(features.pooler_output) == 2 and all(f.dim() == 2 for f in features.pooler_output)
    assert features.hidden_states is None
    assert len(with_states.hidden_states) == vision.num_hidden_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(features.pooler_output, with_states.pooler_output))
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], features.last_hidden_state)
    # The tokens that replace the image placeholders are what forward uses: same count as the prompt's placeholders.
    token_id = model.model.generalist_image_token_id if kind == "chimera" else model.model.image_token_id
    assert sum(f.shape[0] for f in features.pooler_output) == int((inputs["input_ids"] == token_id).sum())


def test_d7_shift_labels_give_the_same_loss_as_labels(setup):
    _, model, _, inputs, labels = setup
    targets = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    shifted = torch.nn.functional.pad(targets[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        from_labels = model(**inputs, labels=targets, expert_labels=labels)
        from_shifted = model(**inputs, shift_labels=shifted, expert_labels=labels)
    assert torch.allclose(from_labels.lm_loss, from_shifted.lm_loss, atol=1e-6)
    assert torch.allclose(from_labels.loss, from_shifted.loss, atol=1e-6)
    with torch.no_grad():  # a different target must change the loss: shift_labels are really read
        other = model(**inputs, shift_labels=shifted.roll(1, dims=1), expert_labels=labels)
    assert not torch.allclose(other.lm_loss, from_labels.lm_loss)


def test_a_batch_without_label_tokens_is_refused_not_trained_to_nan(setup):
    _, model, _, inputs, labels = setup
    no_targets = torch.full_like(inputs["input_ids"], -100)
    with torch.no_grad():
        assert model(**inputs, labels=no_targets, expert_labels=labels).lm_loss == 0  # no Trainer: nothing to divide
        with pytest.raises(ValueError, match="has no label tokens .* every training row needs an answer"):
            model(**inputs, labels=no_targets, expert_labels=labels, num_items_in_batch=torch.tensor(0))


def test_d8_generate_without_images_from_ids_embeds_and_with_an_assistant(setup):
    _, model, processor, _, _ = setup
    text = processor.tokenizer(["hello there", "a b"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    from_ids = model.generate(**text, **kwargs)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(text["input_ids"]),
                                 attention_mask=text["attention_mask"], **kwargs)
    assert torch.equal(from_ids[:, text["input_ids"].shape[1]:], from_embeds)
    one = {k: v[:1] for k, v in text.items()}
    assert torch.equal(model.generate(**one, assistant_model=model, **kwargs), model.generate(**one, **kwargs))


def test_d8_generate_from_embeds_with_images_equals_from_ids(setup):
    _, model, _, inputs, labels = setup
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, expert_labels=labels)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    from_ids = model.generate(**inputs, **kwargs)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]), **rest, **kwargs)
    assert torch.equal(from_ids[:, inputs["input_ids"].shape[1]:], from_embeds)


def test_d9_partial_hidden_state_capture(setup):
    _, model, _, inputs, labels = setup
    with torch.no_grad():
        everything = model(**inputs, expert_labels=labels, output_hidden_states=True).hidden_states
        partial = model(**inputs, expert_labels=labels, output_hidden_states=[1]).hidden_states
    assert len(partial) == len(everything)
    assert [h is None for h in partial] == [i != 1 for i in range(len(everything))]
    assert torch.equal(partial[1], everything[1])
    assert partial[1].shape[1] == inputs["input_ids"].shape[1]  # aligned with the caller's tokens


def test_d1_an_expert_that_cannot_run_the_requested_attention_keeps_its_own(tmp_path, caplog):
    """GOT-OCR2's encoder supports only eager attention: a Chimera loaded with sdpa (or flash attention, common for the
    generalist) still loads; that expert keeps eager, says so, and a dict chooses per expert."""
    model, _ = build_tiny_chimera("llava_onevision", {"ocr": "got_ocr2", "table": "pix2struct_vision_model"})
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="sdpa")
    assert loaded.model.expert_encoders["ocr"].encoder.vision_tower.config._attn_implementation == "eager"
    assert loaded.model.expert_encoders["table"].encoder.config._attn_implementation == "sdpa"
    assert loaded.model.generalist.config.text_config._attn_implementation == "sdpa"
    chosen = type(model).from_pretrained(tmp_path, attn_implementation={"": "sdpa", "table": "eager"})
    assert chosen.model.expert_encoders["table"].encoder.config._attn_implementation == "eager"
    assert chosen.model.generalist.config.text_config._attn_implementation == "sdpa"


def test_mixpert_groups_internvl_tiles_from_embeddings_as_from_ids():
    """Without `input_ids`, the placeholders in `inputs_embeds` tell which InternVL tiles form an image: routing is per
    image, as with ids (experts perturbed so that a per-tile routing would change the output)."""
    model, processor = build_tiny_mixpert("internvl", domains=("chart", "table"), routing_strategy="direct")
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for expert in model.model.vision_experts.values():
            for parameter in expert.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    images = random_images(2, seed=5, sizes=((16, 48), (32, 32)))
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=images, text=[chat_prompt(processor)] * 2, return_tensors="pt", padding=True))
    assert inputs["pixel_values"].shape[0] > 2  # tiled
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs)
        from_embeds = model(**rest, inputs_embeds=embeds)
    assert from_ids.expert_index.shape == (2,) and torch.equal(from_ids.expert_index, from_embeds.expert_index)
    assert torch.equal(from_ids.logits, from_embeds.logits)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:],
                       model.generate(**rest, inputs_embeds=embeds, **kwargs))
