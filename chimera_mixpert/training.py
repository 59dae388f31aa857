"""Pieces every training script shares: arguments, model/data loading (or tiny offline stand-ins), which parameters
train, a Trainer that logs the LM and router losses separately, resuming, saving and pushing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForImageTextToText, AutoProcessor, PretrainedConfig, Trainer
from transformers.trainer_optimizer import is_optimizer_factory

from chimera_mixpert.data.export import export_preference_jsonl, export_sft_jsonl
from chimera_mixpert.data.synthetic import build_dataset, make_preference_pairs
from chimera_mixpert.model_card import render_model_card
from chimera_mixpert.tiny import (
    build_generalist,
    build_processor,
    build_tiny_chimera,
    build_tiny_mixpert,
    build_tokenizer,
)
from modeling_chimera import ChimeraForConditionalGeneration
from modeling_mixpert import MixpertForConditionalGeneration, versatile_modules
from processing_chimera import ChimeraProcessor


logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ arguments


@dataclass
class ModelArguments:
    """Which model to start from. Without `model_name_or_path` a tiny model is built offline from configs
    (`TinyArguments`)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved Chimera / Mixpert (path or Hub repo id). Default: build a tiny model."}
    )
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: as saved)."})


@dataclass
class DataArguments:
    """Where the training data is. Without `train_file` a small synthetic six-domain set is written and used
    (`TinyArguments`)."""

    train_file: list[str] | None = field(
        default=None, metadata={"help": "JSONL / JSON / parquet files (messages+images or LLaVA conversations)."}
    )
    eval_file: list[str] | None = field(default=None, metadata={"help": "Evaluation files, same formats."})
    image_root: str | None = field(default=None, metadata={"help": "Folder relative image paths start from."})
    allow_images_outside_root: bool = field(
        default=False, metadata={"help": "Accept image paths in the data that leave the image root (`../`, absolute "
                                         "paths). Off by default: a data file cannot make training read any file."})


@dataclass
class SFTDataArguments(DataArguments):
    """`DataArguments` plus the supervised collator's length limit (DPO has its own `max_length`)."""

    max_length: int | None = field(default=None, metadata={"help": "Raise on longer samples (never truncate)."})


# The model flags of TinyArguments that only one kind of tiny model reads (the others serve every kind).
_TINY_FLAGS_OF = {
    "native": (),
    "chimera": ("tiny_experts",),
    "mixpert": ("tiny_domains", "tiny_num_vision_layers", "tiny_num_expert_layers"),
}


@dataclass
class TinyArguments:
    """The offline stand-ins: the tiny model built without `--model_name_or_path` and the synthetic data written
    without `--train_file`. A run on a real model and real data reads none of these."""

    tiny_family: str = field(default="internvl", metadata={"help": "Tiny model: llava_onevision, qwen2_vl, internvl."})
    tiny_image_size: int = field(default=32, metadata={"help": "Tiny model and synthetic data: image side in pixels."})
    tiny_patch_size: int = field(default=8, metadata={"help": "Tiny model: ViT patch side in pixels."})
    tiny_hidden_size: int = field(default=32, metadata={"help": "Tiny model: LLM width."})
    tiny_seed: int = field(default=0, metadata={"help": "Tiny model: initialisation seed."})
    tiny_model: str = field(default="chimera", metadata={"help": "train.dpo's tiny model: chimera or mixpert."})
    tiny_experts: str = field(
        default="table=pix2struct_vision_model,chart=siglip_vision_model,math=clip_vision_model",
        metadata={"help": "Tiny Chimera: domain=expert_family pairs."},
    )
    tiny_domains: str = field(default="chart,table,math,document,ocr,general",
                              metadata={"help": "Tiny Mixpert: the domain experts, comma separated."})
    tiny_num_vision_layers: int = field(default=3, metadata={"help": "Tiny Mixpert: vision tower depth."})
    tiny_num_expert_layers: int = field(default=2, metadata={"help": "Tiny Mixpert: K."})
    tiny_train_per_domain: int = field(default=8, metadata={"help": "Synthetic data: training rows per domain."})
    tiny_eval_per_domain: int = field(default=2, metadata={"help": "Synthetic data: evaluation rows per domain."})
    tiny_data_seed: int = field(default=0, metadata={"help": "Synthetic data: seed."})

    def refuse_flags_of_other_models(self, kind: str, script: str) -> None:
        """Every script takes this one group, so a flag of another script's tiny model would parse and do nothing
        (`train.sft --tiny_experts ...`): refuse it, as the parser refuses an unknown flag."""
        own = set(_TINY_FLAGS_OF[kind]) | ({"tiny_model"} if script == "train.dpo" else set())
        others = {name for names in _TINY_FLAGS_OF.values() for name in names} | {"tiny_model"}
        given = [f"--{f.name}" for f in dataclasses.fields(self)
                 if f.name in others - own and getattr(self, f.name) != f.default]
        if given:
            raise ValueError(f"{script} builds a tiny {kind} model, which does not read {', '.join(given)}: drop "
                             f"{'it' if len(given) == 1 else 'them'}.")


