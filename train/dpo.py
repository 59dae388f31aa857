"""Preference optimisation (Chimera's optional stage 3; also for Mixpert) with TRL's `DPOTrainer`.

Data: `prompt` / `chosen` / `rejected` (conversational messages) and `images` (paths relative to the file, or
absolute) in JSONL / JSON / parquet. The router is frozen (DPO's loss reaches it through no path: routing is an
argmax), so it keeps whatever stage 1/2 (or Mixpert's router phase) taught it. By default the LLM trains; choose
with `--train_groups` (Chimera: router, expert_projectors, llm, generalist_projector; Mixpert: llm, expert:<domain>).

Tiny, offline (builds a tiny Chimera and synthetic preference pairs when no paths are given):

    python -m train.dpo --config train/configs/tiny/chimera_dpo.yaml --output_dir runs/chimera-dpo \\
        --model_name_or_path runs/chimera-stage2

Real run:

    accelerate launch --config_file train/configs/accelerate/deepspeed_zero2.yaml -m train.dpo \\
        --config train/configs/real/chimera_internvl_8b_dpo.yaml --output_dir runs/chimera-8b-dpo
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import datasets
from tqdm.auto import tqdm
from trl import DPOConfig, DPOTrainer, TrlParser
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from chimera_mixpert.data.loading import resolve_image_path
from chimera_mixpert.training import (
    DataArguments,
    ModelArguments,
    TinyArguments,
    build_tiny_model,
    chimera_groups,
    dtype_from_name,
    finish,
    fp32_master_weights,
    mixpert_groups,
    prepare_training_args,
    pretrained_classes,
    read_model_type,
    resume_checkpoint,
    set_trainable,
    training_files,
)


logger = logging.getLogger(__name__)


@dataclass
class DPOScriptArguments:
    """What to train with DPO."""

    train_groups: list[str] = field(default_factory=lambda: ["llm"],
                                    metadata={"help": "Parameter groups that train (the router never does)."})


def load_models(model_args: ModelArguments, script_args: DPOScriptArguments, trust_remote_code: bool = False,
                tiny_args: TinyArguments | None = None):
    """`(kind, policy, reference, processor)`; the reference is a second, frozen copy (TRL needs `ref_model` for
    models it did not load itself)."""
    if model_args.model_name_or_path is None:
        tiny_args = tiny_args or TinyArguments()
        kind = tiny_args.tiny_model
        (policy, processor), (reference, _) = build_tiny_model(kind, tiny_args), build_tiny_model(kind, tiny_args)
        return kind, *without_gscm(policy, reference), processor
    kind = read_model_type(model_args.model_name_or_path)
    if kind not in ("chimera", "mixpert"):
        raise ValueError(f"{model_args.model_name_or_path} holds a {kind!r} model; "
                         "train.dpo trains Chimera or Mixpert.")
    model_class, processor_class = pretrained_classes(kind)
    dtype = dtype_from_name(model_args.dtype)
    policy = model_class.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    reference = model_class.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    processor = processor_class.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=trust_remote_code  # DPOConfig's flag, off by default
    )
    return kind, *without_gscm(policy, reference), processor


def without_gscm(policy, reference):
    """GSCM belongs to stage 2 (Chimera §3.3). A stage-2 checkpoint keeps its `gscm_ratio` in `config.json`; in DPO
    the policy runs in train mode and the reference in eval mode, so a ratio left on would mask the policy's image
    tokens but not the reference's, and the log-probability ratios would compare two different inputs. Both get 0."""
    for model in (policy, reference):
        if getattr(model.config, "gscm_ratio", 0.0):
            logger.info(f"DPO: gscm_ratio {model.config.gscm_ratio} -> 0 (GSCM is a stage-2 mechanism).")
            model.config.gscm_ratio = 0.0
    return policy, reference


