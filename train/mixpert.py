"""Mixpert training (Mixpert §3.2-§3.3, §4.2): disentangled expert tuning, then router training.

Phase `experts`: for each domain `d` in turn, only expert `d` (its last `K` vision layers, final norm and projector)
trains, on domain `d`'s data alone, with every image routed to it; the LLM, the shared vision layers and the other
experts are frozen. Vision layers and projector get their own learning rates (paper: 2e-6 and 1e-5).

`--domains all-as-one` (Mixpert Table 7's baseline): one shared expert for every domain instead, the same trainable
set as one domain expert and no routing. The base model's own modules that a domain expert replaces (its last `K`
vision layers, final norm, and projector when `expert_projector=True`) train on every domain's rows together, and the
result is saved as the native base model in `--output_dir`: a plain VLM that `train.evaluate` scores as it scores the
joint model. Both sizes (the baseline's trainable parameters and one domain expert's) go to `run_summary.json`. A
Mixpert with LoRA experts (`expert_adapter="lora"`) is refused: its experts train low-rank updates only, so a baseline
tuning the full modules would not be Table 7's same-size comparison; upcycle with full experts for the baseline.

Phase `router`: the router (a 2-layer MLP on the pooled shared-layer features) is trained with cross-entropy on the
images' domains. The shared layers are frozen, so their pooled features are computed once and reused for every
epoch; only the MLP runs in the training loop.

Tiny, offline:

    python -m train.mixpert --config train/configs/tiny/mixpert_experts.yaml --output_dir runs/mixpert-experts
    python -m train.mixpert --config train/configs/tiny/mixpert_router.yaml --output_dir runs/mixpert-router \\
        --model_name_or_path runs/mixpert-experts

The all-as-one baseline, and the router data-size sweep of Mixpert Table 3 (`train.evaluate_router` documents it):

    python -m train.mixpert --config train/configs/tiny/mixpert_experts.yaml --domains all-as-one \\
        --output_dir runs/mixpert-all-as-one
    python -m train.evaluate --model_name_or_path runs/mixpert-all-as-one --dataset DATA --split test

Real run (paper hyper-parameters, 8 GPUs; see train/configs/real/):

    accelerate launch --config_file train/configs/accelerate/deepspeed_zero2.yaml -m train.mixpert \\
        --config train/configs/real/mixpert_llava_ov_7b_experts.yaml --output_dir runs/mixpert-7b-experts
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, TrainingArguments
from trl import TrlParser

from chimera_mixpert.data.collators import VisionLanguageSFTCollator
from chimera_mixpert.data.loading import load_vl_dataset
from chimera_mixpert.training import (
    GroupLearningRateTrainer,
    ModelArguments,
    RouterFeatureCache,
    SFTDataArguments,
    TRUST_REMOTE_CODE_HELP,
    TinyArguments,
    finish,
    finish_router,
    fp32_master_weights,
    gathered_state_dict,
    last_complete_checkpoint,
    load_model_to_train,
    mixpert_groups,
    prepare_training_args,
    push_output_dir,
    resume_checkpoint,
    sample_per_domain,
    save_atomically,
    save_run_summary,
    set_trainable,
    train_router_on_features,
    to_device,
    training_device,
    training_files,
)
from modeling_mixpert import versatile_modules


@dataclass
class MixpertScriptArguments:
    """Phase and its settings."""

    trust_remote_code: bool = field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})

    phase: str = field(default="experts", metadata={"help": "experts (disentangled expert tuning) or router."})
    domains: list[str] | None = field(default=None, metadata={
        "help": "experts phase: tune only these domains; `all-as-one`: Mixpert Table 7's baseline, the base model's "
                "own modules a domain expert replaces (last K layers, final norm, projector if expert_projector) "
                "tuned on every domain's data, saved as the native base model (full experts only, not "
                "expert_adapter='lora')."})
    projector_learning_rate: float = field(default=1e-5, metadata={"help": "experts phase: projector learning rate "
                                                                          "(paper 1e-5); vision layers use "
                                                                          "--learning_rate (paper 2e-6)."})
    router_samples_per_domain: int | None = field(
        default=None, metadata={"help": "router phase: train on at most this many data rows per domain, drawn at "
                                        "random with --seed (Mixpert §4.2: 200K per domain; default: every row). A "
                                        "domain with fewer rows keeps them all, with a warning; run_summary.json "
                                        "records the rows drawn per domain (router_rows_per_domain)."})


ALL_AS_ONE = "all-as-one"

logger = logging.getLogger(__name__)


def load_model_and_processor(model_args: ModelArguments, script_args: MixpertScriptArguments,
                             tiny_args: TinyArguments | None = None):
    # The processor is the base's native one: nothing from the folder runs unless --trust_remote_code says so.
    return load_model_to_train("mixpert", model_args, tiny_args or TinyArguments(), script_args.trust_remote_code)


def tune_experts(script_args, training_args, model, processor, data_args, files):
    """One `Trainer` run per domain, each in `output_dir/experts/<domain>`. With `--resume_from_checkpoint`, domains
    finished earlier are reloaded and the interrupted one continues from its last checkpoint."""
    domains = script_args.domains or list(model.domains)
    unknown = sorted(set(domains) - set(model.domains))
    if unknown:
        raise ValueError(f"--domains {unknown} are not experts of this model ({model.domains}).")
    data = load_vl_dataset(files["train"], data_args.image_root, domains=list(model.domains) + ["versatile"],
                           allow_outside_root=data_args.allow_images_outside_root)
    resume = _wants_resume(training_args)
    groups, results, trainer = mixpert_groups(model), {}, None
    for domain in domains:
        folder = os.path.join(training_args.output_dir, "experts", domain)
        done = os.path.join(folder, "expert_done.json")
        if resume and os.path.isfile(done):  # tuned before the interruption: its saved model holds the weights
            _load_weights(model, folder)
            results[domain] = {"resumed": "already tuned"}
            continue
        rows = data.filter(lambda row, d=domain: row["domain"] == d)
        if len(rows) == 0:
            raise ValueError(f"No training rows with domain {domain!r}: expert tuning needs that domain's data.")
        summary = set_trainable(model, groups, [f"expert:{domain}"])
        expert = model.model.vision_experts[domain]
        projector = list(expert.projector.parameters()) if expert.projector is not None else []
        args = prepare_training_args(TrainingArguments(**{**training_args.to_dict(), "output_dir": folder}))
        collator = VisionLanguageSFTCollator(processor, force_expert_label=model.domains.index(domain) + 1,
                                             max_length=data_args.max_length)
        # Two learning rates (Mixpert §4.2): the expert's projector at --projector_learning_rate, its layers at
        # --learning_rate.
        trainer = GroupLearningRateTrainer(
            model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=processor,
            lr_groups=[(projector, script_args.projector_learning_rate)],
        )
        with fp32_master_weights(model, args) as upcast:
            trainer.train(resume_from_checkpoint=last_complete_checkpoint(folder) if resume else None)
        state_dict = gathered_state_dict(trainer, model)  # every process: a collective under ZeRO-3 / FSDP
        if trainer.is_world_process_zero():
            save_atomically(folder, model, state_dict=state_dict)
            with open(done, "w") as f:
                f.write("{}")
        runtime = next((m["train_runtime"] for m in reversed(trainer.state.log_history) if "train_runtime" in m), None)
        results[domain] = {"trainable": summary, "rows": len(rows), "steps": trainer.state.global_step,
                           "fp32_master_parameters": sum(p.numel() for p in upcast),
                           "seconds_per_step": runtime / trainer.state.global_step if runtime else None}
    return trainer, results


def all_as_one_trainable(model) -> tuple[dict, list]:
    """Unfreeze what the all-as-one baseline tunes: the versatile modules a domain expert replaces (the last `K` vision
    layers, final norm, and the projector only with `expert_projector=True`: otherwise experts share the base projector
    and never tune it). Returns the run's size summary (`trainable_summary` of the baseline, plus
    `domain_expert_trainable`: what one domain expert's phase trains) and the projector's parameters (their own
    learning rate; empty without expert projectors)."""
    config = model.config
    layers, norm, projector = versatile_modules(model.model.family, config)
    own_projector = [projector] if config.expert_projector else []
    groups = {**mixpert_groups(model), ALL_AS_ONE: [*layers, *([norm] if norm is not None else []), *own_projector]}
    expert = set_trainable(model, groups, [f"expert:{model.domains[0]}"])["trainable"]
    summary = set_trainable(model, groups, [ALL_AS_ONE])
    if config.expert_adapter != "full":
        # A same-size LoRA baseline would need a LoRA on the base merged into the saved native model; not done here.
        raise ValueError(
            f"--domains {ALL_AS_ONE} needs full experts, but this Mixpert has "
            f"expert_adapter={config.expert_adapter!r}: one domain expert trains {expert} parameters (low-rank "
            f"updates), the baseline would tune the full versatile modules ({summary['trainable']}), which is not "
            "Mixpert Table 7's same-size comparison. Upcycle the base again with full experts (train.assemble "
            "mixpert --expert_adapter full, the default) and run the baseline from that model.")
    if summary["trainable"] != expert:  # a family whose expert holds more / less than the versatile modules
        raise ValueError(f"--domains {ALL_AS_ONE} would train {summary['trainable']} parameters but one domain expert "
                         f"trains {expert}: the baseline is not the size of one expert for this model.")
    logger.info("all-as-one: %d trainable parameters; one domain expert: %d.", summary["trainable"], expert)
    return {**summary, "domain_expert_trainable": expert}, [p for m in own_projector for p in m.parameters()]


def tune_all_as_one(script_args, training_args, model, processor, data_args, files):
    """Mixpert Table 7's all-as-one baseline: the versatile modules one domain expert replaces (`all_as_one_trainable`:
    the same trainable set and size) tuned on the rows of every expert domain together, every image through them,
    with the two learning rates of the expert phase. Returns the trainer and the results; `finish_native` saves the
    tuned base model."""
    summary, projector = all_as_one_trainable(model)  # refuses LoRA experts before any data is read or trained
    data = load_vl_dataset(files["train"], data_args.image_root, domains=list(model.domains) + ["versatile"],
                           allow_outside_root=data_args.allow_images_outside_root)
    rows = data.filter(lambda row: row["domain"] in model.domains)  # the expert data; "versatile" rows tune no expert
    if len(rows) == 0:
        raise ValueError(f"No training rows with a domain of this model ({model.domains}): --domains {ALL_AS_ONE} "
                         "tunes on every expert domain's data.")
    args = prepare_training_args(training_args)
    collator = VisionLanguageSFTCollator(processor, force_expert_label=0, max_length=data_args.max_length)
    trainer = GroupLearningRateTrainer(
        model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=processor,
        lr_groups=[(projector, script_args.projector_learning_rate)],
    )
    with fp32_master_weights(model, args) as upcast:
        trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    per_domain = {d: rows["domain"].count(d) for d in model.domains}
    return trainer, {ALL_AS_ONE: {"trainable": summary, "trainable_parameters": summary["trainable"],
                                  "domain_expert_trainable_parameters": summary["domain_expert_trainable"],
                                  "rows": len(rows), "rows_per_domain": per_domain,
                                  "steps": trainer.state.global_step,
                                  "fp32_master_parameters": sum(p.numel() for p in upcast)}}


def native_model(model):
    """The native `...ForConditionalGeneration` a Mixpert was upcycled from, holding the Mixpert's own modules (the
    base model, versatile expert included, and the LM head): what `--domains all-as-one` saves."""
    with torch.device("meta"):  # the native model's modules are replaced by the Mixpert's: nothing to allocate
        native = AutoModelForImageTextToText.from_config(model.config.base_config)
    native.model, native.lm_head = model.model.native, model.lm_head
    native.generation_config = model.generation_config
    left = [name for name, p in native.state_dict().items() if p.is_meta]
    if left:
        raise ValueError(f"The native model has weights the Mixpert does not hold: {left[:5]}.")
    return native


def finish_native(trainer, model, processor, training_args, summary: dict) -> dict:
    """Save the tuned base model as a native VLM (+ the processor) in `output_dir`, the run summary, push if asked.
    Under DeepSpeed / FSDP the gathered Mixpert state dict is renamed to the native model's names."""
    native = native_model(model)
    state = gathered_state_dict(trainer, model)  # every process: a collective under ZeRO-3 / FSDP
    if state is not None:
        prefix = f"model.{type(model.model).native_attr}."
        state = {("model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()
                 if k.startswith((prefix, "lm_head."))}
    steps = trainer.state.global_step
    summary = {**summary, "global_step": steps, "saved_as": type(native).__name__,
               "device": str(next(model.parameters()).device)}
    if trainer.is_world_process_zero():
        save_atomically(training_args.output_dir, native, processor, state_dict=state)
        save_run_summary(training_args.output_dir, summary)
        if training_args.push_to_hub:
            push_output_dir(training_args, "mixpert all-as-one finished")
    return summary


def _wants_resume(training_args) -> bool:
    value = training_args.resume_from_checkpoint
    return value is not None and str(value).lower() not in ("", "false", "none")


def _load_weights(model, folder):
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if [k for k in missing if k not in tied] or unexpected:
        raise ValueError(f"{folder} does not hold this model's weights "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}).")