TRUST_REMOTE_CODE_HELP = ("Let code in the model folder run (a tokenizer or processor with custom code). Off by "
                          "default (as in TRL's scripts): Chimera and Mixpert load with this project's classes.")


def read_model_type(path: str, expected: str | None = None, script: str = "this script") -> str:
    """`model_type` of a saved model (folder or Hub repo id), read from its `config.json` without running any code
    from it. Raises when there is no `config.json`, or when it is not `expected`."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: pass a folder saved with `save_pretrained` (or a Hub "
                                f"repo id) as --model_name_or_path.")
    kind = PretrainedConfig.get_config_dict(path)[0].get("model_type")
    if expected is not None and kind != expected:
        raise ValueError(f"{path} holds a {kind!r} model; {script} trains {expected!r} models. Pass a {expected} "
                         f"folder as --model_name_or_path.")
    return kind


def dtype_from_name(name: str | None):
    if name is None:
        return None
    if not hasattr(torch, name) or not isinstance(getattr(torch, name), torch.dtype):
        raise ValueError(f"Unknown dtype {name!r}: use float32, bfloat16 or float16.")
    return getattr(torch, name)


def build_tiny_model(kind: str, tiny: TinyArguments):
    """`(model, processor)`: the tiny offline Chimera, Mixpert or native VLM (`kind`: chimera, mixpert, native)
    a script trains when no `--model_name_or_path` is given."""
    family, sizes = tiny.tiny_family, {"image_size": tiny.tiny_image_size, "patch_size": tiny.tiny_patch_size}
    if kind == "native":
        tokenizer = build_tokenizer(family)
        model = build_generalist(family, tokenizer, seed=tiny.tiny_seed, hidden_size=tiny.tiny_hidden_size, **sizes)
        return model, build_processor(family, tokenizer, **sizes)
    routed = {"seed": tiny.tiny_seed, "generalist_kwargs": {"hidden_size": tiny.tiny_hidden_size}, **sizes}
    if kind == "chimera":
        experts = dict(pair.split("=") for pair in tiny.tiny_experts.split(","))
        return build_tiny_chimera(family, experts, **routed)
    if kind == "mixpert":
        return build_tiny_mixpert(family, domains=tiny.tiny_domains.split(","),
                                  num_vision_layers=tiny.tiny_num_vision_layers,
                                  num_expert_layers=tiny.tiny_num_expert_layers, **routed)
    raise ValueError(f"--tiny_model must be chimera or mixpert, got {kind!r}.")


def load_model_to_train(kind: str, model_args: ModelArguments, tiny: TinyArguments, trust_remote_code: bool = False):
    """`(model, processor)` a Chimera / Mixpert script (`kind`) starts from: the saved one at `--model_name_or_path`
    (refused unless it is a `kind` model), or the tiny one built from `tiny`."""
    if model_args.model_name_or_path is None:
        return build_tiny_model(kind, tiny)
    read_model_type(model_args.model_name_or_path, kind, f"train.{kind}")
    model_class, processor_class = pretrained_classes(kind)
    model = model_class.from_pretrained(model_args.model_name_or_path, dtype=dtype_from_name(model_args.dtype))
    return model, processor_class.from_pretrained(model_args.model_name_or_path, trust_remote_code=trust_remote_code)


def pretrained_classes(kind: str) -> tuple:
    """`(model class, processor class)` a saved model of `kind` (`read_model_type`'s answer) loads with: Chimera and
    Mixpert with this project's classes (no code from the folder runs), anything else with the Auto classes."""
    if kind == "chimera":
        return ChimeraForConditionalGeneration, ChimeraProcessor
    if kind == "mixpert":  # the base's native processor
        return MixpertForConditionalGeneration, AutoProcessor
    return AutoModelForImageTextToText, AutoProcessor


# ----------------------------------------------------------------------------------------------------------- data


def write_tiny_data(folder: str, tiny: TinyArguments, preference: bool = False) -> dict:
    """Write the synthetic six-domain set as local files (the same path real data takes) and return their paths:
    `{"train": [...], "eval": [...]}`. Existing files (same seed and sizes) are reused."""
    kind = "preference" if preference else "sft"
    marker = os.path.join(folder, f"{kind}.json")
    image_size = tiny.tiny_image_size
    spec = {"seed": tiny.tiny_data_seed, "train": tiny.tiny_train_per_domain,
            "eval": tiny.tiny_eval_per_domain, "image_size": image_size}
    paths = {"train": [os.path.join(folder, f"{kind}-train.jsonl")],
             "eval": [os.path.join(folder, f"{kind}-eval.jsonl")]}
    if os.path.isfile(marker) and json.load(open(marker)) == spec:
        return paths
    data = build_dataset(
        num_per_domain={"train": spec["train"], "validation": spec["eval"], "test": 0}, mixed=0,
        seed=spec["seed"], image_size=image_size,
    )
    if preference:
        export_preference_jsonl(_preference_rows(data["train"], spec["seed"]), folder, f"{kind}-train")
        export_preference_jsonl(_preference_rows(data["validation"], spec["seed"] + 1), folder, f"{kind}-eval")
    else:
        export_sft_jsonl(data["train"], folder, f"{kind}-train")
        export_sft_jsonl(data["validation"], folder, f"{kind}-eval")
    with open(marker, "w") as f:
        json.dump(spec, f)
    return paths


def _preference_rows(split, seed):
    pairs = make_preference_pairs(split, seed=seed)
    for pair, row in zip(pairs, split):
        yield {"image": row["image"], "question": row["question"], "domain": row["domain"],
               "chosen": _text(pair["chosen"]), "rejected": _text(pair["rejected"])}


def _text(messages) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else "".join(i.get("text") or "" for i in content)


def training_files(data_args: DataArguments, output_dir: str, tiny: TinyArguments, preference: bool = False) -> dict:
    """The files to train / evaluate on: the given ones, or the synthetic set (`tiny`) written under
    `output_dir/tiny_data`."""
    if data_args.train_file:
        return {"train": data_args.train_file, "eval": data_args.eval_file}
    return write_tiny_data(os.path.join(output_dir, "tiny_data"), tiny, preference=preference)


# ------------------------------------------------------------------------------------------------- trainability


def chimera_groups(model) -> dict:
    """Named parameter groups of a Chimera (the unit stages freeze / train)."""
    inner = model.model
    return {
        "router": [inner.router],
        "expert_projectors": [inner.expert_projectors],
        "llm": [inner.generalist.language_model, model.lm_head],
        "generalist_projector": [inner.family.projector()],
        "generalist_vision": [inner.family.tower()],
    }


def mixpert_groups(model) -> dict:
    """Named parameter groups of a Mixpert: `router`, `llm`, `versatile` (the base model's own last K vision layers,
    final norm and projector: the versatile expert) and `expert:<domain>` per domain."""
    inner = model.model
    layers, norm, projector = versatile_modules(inner.family, model.config)
    groups = {"router": [inner.vision_router], "llm": [inner.backbone.language_model, model.lm_head],
              "versatile": [*layers, *([norm] if norm is not None else []), projector]}
    for domain, expert in inner.vision_experts.items():
        groups[f"expert:{domain}"] = [expert]
    return groups


def set_trainable(model, groups: dict, names: list[str]) -> dict:
    """Freeze everything, then unfreeze the groups `names`. Chimera's expert encoders stay frozen whatever `names`
    says (Chimera §3.4). Returns a summary: trainable / total parameters and the fraction."""
    unknown = sorted(set(names) - set(groups))
    if unknown:
        raise ValueError(f"Unknown parameter groups {unknown}; known: {sorted(groups)}.")
    model.requires_grad_(False)
    for name in names:
        for module in groups[name]:
            module.requires_grad_(True)
    if hasattr(model.model, "expert_encoders"):
        model.model.expert_encoders.requires_grad_(False)
    return trainable_summary(model)


@contextlib.contextmanager
def fp32_master_weights(model, training_args):
    """Train the trainable parameters in fp32 while the frozen ones keep the model's bf16 / fp16, then cast them back.

    Mixed-precision training needs fp32 master weights: an AdamW step moves a weight by about the learning rate, and in
    bf16 a change smaller than 2^-8 of the weight rounds away, so at the real configs' rates (Mixpert's experts 2e-6,
    Chimera's DPO 5e-7) nearly every update is lost. Measured on a tiny bf16 Mixpert, 40 steps of the expert phase at
    2e-6: 5.6% of the expert's weights changed with bf16 weights, 43.6% with fp32 master weights. DeepSpeed keeps its
    own fp32 copy, and FSDP under accelerate or `--fsdp` upcasts the model under mixed precision, so nothing is done
    there; plain `Trainer` (one device, DDP) updates parameters in their own dtype, so this does what PEFT does for
    adapters (`autocast_adapter_dtype`). Cost: a trained parameter, its gradient and its AdamW states take 16 bytes
    instead of 8.
    With `--bf16` / `--fp16` autocast computes in half precision as before. Without autocast the weights cannot be
    mixed (a bf16 input meets an fp32 weight): a warning says the updates will round away and how to fix it.

    Yields the upcast parameters. On exit, normal or not, they take their dtype back (the accumulated change survives
    the final rounding); checkpoints written meanwhile hold them in fp32, and resuming inside this context loads them
    as they were saved."""
    half = (torch.bfloat16, torch.float16)
    params = [p for p in model.parameters() if p.requires_grad and p.dtype in half]
    managed = bool(training_args.deepspeed or training_args.fsdp) or any(
        os.environ.get(name, "false").lower() == "true" for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))
    if not params or managed:
        yield []
        return
    if not (training_args.bf16 or training_args.fp16):
        logger.warning(
            "%d trainable parameters are %s and no mixed precision is on: AdamW updates smaller than 2^-8 of a weight "
            "will round away. Pass --bf16 true (the trainable weights are then kept in fp32) or load with --dtype "
            "float32.", len(params), params[0].dtype)
        yield []
        return
    dtypes = [p.dtype for p in params]
    try:
        for p in params:
            p.data = p.data.float()
        logger.info("Training %d parameters in fp32 (master weights); the frozen ones stay %s.", len(params), dtypes[0])
        yield params
    finally:
        for p, dtype in zip(params, dtypes):
            p.data = p.data.to(dtype)


