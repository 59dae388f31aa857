"""Chimera's progressive training (Chimera §3.4) with `transformers.Trainer`.

Stage 1 trains the router, the expert projectors and the generalist's projector (Chimera §3.4 trains it in stages 1
and 2; `--train_generalist_projector false` freezes it); the generalist's vision encoder, the experts and the LLM stay
frozen. Stage 2 also trains the LLM (fully, or LoRA adapters with `--use_lora`) and turns on Generalist-Specialist
Collaboration Masking (`--gscm_ratio`, Chimera §3.3). Expert encoders are frozen at every stage. The loss is
`lm_loss + router_loss` (router cross-entropy on each sample's domain, teacher-forced experts); both parts are logged.
`--stage router` trains the router alone on generalist features computed once (the same objective as its part of
stages 1 and 2, for many epochs at the price of one pass of the vision tower); run it between stage 1 and stage 2.

Tiny, offline (builds a tiny model and synthetic data when no paths are given):

    python -m train.chimera --config train/configs/tiny/chimera_stage1.yaml --output_dir runs/stage1
    python -m train.chimera --config train/configs/tiny/chimera_stage2.yaml --output_dir runs/stage2 \\
        --model_name_or_path runs/stage1

Real run (see train/configs/real/), 8 GPUs:

    accelerate launch --config_file train/configs/accelerate/deepspeed_zero2.yaml -m train.chimera \\
        --config train/configs/real/chimera_internvl_8b_stage1.yaml --output_dir runs/chimera-8b-stage1

Two CPU processes (gloo data parallel): `torchrun --nproc_per_node 2 -m train.chimera --config ...`.
Resume: `--resume_from_checkpoint last` (or a checkpoint folder). Push: `--push_to_hub --hub_model_id org/name`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from peft import get_peft_model
from transformers import TrainingArguments
from trl import ModelConfig, TrlParser, get_peft_config

from chimera_mixpert.data.collators import VisionLanguageSFTCollator, make_domain_labels
from chimera_mixpert.data.loading import load_vl_dataset
from chimera_mixpert.training import (
    GroupLearningRateTrainer,
    ModelArguments,
    RouterFeatureCache,
    SFTDataArguments,
    TRUST_REMOTE_CODE_HELP,
    TinyArguments,
    chimera_groups,
    finish,
    finish_router,
    fp32_master_weights,
    load_model_to_train,
    prepare_training_args,
    resume_checkpoint,
    sample_per_domain,
    set_trainable,
    train_router_on_features,
    trainable_summary,
    to_device,
    training_device,
    training_files,
)


@dataclass
class ChimeraScriptArguments:
    """Stage and what it trains."""

    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})

    stage: str = field(default="1", metadata={"help": "1: router + expert and generalist projectors; 2: + LLM, with "
                                                     "GSCM; router: the router alone, on cached generalist features."})
    gscm_ratio: float = field(default=0.1, metadata={"help": "Stage 2: fraction of generalist image tokens masked "
                                                            "for expert images (Chimera §3.3). Ignored in stage 1."})
    no_expert_domains: list[str] = field(
        default_factory=lambda: ["general"],
        metadata={"help": "Data domains that use no expert (router class 0). Any other domain must be an expert's."},
    )
    train_generalist_projector: bool = field(
        default=True, metadata={"help": "Stages 1 and 2: train the generalist's projector too (Chimera §3.4 does); "
                                        "false freezes it. The router stage never trains it."})
    router_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the router (new, small, starts from scratch); default: "
                                        "--learning_rate."})
    router_samples_per_domain: int | None = field(
        default=None, metadata={"help": "--stage router: train on at most this many data rows per domain, drawn "
                                        "at random with --seed (default: every row)."})
    use_lora: bool = field(default=False, metadata={"help": "Stage 2: train LoRA adapters on the LLM (merged at the "
                                                           "end) instead of the full LLM."})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05


LLM_LORA_TARGETS = r".*generalist\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def load_model_and_processor(model_args: ModelArguments, script_args: ChimeraScriptArguments,
                             tiny_args: TinyArguments | None = None):
    return load_model_to_train("chimera", model_args, tiny_args or TinyArguments(), script_args.trust_remote_code)


def stage_groups(script_args: ChimeraScriptArguments) -> list[str]:
    script_args.stage = str(script_args.stage)  # a YAML config may give an int
    if script_args.stage not in ("1", "2", "router"):
        raise ValueError(f"--stage must be 1, 2 or router, got {script_args.stage}.")
    if script_args.stage == "router":
        if script_args.use_lora:
            raise ValueError("--stage router trains the router alone; drop --use_lora.")
        return ["router"]
    names = ["router", "expert_projectors"]
    if script_args.stage == "2" and not script_args.use_lora:
        names.append("llm")
    if script_args.train_generalist_projector:
        names.append("generalist_projector")
    return names


def apply_lora(model, script_args: ChimeraScriptArguments):
    """LoRA on the LLM's linear layers; the router, the expert projectors and (unless frozen) the generalist's
    projector stay fully trainable (`modules_to_save`). The config is TRL's (`get_peft_config`); the flags stay this
    script's, since the targets and the fully trained modules are fixed by the stage, not chosen by the user."""
    full = ["router"] + [f"expert_projectors.{d}" for d in model.domains]
    if script_args.train_generalist_projector:
        projector = model.model.family.projector()
        full.append(next(name for name, module in model.named_modules() if module is projector))
    config = get_peft_config(ModelConfig(
        use_peft=True, lora_r=script_args.lora_r, lora_alpha=script_args.lora_alpha,
        lora_dropout=script_args.lora_dropout, lora_target_modules=LLM_LORA_TARGETS, lora_modules_to_save=full,
        # No task type: a causal-LM one would wrap Chimera in `PeftModelForCausalLM`, whose forward is written for
        # text-only LLMs; the plain `PeftModel` passes every input (pixel values, expert labels) through unchanged.
        lora_task_type=None,
    ))
    return get_peft_model(model, config)


