"""The lmms-eval model classes `chimera` and `mixpert` (lmms-eval's "simple" model API: `generate_until`,
`loglikelihood`).

Loading: Chimera and Mixpert load with this installed project's classes (`chimera_mixpert.training.
pretrained_classes`, as `train.evaluate` does), from a folder or a Hub repo id, so no code from the model folder ever
runs and `trust_remote_code` is not needed for them. `trust_remote_code=True` in `--model_args` is the user's consent
for the folder's *processor / tokenizer* code to run (a generalist whose tokenizer ships its own code), passed to
`AutoProcessor` only; it is off by default, as in `train.evaluate`.

Prompts: each request becomes one user turn, `[image, ..., text]`, rendered with the processor's chat template and a
generation prompt, as `train.evaluate.prompt_for` builds the lab's prompts; `<image>` markers in a task's text place
the images there instead (one marker per image). Batches are left-padded, as for `generate`.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from chimera_mixpert.training import dtype_from_name, pretrained_classes, read_model_type
from processing_chimera import load_rgb_image


logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"
# Task `generation_kwargs` handed to `generate` as they are; `until` is applied to the decoded text, other keys
# (lmms-eval tasks carry model-specific ones such as `image_aspect_ratio`) are ignored with a warning.
GENERATE_KWARGS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample",
                   "repetition_penalty", "length_penalty")
SAMPLING_ONLY = ("temperature", "top_p", "top_k")


def stop_at(text: str, until) -> str:
    """`text` cut before the first of the `until` strings (lmms-eval's stop sequences), as lmms-eval's own models do
    after decoding."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def user_turn(context: str, num_images: int) -> list:
    """The chat message of one request: images first, then the text; with exactly one `<image>` marker per image in
    the text, the images go where the markers are."""
    if num_images and context.count(IMAGE_MARKER) == num_images:
        content = []
        for i, part in enumerate(context.split(IMAGE_MARKER)):
            if i:
                content.append({"type": "image"})
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        return [{"role": "user", "content": content}]
    if IMAGE_MARKER in context:
        context = context.replace(IMAGE_MARKER, "").strip()
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": context}]}]


class RoutedVLMEval(lmms):
    """Chimera or Mixpert (`kind`) behind lmms-eval's model API. `--model_args` (comma-separated `key=value`):

    - `pretrained`: a folder written by `save_pretrained` or a Hub repo id (required).
    - `trust_remote_code` (default False): let the folder's processor / tokenizer code run (see the module doc).
    - `device` (default `cuda` when available, else `cpu`; under `accelerate launch` / `torchrun` each process takes
      `cuda:<LOCAL_RANK>`), or `device_map` (e.g. `auto`) to spread a large model over the visible GPUs.
    - `dtype` (default `auto`: the checkpoint's dtype; or `float32`, `bfloat16`, `float16`). The router stays fp32.
    - `attn_implementation` (e.g. `sdpa`, `flash_attention_2`).
    - `batch_size` (also lmms-eval's `--batch_size`; an integer).
    - `max_new_tokens` (default 128): used when a task does not set it.
    - Mixpert only: `routing_strategy` (`direct`, `score_threshold`, `score_difference`) and `routing_threshold`
      override the config's routing rule (Mixpert §3.3).
    """

    kind = ""
    is_simple = True

    def __init__(self, pretrained: str | None = None, trust_remote_code: bool = False, device: str | None = None,
                 device_map: str | None = None, dtype: str = "auto", attn_implementation: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int = 128, routing_strategy: str | None = None,
                 routing_threshold: float | None = None, max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            routing = ", routing_strategy, routing_threshold" if self.kind == "mixpert" else ""
            raise TypeError(f"--model {self.kind}: unknown --model_args {sorted(unknown)}; known: pretrained, "
                            "trust_remote_code, device, device_map, dtype, attn_implementation, batch_size, "
                            f"max_new_tokens{routing}.")
        if not pretrained:
            raise ValueError(f"--model {self.kind} needs --model_args pretrained=<folder or Hub repo id>.")
        self.batch_size_per_device = self._check_batch_size(batch_size)
        kind = read_model_type(pretrained)
        if kind != self.kind:
            hint = f"use --model {kind}" if kind in ("chimera", "mixpert") else "it is not a Chimera or Mixpert model"
            raise ValueError(f"--model {self.kind}: {pretrained} holds a {kind!r} model ({hint}).")
        self.routing = self._check_routing(routing_strategy, routing_threshold)
        self.max_new_tokens = int(max_new_tokens)
        model_class, processor_class = pretrained_classes(kind)
        load = {"dtype": "auto" if dtype == "auto" else dtype_from_name(dtype)}
        if device_map is not None:
            load["device_map"] = device_map
        if attn_implementation is not None:
            load["attn_implementation"] = attn_implementation
        self._model = model_class.from_pretrained(pretrained, **load).eval()
        if device_map is None:
            self._model.to(self._pick_device(device))
        self.processor = processor_class.from_pretrained(pretrained, trust_remote_code=bool(trust_remote_code))
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self.pretrained = pretrained
        self._warned = set()

    # ------------------------------------------------------------------------------------------- settings

    def _check_batch_size(self, batch_size) -> int:
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"--batch_size {batch_size!r}: --model {self.kind} takes an integer batch size (no "
                             "'auto' search).")
        if int(batch_size) < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}.")
        return int(batch_size)

    def _check_routing(self, strategy, threshold) -> dict:
        if self.kind != "mixpert":
            if strategy is not None or threshold is not None:
                raise ValueError("routing_strategy / routing_threshold are Mixpert options (Mixpert §3.3); Chimera's "
                                 "router picks its argmax expert.")
            return {}
        routing = {}
        if strategy is not None:
            if strategy not in ("direct", "score_threshold", "score_difference"):
                raise ValueError(f"routing_strategy={strategy!r}: use direct, score_threshold or score_difference.")
            routing["routing_strategy"] = strategy
        if threshold is not None:
            routing["routing_threshold"] = float(threshold)
        return routing

    @staticmethod
    def _pick_device(device) -> torch.device:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
        return device

    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    # --------------------------------------------------------------------------------------------- inputs

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        """The request's images as RGB (`processing_chimera.load_rgb_image`, which names the failing image)."""
        if doc_to_visual is None:
            return []
        visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
        images = []
        for k, visual in enumerate(visuals):
            if isinstance(visual, (str, dict)):
                raise ValueError(f"{task} ({split}, doc {doc_id}): visual {k} is {type(visual).__name__} "
                                 f"{str(visual)[:80]!r}; --model {self.kind} takes images only (no video or audio).")
            images.append(load_rgb_image(visual, f"{task} ({split}, doc {doc_id}), image {k}"))
        return images

    def _prompt(self, context: str, num_images: int) -> str:
        return self.processor.apply_chat_template(user_turn(context, num_images), add_generation_prompt=True)

    def _batch_inputs(self, prompts: list, images: list):
        kwargs = {"text": prompts, "return_tensors": "pt", "padding": True}
        if any(images):
            kwargs["images"] = images
        return self.processor(**kwargs).to(self.device)

    # ------------------------------------------------------------------------------------------ generation

    def _generate_kwargs(self, gen_kwargs: dict, task: str) -> dict:
        """`generate` keyword arguments from a task's `generation_kwargs`: lmms-eval's convention, temperature 0 (or
        `do_sample: false`) is greedy decoding; `max_new_tokens` defaults to the model argument."""
        ignored = sorted(set(gen_kwargs) - set(GENERATE_KWARGS) - {"until"})
        if ignored and task not in self._warned:
            self._warned.add(task)
            logger.warning("%s: generation_kwargs %s are not generate() arguments; ignored.", task, ignored)
        kwargs = {k: gen_kwargs[k] for k in GENERATE_KWARGS if gen_kwargs.get(k) is not None}
        kwargs["max_new_tokens"] = int(kwargs.get("max_new_tokens", self.max_new_tokens))
        temperature = kwargs.get("temperature")
        do_sample = bool(kwargs.pop("do_sample", temperature is not None and temperature > 0))
        if not do_sample or temperature == 0:
            do_sample = False
            for key in SAMPLING_ONLY:
                kwargs.pop(key, None)
        return {**kwargs, "do_sample": do_sample, **self.routing}

    @staticmethod
    def _until(gen_kwargs: dict, task: str) -> list:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"{task}: generation_kwargs 'until' must be a string or a list of strings, got {until!r}.")
        return list(until)

    @torch.no_grad()
    def _generate_batch(self, requests: list) -> list:
        _, gen_kwargs, _, _, task, _ = requests[0].args
        prompts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompts.append(self._prompt(context, len(visuals)))
            images.append(visuals)
        inputs = self._batch_inputs(prompts, images)
        out = self.model.generate(**inputs, **self._generate_kwargs(gen_kwargs, task))
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        until = self._until(gen_kwargs, task)
        return [stop_at(text, until) for text in texts]

    def generate_until(self, requests) -> list:
        """One answer per request, `request.args = (context, generation_kwargs, doc_to_visual, doc_id, task,
        split)`. Requests with the same task and generation settings are batched (`batch_size`) in their given
        order; answers come back in the requests' order."""
        groups = {}
        for i, request in enumerate(requests):
            key = (request.args[4], json.dumps(request.args[1], sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        answers = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"{self.kind} generating", disable=self.rank != 0)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                for i, text in zip(batch, self._generate_batch([requests[i] for i in batch])):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                bar.update(len(batch))
        bar.close()
        return answers

    def generate_until_multi_round(self, requests) -> list:
        task = requests[0].args[-2] if requests else "this task"
        raise NotImplementedError(f"{task} asks for multi-round generation (generate_until_multi_round), which --model "
                                  f"{self.kind} does not implement; single-turn tasks (generate_until) and "
                                  "multiple-choice tasks (loglikelihood) are supported.")

    # ---------------------------------------------------------------------------------------- likelihood

    def _continuation(self, request) -> tuple:
        """`(context, continuation, images)` of a loglikelihood request: `(context, continuation or doc_to_target,
        doc_to_visual, doc_id, task, split)`, or `(context, continuation)` (the unconditional requests of
        `acc_mutual_info`, no image)."""
        if len(request.args) == 2:
            return request.args[0], request.args[1], []
        context, target, doc_to_visual, doc_id, task, split = request.args
        continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
        return context, str(continuation), self._visuals(doc_to_visual, doc_id, task, split)

    @torch.no_grad()
    def _loglikelihood_batch(self, requests: list) -> list:
        prompts, full, images = [], [], []
        for request in requests:
            context, continuation, visuals = self._continuation(request)
            prompt = self._prompt(context, len(visuals))
            # lm-eval's convention: a space ending the context belongs to the continuation
            spaces = len(prompt) - len(prompt.rstrip(" "))
            prompt, continuation = prompt[: len(prompt) - spaces], prompt[len(prompt) - spaces :] + continuation
            prompts.append(prompt)
            full.append(prompt + continuation)
            images.append(visuals)
        inputs = self._batch_inputs(full, images)
        logits = self.model(**inputs, **self.routing).logits
        ids = inputs["input_ids"]
        tokenizer = self.processor.tokenizer
        results = []
        for row, (prompt, text) in enumerate(zip(prompts, full)):
            # The continuation's token count: the whole text's tokens minus the context's (lm-eval's `_encode_pair`),
            # counted on the unexpanded text, since the processor adds the same image tokens to both.
            n = len(tokenizer(text)["input_ids"]) - len(tokenizer(prompt)["input_ids"])
            if n < 1:
                raise ValueError(f"request {requests[row].args[0][:60]!r}: the continuation is empty after "
                                 "tokenization; a multiple-choice task needs non-empty choices.")
            # left padding: every row ends at the last position; position t predicts token t + 1
            logprobs = torch.log_softmax(logits[row, -n - 1 : -1].float(), dim=-1)
            target = ids[row, -n:]
            chosen = logprobs.gather(-1, target[:, None]).squeeze(-1)
            results.append((float(chosen.sum()), bool((logprobs.argmax(-1) == target).all())))
        return results

    def loglikelihood(self, requests) -> list:
        """`(log P(continuation | context, images), continuation is the greedy one)` per request, from the model's
        logits (the continuation follows the generation prompt, as the model's answer would), `batch_size` at a
        time."""
        results = []
        bar = tqdm(total=len(requests), desc=f"{self.kind} scoring", disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            for request, result in zip(batch, self._loglikelihood_batch(batch)):
                results.append(result)
                self.cache_hook.add_partial("loglikelihood", request.args[:2], result)
            bar.update(len(batch))
        bar.close()
        return results


class Chimera(RoutedVLMEval):
    """`--model chimera`: a Chimera checkpoint (Chimera, arXiv 2412.05983)."""

    kind = "chimera"


class Mixpert(RoutedVLMEval):
    """`--model mixpert`: a Mixpert checkpoint (Mixpert, arXiv 2505.24541)."""

    kind = "mixpert"