def trainable_summary(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


# ------------------------------------------------------------------------------------------------------ trainer


class RoutedModelTrainer(Trainer):
    """`Trainer` that also logs the two parts of Chimera's / Mixpert's loss (`lm_loss`, `router_loss`: means over
    the micro-batches since the last log; the logged `loss` is the one optimised)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_parts = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for key in ("lm_loss", "router_loss"):
                value = outputs.get(key) if hasattr(outputs, "get") else None
                if value is not None:
                    self._loss_parts[key].append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:
            for key, values in self._loss_parts.items():
                if values:
                    logs[key] = round(sum(values) / len(values), 4)
            self._loss_parts.clear()
        super().log(logs, *args, **kwargs)


class GroupLearningRateTrainer(RoutedModelTrainer):
    """`RoutedModelTrainer` where some parameters get their own learning rate (`lr_groups`: a list of
    `(parameters, lr)`); the rest use `learning_rate`. Everything else is `Trainer.create_optimizer`'s: the optimizer
    class and its kwargs come from `--optim` (`Trainer.get_optimizer_cls_and_kwargs`), biases and norms get no
    weight decay, and the schedule scales every group alike."""

    def __init__(self, *args, lr_groups: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_groups = [(list(params), lr) for params, lr in (lr_groups or []) if lr is not None]

    def create_optimizer(self, model=None):
        if self.optimizer is not None or not self.lr_groups:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        lr_of = {}
        for params, lr in self.lr_groups:
            for p in params:
                lr_of.setdefault(id(p), lr)  # a parameter in two groups keeps the first one's rate
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                key = (lr_of.get(id(p), self.args.learning_rate), name in decay)
                groups.setdefault(key, []).append(p)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls):
            raise ValueError(f"--optim {self.args.optim} builds its own parameter groups, so it cannot take this "
                             "script's per-group learning rates; use --optim adamw_torch (the default) or drop the "
                             "per-group learning-rate flags.")
        self.optimizer = optimizer_cls(
            [{"params": params, "lr": lr, "weight_decay": self.args.weight_decay if decays else 0.0}
             for (lr, decays), params in groups.items()],
            **optimizer_kwargs,
        )
        return self.optimizer


class RouterOnFeatures(torch.nn.Module):
    """A router alone, trained with `Trainer` on cached router inputs: `forward(features, labels)` returns the
    cross-entropy and the logits. Used where the router's inputs come from frozen layers (Chimera's generalist tower,
    Mixpert's shared layers), so they are computed once instead of every epoch."""

    def __init__(self, router: torch.nn.Module):
        super().__init__()
        self.router = router

    def forward(self, features, labels=None):
        logits = self.router(features.to(next(self.router.parameters()).dtype))
        loss = torch.nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class RouterFeatureCache(torch.utils.data.Dataset):
    """Router inputs computed once, kept as one float32 matrix in a file and memory-mapped, with their int64 targets.

    Why not a `datasets` table: its rows go through Python floats into a float64 Arrow column (+1.9 GB peak for
    20 000 x 1152 features, ~94 GB for Mixpert's 1M router samples). Here features are appended chunk by chunk to a
    raw float32 file, so building the cache holds one chunk in memory and training pages rows in from the file: peak
    memory stays near the N x D x 4 bytes the features take. The file lives in a temporary folder under `folder` and
    is removed with the cache object.
    """

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="router-features-", dir=folder)
        self.path = os.path.join(self._tmp.name, "features.f32")
        self._file, self._targets, self.width, self.features = open(self.path, "wb"), [], None, None

    def append(self, features: torch.Tensor, targets) -> None:
        features = features.detach().to("cpu", torch.float32).contiguous()
        if self.width is None:
            self.width = features.shape[-1]
        self._file.write(features.numpy().tobytes())
        self._targets.extend(int(t) for t in targets)

    def close(self) -> "RouterFeatureCache":
        self._file.close()
        if not self._targets:
            raise ValueError("The router feature pass found no labelled image in the training data.")
        # "c": copy-on-write mapping, so torch gets a writable array without touching the file
        self._mapped = np.memmap(self.path, dtype=np.float32, mode="c", shape=(len(self._targets), self.width))
        self.features, self.targets = torch.from_numpy(self._mapped), torch.tensor(self._targets, dtype=torch.long)
        return self

    def __len__(self):
        return len(self._targets)

    def __getitem__(self, i):
        return {"features": self.features[i], "labels": self.targets[i]}