@torch.no_grad()
def routing_features(model, processor, data, labels: dict, cache_dir: str, device=None, batch_size: int = 16):
    """The router's input (Chimera §3.2: the generalist tower's CLS / token mean on the whole-image tile) and target
    for every labelled image of `data`, computed once into a `RouterFeatureCache` (on `device`, default: where the
    model is)."""
    collator = VisionLanguageSFTCollator(processor, labels)
    inner = model.model
    device = device if device is not None else next(model.parameters()).device
    cache = RouterFeatureCache(cache_dir)
    for start in range(0, len(data), batch_size):
        batch = collator([data[i] for i in range(start, min(start + batch_size, len(data)))])
        if "pixel_values" not in batch:
            continue  # text-only rows
        batch = to_device(batch, device)
        features = inner.router_inputs(batch["pixel_values"], input_ids=batch["input_ids"],
                                       **inner.family.image_inputs(batch))
        keep = batch["expert_labels"] != -100
        cache.append(features[keep], batch["expert_labels"][keep].tolist())
    if not cache._targets:
        raise ValueError("--stage router found no image with a domain label in the training data.")
    return cache.close()


def train_router(script_args, training_args, model, processor, data_args, tiny_args, summary):
    """The router alone on cached features. In stages 1 and 2 the router's only gradient is its cross-entropy on the
    frozen generalist tower's output, so this is the same objective, for many epochs at the cost of one pass of the
    vision tower (as Mixpert trains its router, Mixpert §3.3)."""
    domains = list(model.config.domains)
    files = training_files(data_args, training_args.output_dir, tiny_args)
    data = load_vl_dataset(files["train"], data_args.image_root, domains=domains + list(script_args.no_expert_domains),
                           allow_outside_root=data_args.allow_images_outside_root)
    data = sample_per_domain(data, script_args.router_samples_per_domain, training_args.seed)
    device = training_device(model, training_args)
    start = time.perf_counter()
    labels = make_domain_labels(domains, none_domains=script_args.no_expert_domains)
    cache = routing_features(model, processor, data, labels, training_args.output_dir, device)
    cache_seconds = time.perf_counter() - start
    trainer = train_router_on_features(model.model.router, cache, training_args)
    results = {"cached_rows": len(cache), "feature_cache_seconds": cache_seconds, "device": str(device)}
    finish_router(trainer, model, processor, training_args, {
        "script": "chimera", "stage": "router", "trainable": summary, "groups": ["router"], "results": results,
    }, model.model.router, cache)
    return trainer


def main(script_args, training_args, model_args, data_args, tiny_args: TinyArguments | None = None):
    tiny_args = tiny_args or TinyArguments()
    tiny_args.refuse_flags_of_other_models("chimera", "train.chimera")
    prepare_training_args(training_args)
    model, processor = load_model_and_processor(model_args, script_args, tiny_args)
    groups = stage_groups(script_args)
    if script_args.stage != "router":  # the router phase leaves the config as it is
        model.config.gscm_ratio = script_args.gscm_ratio if script_args.stage == "2" else 0.0
    summary = set_trainable(model, chimera_groups(model), groups)
    if script_args.stage == "router":
        return train_router(script_args, training_args, model, processor, data_args, tiny_args, summary)
    if script_args.use_lora:
        if script_args.stage != "2":
            raise ValueError("--use_lora applies to stage 2 (stage 1 does not train the LLM).")
        model = apply_lora(model, script_args)
        summary = trainable_summary(model)

    domains = list(model.config.domains) if not script_args.use_lora else list(model.base_model.model.config.domains)
    files = training_files(data_args, training_args.output_dir, tiny_args)
    known = domains + list(script_args.no_expert_domains)
    outside = data_args.allow_images_outside_root
    train_data = load_vl_dataset(files["train"], data_args.image_root, domains=known, allow_outside_root=outside)
    eval_data = load_vl_dataset(files["eval"], data_args.image_root, domains=known,
                                allow_outside_root=outside) if files["eval"] else None
    labels = make_domain_labels(domains, none_domains=script_args.no_expert_domains)
    collator = VisionLanguageSFTCollator(processor, labels, max_length=data_args.max_length)

    router = (model.base_model.model if script_args.use_lora else model).model.router
    lr_groups = [(router.parameters(), script_args.router_learning_rate)] if script_args.router_learning_rate else []
    trainer = GroupLearningRateTrainer(
        model=model, args=training_args, train_dataset=train_data,
        eval_dataset=eval_data if training_args.eval_strategy != "no" else None,
        data_collator=collator, processing_class=processor, lr_groups=lr_groups,
    )
    with fp32_master_weights(model, training_args) as upcast:
        trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    if script_args.use_lora:
        model = trainer.model.merge_and_unload()
    finish(trainer, model, processor, training_args, {
        "script": "chimera", "stage": script_args.stage, "gscm_ratio": model.config.gscm_ratio,
        "trainable": summary, "use_lora": script_args.use_lora,
        "groups": stage_groups(script_args) + (["llm (LoRA)"] if script_args.use_lora else []),
        "fp32_master_parameters": sum(p.numel() for p in upcast),
    })
    return trainer


def make_parser(prog: str | None = None):
    return TrlParser((ChimeraScriptArguments, TrainingArguments, ModelArguments, SFTDataArguments, TinyArguments),
                     prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