@torch.no_grad()
def pooled_shared_features(model, processor, data, cache_dir: str, device=None, batch_size: int = 8):
    """Router inputs (pooled shared-layer features, per image or per tile as the model routes) and domain targets,
    computed once into a `RouterFeatureCache` (on `device`, default: where the model is): the shared layers are frozen
    during router training."""
    collator = VisionLanguageSFTCollator(processor)
    inner = model.model
    device = device if device is not None else next(model.parameters()).device
    cache = RouterFeatureCache(cache_dir)
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        batch = to_device(collator(rows), device)
        pooled, routed_image = inner.router_inputs(batch["pixel_values"], input_ids=batch["input_ids"],
                                                   **inner.family.image_inputs(batch))
        image_domains = [model.domains.index(r["domain"]) for r in rows for _ in r["images"]]
        row_domains = [image_domains[i] for i in routed_image.tolist()]
        cache.append(pooled, row_domains)
    return cache.close()


def train_router(script_args, training_args, model, processor, data_args, files):
    data = load_vl_dataset(files["train"], data_args.image_root, domains=list(model.domains),
                           allow_outside_root=data_args.allow_images_outside_root)
    data = sample_per_domain(data, script_args.router_samples_per_domain, training_args.seed)
    rows_per_domain = {d: data["domain"].count(d) for d in sorted(set(data["domain"]))}
    device = training_device(model, training_args)
    start = time.perf_counter()
    cache = pooled_shared_features(model, processor, data, training_args.output_dir, device)
    cache_seconds = time.perf_counter() - start
    summary = set_trainable(model, mixpert_groups(model), ["router"])
    trainer = train_router_on_features(model.model.vision_router, cache, training_args)
    results = {"trainable": summary, "cached_rows": len(cache), "feature_cache_seconds": cache_seconds,
               "device": str(device), "router_rows_per_domain": rows_per_domain,
               "router_samples_per_domain": script_args.router_samples_per_domain}
    summary = finish_router(trainer, model, processor, training_args, {"script": "mixpert", "phase": "router",
                            "results": results}, model.model.vision_router, cache)
    return trainer, summary["results"]