def load_preference_data(files, image_root=None, allow_outside_root=False):
    """Preference rows with `images` decoded to PIL (TRL's vision collator reads PIL images). Image paths must stay
    inside `image_root` (default: the data file's folder) unless `allow_outside_root`."""
    files = [files] if isinstance(files, str) else list(files)
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"Data file not found: {f}")
    kind = "parquet" if files[0].endswith(".parquet") else "json"
    data = datasets.load_dataset(kind, data_files={"train": files}, split="train")
    missing = [c for c in ("prompt", "chosen", "rejected", "images") if c not in data.column_names]
    if missing:
        raise ValueError(f"Preference data needs columns prompt, chosen, rejected, images; missing {missing}.")
    root = image_root or os.path.dirname(os.path.abspath(files[0]))

    def resolve(row, index):
        return {"images": [resolve_image_path(image, root, f"{files[0]}, row {index}", allow_outside_root)
                           for image in row["images"]]}

    data = data.map(resolve, with_indices=True)
    return data.cast_column("images", datasets.Sequence(datasets.Image()))


def main(script_args, training_args, model_args, data_args, tiny_args: TinyArguments | None = None):
    tiny_args = tiny_args or TinyArguments()
    if tiny_args.tiny_model not in ("chimera", "mixpert"):
        raise ValueError(f"--tiny_model must be chimera or mixpert, got {tiny_args.tiny_model!r}.")
    tiny_args.refuse_flags_of_other_models(tiny_args.tiny_model, "train.dpo")
    prepare_training_args(training_args, label_names=None)  # label names left as DPOTrainer has them
    kind, policy, reference, processor = load_models(model_args, script_args, training_args.trust_remote_code,
                                                     tiny_args)
    if "router" in script_args.train_groups:
        raise ValueError("The router does not train with DPO (routing is an argmax: no gradient reaches it).")
    groups = chimera_groups(policy) if kind == "chimera" else mixpert_groups(policy)
    summary = set_trainable(policy, groups, script_args.train_groups)
    reference.requires_grad_(False).eval()
    files = training_files(data_args, training_args.output_dir, tiny_args, preference=True)
    outside = data_args.allow_images_outside_root
    train_data = load_preference_data(files["train"], data_args.image_root, outside)
    eval_data = load_preference_data(files["eval"], data_args.image_root, outside) if files["eval"] else None
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=training_args, train_dataset=train_data,
        eval_dataset=eval_data if training_args.eval_strategy != "no" else None, processing_class=processor,
    )
    check_lengths(trainer, {"training": train_data, "evaluation": trainer.eval_dataset})
    with fp32_master_weights(policy, training_args) as upcast:
        trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    finish(trainer, policy, processor, training_args,
           {"script": "dpo", "model": kind, "trainable": summary, "groups": script_args.train_groups,
            "loss_type": list(training_args.loss_type), "beta": training_args.beta,
            "fp32_master_parameters": sum(p.numel() for p in upcast)})
    return trainer


def check_lengths(trainer, datasets: dict, batch_size: int = 8) -> int:
    """Refuse, before training, data that TRL's `max_length` would truncate. TRL's vision collator cuts every sequence
    at `max_length` tokens from the start; a prompt with many image tokens (InternVL: 256 per tile, up to 7 tiles)
    would lose image tokens, or its completion, and then fail or train on nothing. The collator is run once over the
    data without a limit and each row's length is measured (Chimera's expert tokens are inserted later by the model
    and are not part of this length). Returns the longest length seen."""
    limit = trainer.args.max_length
    collator = trainer.data_collator
    if limit is None or not isinstance(collator, DataCollatorForVisionPreference):
        return -1
    measure = dataclasses.replace(collator, max_length=None)
    longest, first_over = 0, None
    for name, data in datasets.items():
        if data is None:
            continue
        for start in tqdm(range(0, len(data), batch_size), desc=f"measuring {name} lengths",
                          disable=not trainer.is_world_process_zero()):
            rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            lengths = measure(rows)["attention_mask"].sum(-1).view(2, -1).amax(0)  # chosen / rejected rows
            longest = max(longest, int(lengths.max()))
            over = (lengths > limit).nonzero()
            if first_over is None and len(over):
                first_over = (name, start + int(over[0]), int(lengths[over[0]]))
    if first_over is not None:
        name, row, length = first_over
        raise ValueError(
            f"The {name} data's row {row} is {length} tokens long (prompt with its image tokens + answer) but "
            f"--max_length is {limit}: TRL would cut it, image tokens included. Pass --max_length {longest} (the "
            f"longest row) or more, or --max_length None to never truncate."
        )
    return longest


def make_parser(prog: str | None = None):
    return TrlParser((DPOScriptArguments, DPOConfig, ModelArguments, DataArguments, TinyArguments), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
