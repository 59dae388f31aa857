"""Generation tests equivalent to transformers' `GenerationTesterMixin` (`tests/generation/test_utils.py`).

That file is not shipped in the transformers sdist, so `tests/transformers_common.py` points transformers' common
tests at this module instead. The tests below carry the same names and make the same assertions as transformers' own
(greedy / sampling / beam search with and without dict outputs and the cache, assisted and prompt-lookup decoding
against greedy, left padding, the cache format, generation from `inputs_embeds`, continuing from a cache,
`logits_to_keep`, position ids), written here in our own words from their documented behaviour; the compile, static-
and quantized-cache, multi-GPU and flash-attention tests are left out (CPU only; our models set
`_can_compile_fullgraph = False`).

A test class mixes this in next to `ModelTesterMixin`; it reads `self.model_tester`, `self.all_generative_model_classes`
and `self.has_attentions`. If the model tester has `inputs_for_batch(batch_size)`, inputs for a smaller batch come from
it instead of slicing tensors (packed or tiled image inputs cannot be sliced by rows).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from parameterized import parameterized
from transformers import set_seed
from transformers.cache_utils import Cache
from transformers.generation import (
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
)


def _assert_similar_generate_outputs(first, second, atol=1e-5, rtol=1e-5):
    """Equal sequences, or, where a row differs, equal scores at its first differing step (a near-tie in greedy
    decoding may flip a token)."""
    if torch.equal(first.sequences, second.sequences):
        return
    prompt = first.sequences.shape[1] - len(first.scores)
    for row in range(first.sequences.shape[0]):
        same = (first.sequences[row] == second.sequences[row]).int()
        if bool(same.all()):
            continue
        step = int(same.argmin()) - prompt
        if not torch.allclose(first.scores[step][row], second.scores[step][row], atol=atol, rtol=rtol):
            raise AssertionError(f"row {row} differs at generated step {step} and its scores differ too")


class GenerationTesterMixin:
    max_new_tokens = 3

    # --------------------------------------------------------------------------------------------------- inputs

    def prepare_config_and_inputs_for_generate(self, batch_size=2):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        if hasattr(self.model_tester, "inputs_for_batch"):
            inputs = self.model_tester.inputs_for_batch(batch_size)
        else:
            inputs = {k: v[:batch_size] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        for key in ("decoder_input_ids", "decoder_attention_mask", "use_cache", "labels"):
            inputs.pop(key, None)
        text = config.get_text_config(decoder=True)
        if text.eos_token_id is not None and text.pad_token_id is None:
            eos = text.eos_token_id
            text.pad_token_id = eos[0] if isinstance(eos, list) else eos
        text.eos_token_id = None
        text.forced_eos_token_id = None
        return config, inputs

    def _logits_processor_kwargs(self, do_sample=False, config=None):
        kwargs = {"bad_words_ids": [[1, 0]], "repetition_penalty": 1.2, "remove_invalid_values": True}
        if do_sample:
            kwargs.update(top_k=10, top_p=0.7, temperature=0.7)
        if config is not None:
            vocab = config.get_text_config().vocab_size
            for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                        "image_start_token_id", "image_end_token_id"):
                token = getattr(config, key, None)
                token = getattr(self.model_tester, key, None) if token is None else token
                if token is not None and token < vocab:
                    kwargs["bad_words_ids"].append([token])
        return kwargs

    @staticmethod
    def _beam_kwargs(num_return_sequences=1):
        return {"early_stopping": False, "length_penalty": 2.0, "num_beams": 2,
                "num_return_sequences": num_return_sequences}

    def _generate(self, model, inputs, do_sample=False, output_all=False, use_cache=True, **kwargs):
        flags = dict(output_scores=output_all, output_logits=output_all, output_hidden_states=output_all,
                     output_attentions=output_all and self.has_attentions, return_dict_in_generate=output_all)
        return model.generate(
            max_new_tokens=self.max_new_tokens, min_new_tokens=self.max_new_tokens, do_sample=do_sample,
            use_cache=use_cache, **flags, **self._logits_processor_kwargs(do_sample, model.config), **kwargs, **inputs,
        )

    def _eager_config(self, config):
        if self.has_attentions:
            config._attn_implementation = "eager"
        return config

    def _check_length(self, output, inputs):
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        self.assertEqual(sequences.shape[1], self.max_new_tokens + inputs["input_ids"].shape[1])

    # ------------------------------------------------------------------------------------------- output checks

    def _check_generate_outputs(self, output, config, use_cache=False, num_return_sequences=1, num_beams=1):
        batch = output.sequences.shape[0] // num_return_sequences
        rows = batch * (num_beams if num_beams > 1 else num_return_sequences)
        prompt = self.model_tester.seq_length
        prompt = getattr(self.model_tester, "text_seq_length", prompt)
        text = config.get_text_config(decoder=True)
        generated = output.sequences.shape[1] - prompt
        self.assertIsInstance(output.scores, tuple)
        self.assertEqual(len(output.scores), generated)
        for scores in output.scores:
            self.assertEqual(tuple(scores.shape), (rows, text.vocab_size))
        self.assertIsInstance(output.logits, tuple)
        for logits in output.logits:
            self.assertEqual(logits.shape[0], rows)
            self.assertIn(text.vocab_size - logits.shape[-1], (0, 1))
        cached = use_cache and output.past_key_values is not None
        if self.has_attentions:
            self.assertIsInstance(output.attentions, tuple)
            self.assertEqual(len(output.attentions), generated)
            for step, layers in enumerate(output.attentions):
                query = 1 if cached and step > 0 else prompt + step
                for attention in layers:
                    self.assertEqual(tuple(attention.shape),
                                     (rows, text.num_attention_heads, query, prompt + step))
        self.assertIsInstance(output.hidden_states, tuple)
        self.assertEqual(len(output.hidden_states), generated)
        for step, layers in enumerate(output.hidden_states):
            query = 1 if cached and step > 0 else prompt + step
            for hidden in layers:
                self.assertEqual(tuple(hidden.shape), (rows, query, text.hidden_size))
        if use_cache:
            self._check_cache(rows, output.past_key_values, output.sequences.shape[1] - 1, text)
        else:
            self.assertIsNone(output.past_key_values)

    def _check_cache(self, rows, cache, length, text_config):
        self.assertIsInstance(cache, Cache)
        self.assertEqual(len(cache), text_config.num_hidden_layers)
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        for layer in cache.layers:
            self.assertEqual(tuple(layer.keys.shape), (rows, kv_heads, length, head_dim))
            self.assertEqual(tuple(layer.values.shape), (rows, kv_heads, length, head_dim))

    def _check_caches_equal(self, first, second):
        self.assertEqual(len(first.layers), len(second.layers))
        for a, b in zip(first.layers, second.layers):
            self.assertEqual(type(a), type(b))
            torch.testing.assert_close(a.keys, b.keys)
            torch.testing.assert_close(a.values, b.values)

    def _models(self, config, **from_config):
        for model_class in self.all_generative_model_classes:
            model = model_class._from_config(copy.deepcopy(config), **from_config) if from_config else model_class(
                copy.deepcopy(config))
            yield model.eval()

    # ----------------------------------------------------------------------------------------- decoding modes

    @pytest.mark.generate
    def test_greedy_generate(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(config):
            self._check_length(self._generate(model, inputs), inputs)

    @pytest.mark.generate
    def test_greedy_generate_dict_outputs(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(self._eager_config(config)):
            output = self._generate(model, inputs, output_all=True, use_cache=False)
            self._check_length(output, inputs)
            self.assertIsInstance(output, GenerateDecoderOnlyOutput)
            self._check_generate_outputs(output, model.config)

    @pytest.mark.generate
    def test_greedy_generate_dict_outputs_use_cache(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        if not hasattr(config.get_text_config(), "use_cache"):
            self.skipTest("This model does not support caching")
        config.is_decoder = True
        for model in self._models(self._eager_config(config)):
            output = self._generate(model, inputs, output_all=True, use_cache=True)
            self._check_length(output, inputs)
            self._check_generate_outputs(output, model.config, use_cache=True)

    @pytest.mark.generate
    def test_sample_generate(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(config):
            set_seed(42)
            self._check_length(self._generate(model, inputs, do_sample=True, num_return_sequences=1), inputs)

    @pytest.mark.generate
    def test_sample_generate_dict_output(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(self._eager_config(config)):
            set_seed(42)
            output = self._generate(model, inputs, do_sample=True, output_all=True, use_cache=False,
                                    num_return_sequences=2)
            self._check_length(output, inputs)
            self.assertIsInstance(output, GenerateDecoderOnlyOutput)
            self._check_generate_outputs(output, model.config, num_return_sequences=2)

    @pytest.mark.generate
    def test_beam_search_generate(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(config):
            self._check_length(self._generate(model, inputs, **self._beam_kwargs()), inputs)

    @pytest.mark.generate
    def test_beam_search_generate_dict_output(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(self._eager_config(config)):
            output = self._generate(model, inputs, output_all=True, use_cache=False, **self._beam_kwargs())
            self._check_length(output, inputs)
            self.assertIsInstance(output, GenerateBeamDecoderOnlyOutput)
            self._check_generate_outputs(output, model.config, num_beams=2)

    @pytest.mark.generate
    def test_beam_search_generate_dict_outputs_use_cache(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        if not hasattr(config.get_text_config(), "use_cache"):
            self.skipTest("This model does not support caching")
        config.is_decoder = True
        for model in self._models(self._eager_config(config)):
            output = self._generate(model, inputs, output_all=True, use_cache=True, **self._beam_kwargs())
            self._check_length(output, inputs)
            self._check_generate_outputs(output, model.config, use_cache=True, num_beams=2)

    @pytest.mark.generate
    def test_beam_sample_generate(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(config):
            set_seed(42)
            self._check_length(self._generate(model, inputs, do_sample=True, **self._beam_kwargs()), inputs)

    @pytest.mark.generate
    def test_beam_sample_generate_dict_output(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(self._eager_config(config)):
            set_seed(42)
            output = self._generate(model, inputs, do_sample=True, output_all=True, use_cache=False,
                                    **self._beam_kwargs())
            self._check_length(output, inputs)
            self.assertIsInstance(output, GenerateBeamDecoderOnlyOutput)
            self._check_generate_outputs(output, model.config, num_beams=2)

    @pytest.mark.generate
    def test_generate_without_input_ids(self):
        config, _ = self.prepare_config_and_inputs_for_generate()
        text = config.get_text_config()
        if text.bos_token_id is None:
            self.skipTest("bos_token_id is None")
        if text.bos_token_id == text.pad_token_id:
            text.pad_token_id = None
        for model in self._models(config):
            self.assertIsNotNone(model.generate(do_sample=False, max_new_tokens=self.max_new_tokens,
                                                remove_invalid_values=True))

    # --------------------------------------------------------------------------------- assisted decoding

    def _assisted_setup(self):
        set_seed(42)
        config, inputs = self.prepare_config_and_inputs_for_generate(batch_size=1)
        config = self._eager_config(config)
        if not hasattr(config.get_text_config(), "use_cache"):
            self.skipTest("This model does not support caching")
        config.is_decoder = True
        kwargs = dict(eos_token_id=-1, max_new_tokens=4, num_beams=1, do_sample=False, output_scores=True,
                      output_logits=True, output_hidden_states=True, output_attentions=self.has_attentions,
                      return_dict_in_generate=True, use_cache=True)
        return config, inputs, kwargs

    @parameterized.expand([("random",), ("same",)])
    @pytest.mark.generate
    def test_assisted_decoding_matches_greedy_search(self, assistant_type):
        config, inputs, kwargs = self._assisted_setup()
        for model in self._models(config, attn_implementation="eager"):
            kwargs.update(self._logits_processor_kwargs(config=model.config))
            greedy = model.generate(**inputs, **kwargs)
            assistant = model if assistant_type == "same" else type(model)(copy.deepcopy(model.config)).eval()
            assistant.generation_config.num_assistant_tokens = 2
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            assisted = model.generate(**inputs, assistant_model=assistant, **kwargs)
            _assert_similar_generate_outputs(greedy, assisted)
            for output in (greedy, assisted):
                self._check_generate_outputs(output, model.config, use_cache=True)

    @pytest.mark.generate
    def test_prompt_lookup_decoding_matches_greedy_search(self):
        config, inputs, kwargs = self._assisted_setup()
        for model in self._models(config):
            kwargs.update(self._logits_processor_kwargs(config=model.config))
            greedy = model.generate(**inputs, **kwargs)
            lookup = model.generate(**inputs, prompt_lookup_num_tokens=2, **kwargs)
            _assert_similar_generate_outputs(greedy, lookup)
            for output in (greedy, lookup):
                self._check_generate_outputs(output, model.config, use_cache=True)

    @pytest.mark.generate
    def test_assisted_decoding_sample(self):
        config, inputs, kwargs = self._assisted_setup()
        kwargs["do_sample"] = True
        for model in self._models(config, attn_implementation="eager"):
            model.generation_config.num_assistant_tokens = 2
            model.generation_config.num_assistant_tokens_schedule = "constant"
            output = model.generate(**inputs, assistant_model=model, **kwargs,
                                    **self._logits_processor_kwargs(config=model.config))
            self._check_generate_outputs(output, model.config, use_cache=True)

    # ------------------------------------------------------------------------------ padding, cache, embeds

    @pytest.mark.generate
    def test_left_padding_compatibility(self):
        if not self.has_attentions:
            self.skipTest("This model does not support attention masks")
        config, inputs = self.prepare_config_and_inputs_for_generate()
        pad = config.get_text_config(decoder=True).pad_token_id or 0
        for model in self._models(config):
            model.generation_config.use_cache = False
            signature = inspect.signature(model.forward).parameters
            mask = inputs.get("attention_mask")
            mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
            kwargs = {k: v for k, v in inputs.items() if k in signature and k not in ("input_ids", "attention_mask")}
            with torch.no_grad():
                reference = model(input_ids=inputs["input_ids"], attention_mask=mask, **kwargs).logits[:, -1]
                padding = 32
                padded = dict(kwargs)
                for key in ("token_type_ids", "mm_token_type_ids"):
                    if key in padded:
                        padded[key] = torch.cat([torch.zeros_like(padded[key][:, :1]).repeat(1, padding),
                                                 padded[key]], 1)
                ids = torch.cat([torch.full_like(inputs["input_ids"][:, :1], pad).repeat(1, padding),
                                 inputs["input_ids"]], 1)
                padded_mask = torch.cat([torch.zeros_like(mask[:, :1]).repeat(1, padding), mask], 1)
                padded_logits = model(input_ids=ids, attention_mask=padded_mask, **padded).logits[:, -1]
            torch.testing.assert_close(reference, padded_logits, rtol=1e-5, atol=1e-5)

    @pytest.mark.generate
    def test_past_key_values_format(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        text = config.get_text_config(decoder=True)
        if not hasattr(text, "use_cache"):
            self.skipTest("This model does not support caching")
        inputs.setdefault("use_cache", True)
        for model in self._models(config):
            with torch.no_grad():
                output = model(**inputs)
            cache = output.get("past_key_values")
            if cache is None:
                self.skipTest("This model does not return a cache")
            batch, length = inputs["input_ids"].shape[:2]
            self._check_cache(batch, cache, length, text)

    @pytest.mark.generate
    def test_generate_from_random_inputs_embeds(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(config):
            if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
                continue
            kwargs = dict(return_dict_in_generate=True, output_scores=True, do_sample=False, max_new_tokens=5,
                          min_new_tokens=5)
            ids = inputs["input_ids"]
            embeds = model.get_input_embeddings()(ids)
            first = model.generate(ids, inputs_embeds=embeds, **kwargs)
            second = model.generate(ids, inputs_embeds=torch.rand_like(embeds), **kwargs)
            for a, b in zip(first.scores, second.scores):
                self.assertFalse(torch.allclose(a, b, atol=1e-5))

    @parameterized.expand([("greedy", 1), ("beam search", 2)])
    @pytest.mark.generate
    def test_generate_from_inputs_embeds(self, _, num_beams):
        set_seed(42)
        config, inputs = self.prepare_config_and_inputs_for_generate()
        config.is_decoder = True
        for model in self._models(config):
            if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
                continue
            kwargs = dict(return_dict_in_generate=True, output_scores=True, num_beams=num_beams, do_sample=False,
                          max_new_tokens=5, min_new_tokens=5, use_cache=True)
            rest = {k: v for k, v in inputs.items() if k != "input_ids"}
            ids = inputs["input_ids"]
            from_ids = model.generate(input_ids=ids, **kwargs, **rest)
            self.assertEqual(tuple(from_ids.sequences.shape[:2]), (ids.shape[0], ids.shape[1] + 5))
            embeds = model.get_input_embeddings()(ids)
            from_both = model.generate(input_ids=ids, inputs_embeds=embeds, **kwargs, **rest)
            _assert_similar_generate_outputs(from_ids, from_both)
            if "attention_mask" in inputs:
                from_embeds = model.generate(inputs_embeds=embeds, **kwargs, **rest)
                from_both.sequences = from_both.sequences[:, ids.shape[1]:]
                _assert_similar_generate_outputs(from_embeds, from_both)

    @pytest.mark.generate
    def test_generate_continue_from_past_key_values(self):
        set_seed(42)
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        if not hasattr(config.get_text_config(), "use_cache"):
            self.skipTest("This model does not support caching")
        inputs.pop("token_type_ids", None)
        inputs.pop("labels", None)
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and bool((mask[:, -1] == 0).any()):
            mask = torch.ones_like(mask)
            mask[0, :1] = 0
            mask[1:, :2] = 0
            inputs["attention_mask"] = mask
        for model in self._models(config):
            with torch.no_grad():
                if model(**inputs).get("past_key_values") is None:
                    self.skipTest("This model does not return a cache")
            kwargs = dict(pad_token_id=-1, eos_token_id=-1, forced_eos_token_id=None,
                          encoder_no_repeat_ngram_size=0, use_cache=True, do_sample=False,
                          return_dict_in_generate=True, output_scores=True)
            full = model.generate(**inputs, max_new_tokens=4, **kwargs)
            first = model.generate(**inputs, max_new_tokens=3, **kwargs)
            follow = {k: v for k, v in inputs.items()
                      if "pixel" not in k and k not in ("image_patches", "input_feature", "input_features",
                                                        "feature_attention_mask")}
            follow["past_key_values"] = first.past_key_values
            follow["input_ids"] = first.sequences
            if "attention_mask" in follow:
                grow = first.sequences.shape[1] - follow["attention_mask"].shape[1]
                grown = follow["attention_mask"].new_ones(first.sequences.shape[0], grow)
                follow["attention_mask"] = torch.cat([follow["attention_mask"], grown], 1)
            second = model.generate(**follow, max_new_tokens=1, **kwargs)
            second.scores = first.scores + second.scores
            _assert_similar_generate_outputs(full, second)
            self._check_caches_equal(full.past_key_values, second.past_key_values)

    @pytest.mark.generate
    def test_generate_continue_from_inputs_embeds(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        inputs.pop("token_type_ids", None)
        if not hasattr(config, "use_cache"):
            self.skipTest("This model does not support caching")
        for model in self._models(config):
            if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
                self.skipTest("This model does not support inputs_embeds in generation")
            with torch.no_grad():
                if model(**inputs).get("past_key_values") is None:
                    self.skipTest("This model does not return a cache")
            ids = inputs["input_ids"]
            embeds = model.get_input_embeddings()(ids)
            model.generation_config.pad_token_id = model.generation_config.eos_token_id = -1
            model.generation_config.forced_eos_token_id = None
            model.config.is_decoder = True
            model.generation_config.use_cache = True
            kwargs = dict(return_dict_in_generate=True, do_sample=False)
            full = model.generate(inputs_embeds=embeds, max_new_tokens=4, **kwargs)
            first = model.generate(inputs_embeds=embeds, max_new_tokens=3, **kwargs)
            more = torch.cat([embeds, model.get_input_embeddings()(first.sequences)], 1)
            cont = model.generate(inputs_embeds=more, max_new_tokens=1, past_key_values=first.past_key_values,
                                  **kwargs)
            self.assertListEqual(full.sequences.tolist(), torch.cat([first.sequences, cont.sequences], 1).tolist())
            self._check_caches_equal(full.past_key_values, cont.past_key_values)

    # ------------------------------------------------------------------------------------------------ misc

    @pytest.mark.generate
    def test_generate_methods_with_logits_to_keep(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        for model in self._models(config):
            if "logits_to_keep" not in inspect.signature(model.forward).parameters:
                self.skipTest("This model does not support logits_to_keep")
            kwargs = dict(max_new_tokens=10, do_sample=False)
            self.assertEqual(model.generate(**inputs, logits_to_keep=0, **kwargs).tolist(),
                             model.generate(**inputs, **kwargs).tolist())

    @pytest.mark.generate
    def test_forward_with_logits_to_keep(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs.pop("labels", None)
        for model in self._models(config):
            if "logits_to_keep" not in inspect.signature(model.forward).parameters:
                self.skipTest("This model does not support logits_to_keep")
            batch, length = inputs["input_ids"].shape[:2]
            vocab = config.get_text_config().vocab_size
            with torch.no_grad():
                everything = model(**inputs, logits_to_keep=0).logits
                last = model(**inputs, logits_to_keep=1).logits
            self.assertEqual(tuple(everything.shape), (batch, length, vocab))
            self.assertEqual(tuple(last.shape), (batch, 1, vocab))
            torch.testing.assert_close(everything[:, -1:], last, rtol=1e-5, atol=1e-5)

    def test_inherits_generation_mixin(self):
        for model_class in self.all_generative_model_classes:
            self.assertIn("GenerationMixin", str(model_class.__bases__))

    def test_prepare_inputs_for_generation_kwargs_forwards(self, **extra):
        config, _ = self.prepare_config_and_inputs_for_generate()
        for model in self._models(config):
            ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
            prepared = model.prepare_inputs_for_generation(
                input_ids=ids, position_ids=torch.tensor([[0, 1, 2], [0, 1, 2]]), output_attentions=True,
                output_hidden_states=True, custom_arg="test_value", numeric_arg=42, **extra,
            )
            self.assertIn("input_ids", prepared)
            self.assertEqual(prepared["custom_arg"], "test_value")
            self.assertEqual(prepared["numeric_arg"], 42)
            self.assertTrue(prepared["output_attentions"])
            self.assertTrue(prepared["output_hidden_states"])

    def test_generate_with_and_without_position_ids(self):
        config, inputs = self.prepare_config_and_inputs_for_generate()
        ran = False
        for model in self._models(config):
            if any(hasattr(part, "get_rope_index") for part in (model, getattr(model, "model", None)) if part):
                continue  # 3D (M-RoPE) positions are not `cumsum(mask) - 1`
            if "position_ids" not in inspect.signature(model.forward).parameters:
                self.skipTest("This model does not take position_ids")
            ran = True
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            kwargs = dict(max_new_tokens=5, use_cache=True, do_sample=False)
            without = model.generate(**inputs, **kwargs)
            with_positions = model.generate(**inputs, position_ids=positions, **kwargs)
            self.assertListEqual(without.tolist(), with_positions.tolist())
        if not ran:
            self.skipTest("Every model class uses 3D position ids")