def main(script_args, training_args, model_args, data_args, tiny_args: TinyArguments | None = None):
    if script_args.phase not in ("experts", "router"):
        raise ValueError(f"--phase must be 'experts' or 'router', got {script_args.phase!r}.")
    all_as_one = ALL_AS_ONE in (script_args.domains or [])
    if all_as_one and (len(script_args.domains) > 1 or script_args.phase != "experts"):
        raise ValueError(f"--domains {ALL_AS_ONE} (Mixpert Table 7's baseline: one shared expert tuned on every "
                         f"domain's data) stands alone and belongs to --phase experts; got --phase "
                         f"{script_args.phase} --domains {' '.join(script_args.domains)}.")
    tiny_args = tiny_args or TinyArguments()
    tiny_args.refuse_flags_of_other_models("mixpert", "train.mixpert")
    prepare_training_args(training_args)
    model, processor = load_model_and_processor(model_args, script_args, tiny_args)
    files = training_files(data_args, training_args.output_dir, tiny_args)
    if script_args.phase == "router":
        _, results = train_router(script_args, training_args, model, processor, data_args, files)
        return model, results
    if all_as_one:
        trainer, results = tune_all_as_one(script_args, training_args, model, processor, data_args, files)
        finish_native(trainer, model, processor, training_args,
                      {"script": "mixpert", "phase": script_args.phase, "domains": ALL_AS_ONE, "results": results})
        return model, results
    trainer, results = tune_experts(script_args, training_args, model, processor, data_args, files)
    finish(trainer, model, processor, training_args,
           {"script": "mixpert", "phase": script_args.phase, "results": results})
    return model, results


def make_parser(prog: str | None = None):
    parser = TrlParser((MixpertScriptArguments, TrainingArguments, ModelArguments, SFTDataArguments, TinyArguments),
                       prog=prog)
    # Paper defaults (Mixpert §4.2) for real runs; tiny configs override them.
    parser.set_defaults_with_config(learning_rate=2e-6, num_train_epochs=1, lr_scheduler_type="cosine",
                                    warmup_ratio=0.03, adam_beta1=0.9, adam_beta2=0.98, weight_decay=0.01)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