def training_device(model, training_args) -> torch.device:
    """The one place the router phases put the model: `training_args.device` (where `Trainer` will put it too), so
    the features computed before training and the router trained after see the same device. Batches follow with
    `to_device`."""
    device = training_args.device
    model.to(device)
    return device


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sample_per_domain(data, per_domain: int | None, seed: int, domain_of=lambda row: row["domain"]):
    """Up to `per_domain` rows of each domain, drawn at random with `seed` (Mixpert §4.2 samples 200K router images
    per domain; without it the most common domain dominates the router's data). Rows, not images: a row with several
    images, or routed per tile, gives several router samples. `None` keeps every row."""
    if per_domain is None:
        return data
    if per_domain < 1:
        raise ValueError(f"--router_samples_per_domain must be a positive number of rows, got {per_domain}.")
    by_domain = defaultdict(list)
    for i, domain in enumerate(data["domain"]):
        by_domain[domain].append(i)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for domain in sorted(by_domain):
        rows = by_domain[domain]
        if len(rows) > per_domain:
            rows = [rows[j] for j in torch.randperm(len(rows), generator=generator)[:per_domain].tolist()]
        elif len(rows) < per_domain:  # kept whole: a data-size sweep point past this size is not balanced any more
            logger.warning("router data: domain %r has %d rows, fewer than --router_samples_per_domain %d; all are "
                           "used.", domain, len(rows), per_domain)
        logger.info("router data: %d rows of domain %r", len(rows), domain)
        keep.extend(rows)
    return data.select(sorted(keep))


