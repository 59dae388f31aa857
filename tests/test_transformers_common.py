"""transformers' own common model tests on Chimera and Mixpert (`ModelTesterMixin`, `GenerationTesterMixin`,
`ConfigTester`), written the way transformers' `tests/models/llava_onevision/test_modeling_llava_onevision.py` and
`tests/models/internvl/test_modeling_internvl.py` are: a `ModelTester` with tiny configs and
`prepare_config_and_inputs_for_common`, and one `unittest.TestCase` per setup.

The mixins come from the installed transformers release's sdist at test time (`tests/transformers_common.py`); the
generation tests are ours, under the same names and with the same assertions (`tests/generation_common.py`).
Every test that does not apply is skipped with its reason in one line (`SKIPS` below; the README lists them).
"""

import unittest
from unittest import mock

import pytest
import torch
from transformers.models.auto import modeling_auto as _modeling_auto

from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert, chat_prompt, random_images
from tests.transformers_common import load_common_tests
from tests.generation_common import GenerationTesterMixin


ModelTesterMixin, ConfigTester, _common = load_common_tests()

pytestmark = pytest.mark.common


class RoutedVLMTester:
    """Builds one setup once (tiny native backbone + Chimera / Mixpert) and hands out its config and a batch of three
    samples with one image each, with `expert_labels` [0, 1, 2]: Chimera's "no expert" and both experts, Mixpert's
    versatile expert and both domain experts, so every path runs and every trainable part gets a gradient."""

    batch_size = 3
    is_training = True
    _built = {}  # (kind, family) -> (config, model classes, processor): tokenizer training is the slow part

    def __init__(self, parent, kind, family):
        self.parent = parent
        self.kind, self.family = kind, family
        if (kind, family) not in self._built:
            if kind == "chimera":
                model, processor = build_tiny_chimera(family)
            else:  # 2 vision layers (transformers' testers use at most 2), the last one an expert layer
                model, processor = build_tiny_mixpert(family, domains=("chart", "table"), routing_strategy="direct",
                                                      num_vision_layers=2, num_expert_layers=1)
            self._built[(kind, family)] = (model.config, (type(model.model), type(model)), processor)
        self.config, self.model_classes, self.processor = self._built[(kind, family)]
        text = self.config.get_text_config()
        self.vision_config = self.config.vision_config.to_dict()  # read for the expected tower layer counts
        self.text_config = text
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        self.num_hidden_layers = text.num_hidden_layers
        self.num_attention_heads = text.num_attention_heads
        self.pad_token_id = text.pad_token_id
        # The generation tests keep out image placeholders (`bad_words_ids`) with this id, as for the native models.
        backbone = self.config.generalist_config if kind == "chimera" else self.config.base_config
        self.image_token_id = getattr(backbone, "image_token_id", None) or backbone.image_token_index
        self.seq_length = None
        self.inputs = self.inputs_for_batch(self.batch_size)
        self.seq_length = self.inputs["input_ids"].shape[1]

    def inputs_for_batch(self, batch_size):
        """Processor inputs for the first `batch_size` samples (tiled and packed image inputs cannot be sliced by
        rows), all padded (on the left, as for generation) to `seq_length`, as slicing a batch would keep it."""
        self.processor.tokenizer.padding_side = "left"
        prompts = [chat_prompt(self.processor, text=t) for t in ("a", "a b c", "b")][:batch_size]
        padding = {"padding": True} if self.seq_length is None else {"padding": "max_length",
                                                                      "max_length": self.seq_length}
        inputs = self.processor(images=random_images(3, seed=3)[:batch_size], text=prompts, return_tensors="pt",
                                **padding)
        return {**inputs, "expert_labels": torch.tensor([0, 1, 2][:batch_size])}

    def get_config(self):
        return self.config.__class__.from_dict(self.config.to_dict())

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), _clone(self.inputs)

    def config_kwargs(self):
        """Constructor arguments of the config, as `ConfigTester` wants them: what `to_json_string` writes, so that
        building from them and writing again must give them back."""
        import json

        written = json.loads(self.config.to_json_string())
        return {k: v for k, v in written.items() if k not in ("model_type", "transformers_version")}


def _clone(inputs):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v]) for k, v in inputs.items()}


SETUPS = {
    "ChimeraInternVL": ("chimera", "internvl"),
    "ChimeraLlavaOnevision": ("chimera", "llava_onevision"),
    "MixpertLlavaOnevision": ("mixpert", "llava_onevision"),
    "MixpertQwen2VL": ("mixpert", "qwen2_vl"),
}

# Test name -> why it does not apply, one line each (the README's "Compatibility" section lists them).
_STRICT_LOAD = ("loading refuses a checkpoint whose weights do not match the config instead of initialising or "
                "dropping them (routers, projectors and experts are never random after a load)")
