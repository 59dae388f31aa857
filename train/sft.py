"""Supervised fine-tuning of a native LLaVA-OneVision / Qwen2-VL / InternVL model with `transformers.Trainer`.

Chimera and Mixpert start from an existing, jointly trained VLM. This script is how the mini-lab makes that stand-in
(joint training on all domains) and its domain specialists (expert vision encoders trained on one domain), and how a
user fine-tunes a backbone before assembling or upcycling it. Same data formats and collator as the other scripts;
assistant tokens only in the loss.

    python -m train.sft --model_name_or_path OpenGVLab/InternVL3-1B-hf --train_file data/all.jsonl \\
        --train_groups projector llm --output_dir runs/joint
    python -m train.sft --train_file data/all.jsonl --output_dir runs/tiny-joint     # a tiny model, offline
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments
from trl import TrlParser

from chimera_mixpert.data.collators import VisionLanguageSFTCollator
from chimera_mixpert.data.loading import load_vl_dataset
from chimera_mixpert.training import (
    ModelArguments,
    SFTDataArguments,
    TinyArguments,
    build_tiny_model,
    dtype_from_name,
    finish,
    fp32_master_weights,
    prepare_training_args,
    resume_checkpoint,
    set_trainable,
    training_files,
)
from vlm_backbones import get_backbone_family


@dataclass
class SFTScriptArguments:
    train_groups: list[str] = field(default_factory=lambda: ["vision", "projector", "llm"],
                                    metadata={"help": "What trains: vision, projector, llm."})
    domains: list[str] | None = field(default=None, metadata={"help": "Train on rows of these domains only."})


def native_groups(model) -> dict:
    family = get_backbone_family(model.model)
    return {
        "vision": [family.tower()],
        "projector": [family.projector()],
        "llm": [model.model.language_model, model.lm_head],
    }


def load_model_and_processor(model_args: ModelArguments, tiny_args: TinyArguments | None = None):
    if model_args.model_name_or_path is None:
        return build_tiny_model("native", tiny_args or TinyArguments())
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path, dtype=dtype_from_name(model_args.dtype), use_safetensors=True
    )
    return model, AutoProcessor.from_pretrained(model_args.model_name_or_path)


def main(script_args, training_args, model_args, data_args, tiny_args: TinyArguments | None = None, model=None,
         processor=None):
    """Train; `model` / `processor` may be passed in directly (the mini-lab does) instead of being loaded."""
    tiny_args = tiny_args or TinyArguments()
    tiny_args.refuse_flags_of_other_models("native", "train.sft")
    prepare_training_args(training_args, label_names=("labels",))
    if model is None:
        model, processor = load_model_and_processor(model_args, tiny_args)
    summary = set_trainable(model, native_groups(model), script_args.train_groups)
    files = training_files(data_args, training_args.output_dir, tiny_args)
    data = load_vl_dataset(files["train"], data_args.image_root, allow_outside_root=data_args.allow_images_outside_root)
    if script_args.domains:
        data = data.filter(lambda row: row["domain"] in script_args.domains)
        if len(data) == 0:
            raise ValueError(f"No training rows with domains {script_args.domains}.")
    trainer = Trainer(model=model, args=training_args, train_dataset=data, processing_class=processor,
                      data_collator=VisionLanguageSFTCollator(processor, max_length=data_args.max_length))
    with fp32_master_weights(model, training_args) as upcast:
        trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    finish(trainer, model, processor, training_args,
           {"script": "sft", "groups": script_args.train_groups, "trainable": summary,
            "fp32_master_parameters": sum(p.numel() for p in upcast)})
    return trainer


def make_parser(prog: str | None = None):
    return TrlParser((SFTScriptArguments, TrainingArguments, ModelArguments, SFTDataArguments, TinyArguments),
                     prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