def train_router_on_features(router, cache: RouterFeatureCache, training_args):
    """Fit `router` on a `RouterFeatureCache` with `Trainer` (all of `TrainingArguments` applies: epochs, learning
    rate, schedule, resume). The router trains in fp32 (its master weights; the models keep it fp32 in every dtype).
    Returns the trainer; save the model before `router_accuracy`."""
    router.float()
    # The trainer holds the router alone: it must not push its checkpoints (`finish` pushes the whole model), and a
    # small MLP has no activations worth checkpointing (a stage config's `gradient_checkpointing: true` would make
    # `Trainer` call `gradient_checkpointing_enable` on it).
    no_checkpointing = {name: False for name in ("gradient_checkpointing", "activation_checkpointing")
                        if hasattr(training_args, name)}  # the new name and its deprecated alias
    args = dataclasses.replace(training_args, remove_unused_columns=False, label_names=["labels"], push_to_hub=False,
                               **no_checkpointing)
    trainer = Trainer(model=RouterOnFeatures(router), args=args, train_dataset=cache)
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    return trainer


@torch.no_grad()
def router_accuracy(router, cache: RouterFeatureCache, batch_size: int = 4096) -> float:
    """The router's accuracy on the cached features, in batches on the router's own device."""
    device = next(router.parameters()).device
    correct = 0
    for start in range(0, len(cache), batch_size):
        features = cache.features[start:start + batch_size].to(device)
        logits = router(features.to(next(router.parameters()).dtype))
        correct += int((logits.argmax(-1).cpu() == cache.targets[start:start + batch_size]).sum())
    return correct / len(cache)