SKIPS = {
    "test_can_init_all_missing_weights": _STRICT_LOAD,
    "test_correct_missing_keys": _STRICT_LOAD,
    "test_model_weights_reload_no_missing_tied_weights": _STRICT_LOAD,
    "test_base_model_prefix_loads_base_weights": _STRICT_LOAD + " (a head model from a base checkpoint lacks lm_head)",
    "test_reverse_loading_mapping": "save_pretrained writes module names (save_original_format=False) so that "
                                    "Trainer's resume, a plain load_state_dict, finds every weight; no key mapping",
}
_EXPANDED = ("the cache, attentions and hidden states of generate cover the prompt the LLM saw, which holds the "
             "inserted expert tokens (longer than input_ids)")
CHIMERA_SKIPS = {
    "test_attention_outputs": "attentions cover the sequence the LLM saw, which holds the inserted expert tokens",
    "test_retain_grad_hidden_states_attentions": "hidden states are gathered back to the caller's positions after "
                                                 "the LLM ran on the expanded sequence, off the loss's autograd path",
    "test_batching_equivalence": "expert_pixel_values is a list (one tensor per expert, shapes differ); the test "
                                 "slices tensors only",
    "test_resize_tokens_embeddings": "shrinks the vocabulary below config.expert_token_ids, which Chimera refuses "
                                     "with a clear error",
    "test_resize_embeddings_untied": "same as test_resize_tokens_embeddings",
    "test_model_rope_scaling_from_config_0_linear": "random ids over the whole vocabulary hit the expert placeholder "
                                                    "tokens, which forward refuses without images",
    "test_model_rope_scaling_from_config_1_dynamic": "same as linear",
    "test_model_rope_scaling_from_config_2_yarn": "same as linear",
    **{name: _EXPANDED for name in (
        "test_greedy_generate_dict_outputs", "test_greedy_generate_dict_outputs_use_cache",
        "test_sample_generate_dict_output", "test_beam_search_generate_dict_output",
        "test_beam_search_generate_dict_outputs_use_cache", "test_beam_sample_generate_dict_output",
        "test_past_key_values_format",
    )},
    "test_generate_continue_from_past_key_values": "the cache holds the expert tokens generate inserted; continuing "
                                                   "re-inserts them from the images, which this test drops",
}
MIXPERT_SKIPS = {
    "test_get_image_features_attentions": "the tower runs layer by layer to dispatch units between shared and expert "
                                          "layers; transformers records attention weights only in the tower's forward",
}


def _make_test_class(name, kind, family):
    class Test(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
        _is_composite = True
        test_torch_exportable = False
        # As in transformers' own LLaVA-OneVision test: its `pixel_values` are `(images, tiles, ...)`, not tiles.
        skip_test_image_features_output_shape = family == "llava_onevision"
        # LLaVA-OneVision reads SigLIP's hidden states, so the tower's `post_layernorm` never runs and gets no gradient
        # (transformers' own LLaVA-OneVision test marks the gradient-checkpointing tests xfail for it).
        test_all_params_have_gradient = family != "llava_onevision"

        @classmethod
        def setUpClass(cls):
            # What registering the model in transformers would do: the common tests recognise base models and
            # image-text-to-text heads by these tables (which classes train, which get `labels`).
            model_type = kind
            base, head = ("ChimeraModel", "ChimeraForConditionalGeneration") if kind == "chimera" else (
                "MixpertModel", "MixpertForConditionalGeneration")
            cls._registration = [
                mock.patch.dict(_modeling_auto.MODEL_MAPPING_NAMES, {model_type: base}),
                mock.patch.dict(_modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, {model_type: head}),
            ]
            for patch in cls._registration:
                patch.start()

        @classmethod
        def tearDownClass(cls):
            for patch in cls._registration:
                patch.stop()

        def setUp(self):
            self.model_tester = RoutedVLMTester(self, kind, family)
            self.all_model_classes = self.model_tester.model_classes
            self.config_tester = ConfigTester(self, config_class=type(self.model_tester.config),
                                              has_text_modality=False, **self.model_tester.config_kwargs())

        def test_config(self):
            self.config_tester.run_common_tests()

        def test_batching_equivalence(self):
            # transformers' test, on inputs without `expert_labels` (as its own testers have no labels): the router
            # loss they add is a mean over the batch's labelled images, which one row cannot reproduce.
            inputs = self.model_tester.inputs
            self.model_tester.inputs = {k: v for k, v in inputs.items() if k != "expert_labels"}
            try:
                super().test_batching_equivalence()
            finally:
                self.model_tester.inputs = inputs

    Test.__name__ = Test.__qualname__ = f"{name}ModelTest"
    for test_name, reason in {**SKIPS, **(CHIMERA_SKIPS if kind == "chimera" else MIXPERT_SKIPS)}.items():
        setattr(Test, test_name, unittest.skip(reason)(getattr(Test, test_name)))
    return Test


for _name, (_kind, _family) in SETUPS.items():
    globals()[f"{_name}ModelTest"] = _make_test_class(_name, _kind, _family)