def finish_router(trainer, model, processor, training_args, summary: dict, router, cache) -> dict:
    """`finish` (save, summary) first, so the trained router is on disk whatever happens next, then the training
    accuracy is measured and added to `run_summary.json`, then the folder is pushed if asked. Returns the summary."""
    summary = finish(trainer, model, processor, training_args, summary, push=False)
    summary["results"] = {**summary.get("results", {}), "train_accuracy": router_accuracy(router, cache)}
    if trainer.is_world_process_zero():
        save_run_summary(training_args.output_dir, summary)
        if training_args.push_to_hub:
            push_output_dir(training_args, f"{summary.get('script', 'training')} finished")
    return summary


def prepare_training_args(training_args, label_names=("labels", "expert_labels")):
    """Settings every script needs: keep raw columns for the collator, know the label names (`None`: leave them to
    the trainer), tolerate experts that a batch does not use under DDP."""
    training_args.remove_unused_columns = False
    if label_names is not None:
        training_args.label_names = list(label_names)
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True
    return training_args


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder that `Trainer` finished writing. `Trainer` writes `trainer_state.json` last
    (after the weights, optimizer, scheduler and RNG states); a run killed during a save leaves a newer folder without
    it (or with it cut short), which `get_last_checkpoint` would pick and the resume would fail on."""
    if not os.path.isdir(output_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name))]
    for _, name in sorted(found, reverse=True):
        state = os.path.join(output_dir, name, "trainer_state.json")
        try:
            with open(state) as f:
                json.load(f)
        except (OSError, ValueError):
            logger.warning("%s is incomplete (no readable trainer_state.json): not resuming from it.", name)
            continue
        return os.path.join(output_dir, name)
    return None


def resume_checkpoint(training_args):
    """`--resume_from_checkpoint <path>`, or `last` / `true` for the newest checkpoint in `output_dir`."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("last", "true"):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint in {training_args.output_dir}.")
        return last
    if not os.path.isdir(value):
        raise ValueError(f"--resume_from_checkpoint: {value} is not a folder.")
    return value


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def save_run_summary(output_dir: str, summary: dict) -> None:
    """`run_summary.json`: what trained, how much, how fast (read by tests and the mini-lab)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)


def save_atomically(output_dir: str, *objects, state_dict: dict | None = None) -> None:
    """`save_pretrained` of each object into a temporary folder inside `output_dir`, then each file moved into place
    with `os.replace` (atomic per file), weights first and `config.json` last: a run killed while saving leaves every
    file whole (never a half-written `model.safetensors`), though a kill between two moves can leave new weights next
    to the previous config. Weight files of a previous save that this one lacks (a single file replaced by shards,
    or the reverse) are removed before `config.json` moves in. `state_dict`, if given, is what the first object (the
    model) saves."""
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=output_dir)
    try:
        for i, obj in enumerate(objects):
            obj.save_pretrained(staging, **({"state_dict": state_dict} if i == 0 and state_dict is not None else {}))
        names = sorted(os.listdir(staging), key=lambda n: (n == "config.json", not n.endswith(".safetensors"), n))
        weights = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
        stale = [n for n in os.listdir(output_dir) if weights.fullmatch(n) and n not in names]
        for name in names:
            if name == "config.json":  # a previous save's weight files the new one does not have go first
                for old in stale:
                    os.remove(os.path.join(output_dir, old))
            target = os.path.join(output_dir, name)
            if os.path.isdir(target) and os.path.isdir(os.path.join(staging, name)):
                shutil.rmtree(target)  # a folder (e.g. extra chat templates) replaces the old one whole
            os.replace(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gathered_state_dict(trainer, model) -> dict | None:
    """The model's full state dict where its own parameters are not it, else `None` (`save_pretrained` reads the model).

    Under DeepSpeed ZeRO-3 and FSDP the parameters are shards, and DeepSpeed casts the whole module to bf16, router
    included: gathered as `Trainer.save_model` gathers them (`accelerator.get_state_dict`), then the modules the model
    keeps in fp32 (`_keep_in_fp32_modules_strict`, the router) are saved in fp32 again, so the folder has the same
    dtypes however it was trained. Not run here: DeepSpeed and accelerate's FSDP need GPUs (`bench/gpu_check.py`
    checks the ZeRO-2 folder on a GPU)."""
    if trainer is None or not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        return None
    state = trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
    fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return {name: tensor.float() if fp32 & set(name.split(".")) and tensor.is_floating_point() else tensor
            for name, tensor in state.items()}


def finish(trainer, model, processor, training_args, summary: dict, push: bool = True) -> dict:
    """Save the final model (+ processor) in `output_dir`, record the run summary, push if asked (and `push`). Returns
    the summary as written."""
    steps = trainer.state.global_step if trainer is not None else 0
    metrics = trainer.state.log_history if trainer is not None else []
    train_runtime = next((m["train_runtime"] for m in reversed(metrics) if "train_runtime" in m), None)
    summary = {**summary, "global_step": steps, "world_size": world_size(),
               "seconds_per_step": (train_runtime / steps) if train_runtime and steps else None,
               "device": str(next(model.parameters()).device)}  # where the model trained (and still is)
    state_dict = gathered_state_dict(trainer, model)  # every process takes part (a collective under ZeRO-3 / FSDP)
    if trainer is None or trainer.is_world_process_zero():
        save_atomically(training_args.output_dir, model, processor, state_dict=state_dict)
        save_run_summary(training_args.output_dir, summary)
    if push and training_args.push_to_hub and (trainer is None or trainer.is_world_process_zero()):
        push_output_dir(training_args, f"{summary.get('script', 'training')} finished")
    return summary


def push_output_dir(training_args, commit_message: str) -> str:
    """Upload the saved `output_dir` (model, code, processor, run summary; not the checkpoints) with a model card to
    `--hub_model_id` (default: the folder's name). `Trainer.push_to_hub` is not used: in the router phases the
    trainer holds only the router, and its card does not know Chimera / Mixpert."""
    folder = training_args.output_dir
    api = HfApi(token=training_args.hub_token)
    repo_id = training_args.hub_model_id or os.path.basename(os.path.normpath(folder))
    repo_id = api.create_repo(repo_id, private=bool(training_args.hub_private_repo), exist_ok=True).repo_id
    card = os.path.join(folder, "README.md")
    if not os.path.isfile(card):
        render_model_card(folder, None, repo_id).save(card)
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=commit_message,
                      ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "tiny_data/**",
                                       "training_args.bin", "router-features-*/**",
                                       ".saving-*/**"])  # feature caches, save staging
    return repo_id
