"""The mini-lab: the whole Chimera + Mixpert pipeline on synthetic six-domain data, on a CPU, in minutes, offline.

    python -m train.quickstart --output_dir runs/quickstart             # one seed (see README for the time)
    python -m train.quickstart --output_dir runs/seeds --seeds 0,1,2    # the claims judged over three seeds
    python -m train.quickstart --output_dir runs/toy --scale toy        # a smoke run of every stage
    python -m train.quickstart --output_dir runs/seeds --seeds 0,1,2 --kernels reproducible  # kernels pinned

What it does, through the same classes and scripts as full-size runs (`train.sft`, `train.chimera`, `train.dpo`,
`train.mixpert`, `train.evaluate`):

1. writes the synthetic data (chart, table, math, document, OCR, general; `chimera_mixpert.data.synthetic`) as local
   files;
2. trains a small native InternVL jointly on all domains: the stand-in for a pretrained generalist ("joint");
3. trains one higher-resolution vision encoder per Chimera expert domain (chart, table, math, document), each as
   the vision tower of a specialist that shares the joint model's frozen LLM;
4. Chimera: assembles joint + experts, stage 1 (router + projectors), the router alone on cached features, stage 2
   with GSCM and stage 2 without it, then DPO on preference pairs; the controls: the joint model continued on the
   same data, steps and learning rates without experts, and the same DPO run with TRL's SFT loss on the chosen
   answers;
5. Mixpert: upcycles the joint model (K = 2 of its 4 vision layers), tunes each domain expert on its domain, trains
   the router on cached shared features; the control: the all-as-one model (Mixpert Table 7), one expert-sized set
   of the same modules tuned on every domain as long as all the experts together;
6. evaluates everything with each domain's metric and writes `report.json`, `report.md` and plots.

The claims (`CLAIMS`), each one number against a target: Chimera's router accuracy (paper: 95.4%); Chimera above its
control and not below its generalist on the expert domains; GSCM raising the attention the LLM pays to expert tokens
(Chimera §4); Mixpert above its control on average and not below it on any domain, and its router's accuracy;
score-difference routing at least as good as direct routing on ambiguous images (Mixpert §3.3); DPO above its
control on held-out preference pairs. With `--seeds`, each claim is judged on the mean over seeds with its standard
deviation. The report states for each claim whether it held; nothing is tuned to make it hold.

Numbers and machines: with `--kernels native` (the default) PyTorch, MKL and oneDNN pick the fastest code for this
CPU and the numbers differ between machines (the README gives the spread measured); `--kernels reproducible` pins
one thread and baseline x86-64 kernels (`REPRODUCIBLE_KERNELS`), so that x86-64 machines with different CPUs and the
same software versions compute the same bits (the README gives the machines and the emulated CPU checked), and
runs seeds `--workers` at a time. Each seed's report records the kernels it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from chimera_mixpert.data.export import export_preference_jsonl, export_sft_jsonl
from chimera_mixpert.data.synthetic import (
    DOMAINS,
    IMAGE_KINDS,
    KIND_QUESTIONS,
    build_dataset,
    make_preference_pairs,
    save_dataset,
)

# The stages import transformers, the model classes and `train.evaluate` when they run: at the top they would make
# `python -m train.quickstart --help` (and importing this module) about 4 s slower.

EXPERT_DOMAINS = ("chart", "table", "math", "document")  # Chimera's experts; OCR and general use none
# The synthetic table questions ask for a cell / a count, so tables are scored by exact match (TEDS scores the
# table-to-HTML task, which the lab does not train); the other domains use their standard metric.
LAB_METRICS = {"table": "exact_match"}
# Question kinds the lab trains and tests: the ones a tiny VLM trained from scratch for a few CPU minutes can learn to
# read off the image (found by measuring; reading exact values, cells or titles stays at the answer prior at this
# scale, which would leave no room for any mechanism to show).
LAB_QUESTION_KINDS = {
    "chart": ["type", "count"], "table": ["rows", "cols"],
    "math": ["polygon_sides", "slope_sign", "parabola_direction"], "document": ["paragraphs", "title_words"],
    "ocr": ["transcribe"], "general": ["count_all", "color"],
}


@dataclass
class LabConfig:
    """Sizes and step counts of the lab (`--scale`).

    Choices made so the mechanisms have room to show on a CPU (see README, "The mini-lab"): the generalist sees 48
    px images as one tile (9 LLM tokens each), the experts 96 px (36 tokens each), so experts bring more visual
    detail, as the real ones do; each specialist trains 600 steps (with 80, the specialists scored at or below the
    generalist on their own domain in 11 of 12 domain-seed pairs of seeds 0-2, so the experts carried nothing the
    generalist lacked; with 300-600, the chart and table specialists beat it, measured on seeds 0 and 1); the joint
    model first learns what kind of image it sees (a caption stage, as VLM recipes start with captions) and keeps a
    share of such questions, so its vision features know image types; only visually learnable question kinds are
    used (`LAB_QUESTION_KINDS`); Chimera's router reads the mean of the generalist's features (the stand-in's CLS
    output is never trained, unlike a CLIP-pretrained InternViT's); Chimera's stage 1 (its alignment of the new
    expert projectors, Chimera §3.4) trains 600 steps: with 120, Chimera scored below its generalist on the expert
    domains on every seed of 2-4, and on seed 2 with the LLM untouched and every image sent to its expert, 120 steps
    gave chart / table / math / document 0.700 / 0.385 / 0.370 / 0.410 and 600 steps 0.725 / 0.535 / 0.555 / 0.410
    (generalist 0.665 / 0.470 / 0.455 / 0.410).
    """

    image_size: int = 48
    patch_size: int = 8
    expert_image_size: int = 96
    expert_patch_size: int = 16
    hidden_size: int = 128
    vision_hidden_size: int = 96
    num_vision_layers: int = 4
    num_text_layers: int = 2
    vocab_size: int = 400
    train_per_domain: int = 500
    test_per_domain: int = 200
    mixed: int = 90
    kind_questions: float = 0.2
    batch_size: int = 16
    caption_steps: int = 300
    joint_steps: int = 700
    joint_lr: float = 2e-3
    specialist_steps: int = 600
    specialist_lr: float = 3e-3
    router_feature: str = "mean"
    stage1_steps: int = 600
    stage1_lr: float = 2e-3
    router_lr: float = 2e-2
    chimera_router_epochs: int = 150
    chimera_router_lr: float = 0.1
    stage2_steps: int = 120
    stage2_lr: float = 1e-3
    gscm_ratio: float = 0.75
    dpo_steps: int = 30
    dpo_lr: float = 1e-4
    mixpert_expert_steps: int = 60
    mixpert_expert_lr: float = 5e-4
    router_epochs: int = 40
    kernels: str = "native"
    seed: int = 0


SCALES = {
    "lab": LabConfig(),
    "toy": LabConfig(train_per_domain=8, test_per_domain=3, mixed=6, batch_size=4, caption_steps=2, joint_steps=4,
                     specialist_steps=2,
                     stage1_steps=2, stage2_steps=2, dpo_steps=2, mixpert_expert_steps=2, router_epochs=2,
                     chimera_router_epochs=2),
}


def make_parser(prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/quickstart")
    parser.add_argument("--scale", choices=sorted(SCALES), default="lab")
    parser.add_argument("--kernels", choices=("native", "reproducible"), default="native",
                        help="CPU kernels: 'native' (default) lets PyTorch, MKL and oneDNN pick this CPU's fastest, "
                             "so the numbers differ between machines by the spread the README measures; "
                             "'reproducible' pins one thread and baseline x86-64 kernels (REPRODUCIBLE_KERNELS) so "
                             "that x86-64 CPUs compute the same bits with the same software versions (measured: "
                             "1.7x the time for one seed, 1.3x for three seeds two at a time)")
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="with --kernels reproducible and --seeds: how many seeds run at once, one process and one "
                             "thread each (default: 2, or 1 on a one-core machine); the numbers do not depend on it")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--seed", type=int, default=None, help="override the lab's seed (one run in --output_dir)")
    group.add_argument("--seeds", type=_seed_list, default=None, metavar="0,1,2",
                       help="run the lab once per seed (in --output_dir/seed-<n>) and judge each claim on the mean "
                            "over seeds with its standard deviation (report.md, report.json, claims.png)")
    return parser


# CPU kernels (`--kernels`). Measured here on the lab's joint stage (seed 5, weights hashed): each of the thread count
# (1 vs 2), ATen's CPU capability (AVX2 vs default), MKL's code branch (auto vs COMPATIBLE) and oneDNN's ISA (AVX2 vs
# SSE4.1) changed the trained weights' bits, so machines with different CPUs train different models from one seed.
# "reproducible" pins each to a path every x86-64 CPU can run: one thread (reductions split the same way), ATen's
# baseline kernels, MKL's COMPATIBLE branch (Intel's conditional numerical reproducibility: the branch meant to give
# the same results on Intel and non-Intel CPUs) and oneDNN's SSE4.1 code. They are read when the libraries start, so
# each seed then runs in a fresh process (`run_labs`). glibc's libm also picks code by CPU, and is not pinned:
# `tests/test_quickstart.py` masks the CPU features glibc sees and checks the bits do not change.
REPRODUCIBLE_KERNELS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
                        "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def kernel_record() -> dict:
    """What this process computes with: recorded in each seed's report.json."""
    import platform  # noqa: PLC0415 (only here)

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            **{k: os.environ.get(k) for k in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA")},
            "mkl": torch.backends.mkl.is_available(), "torch": torch.__version__, "machine": platform.machine(),
            "libc": " ".join(platform.libc_ver()), "cpu": _cpu_name()}


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def check_reproducible_kernels_apply():
    """The pins are x86-64's and MKL's: elsewhere they would pin nothing while the report said they did."""
    import platform  # noqa: PLC0415 (only here)

    if platform.machine().lower() not in {"x86_64", "amd64"}:
        raise SystemExit(f"--kernels reproducible pins x86-64 kernels; this machine is {platform.machine()}: use "
                         "--kernels native")
    if not torch.backends.mkl.is_available():
        raise SystemExit("--kernels reproducible pins MKL's code branch; this torch build has no MKL: install the "
                         "PyPI torch wheel, or use --kernels native")


def _run_lab_pinned(folder: str, config: LabConfig) -> dict:
    torch.set_num_threads(1)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":  # the pinned environment did not reach this process
        raise RuntimeError(f"--kernels reproducible: this process computes with {capability} kernels, not the "
                           "pinned baseline (ATEN_CPU_CAPABILITY=default)")
    return run_lab(folder, config)


def run_labs(jobs: list[tuple[str, LabConfig]], workers: int) -> list[dict]:
    """`run_lab(folder, config)` for each job: here, one after the other, for native kernels; for reproducible ones,
    each in a fresh process with the kernels pinned (`REPRODUCIBLE_KERNELS`), up to `workers` at once."""
    if all(config.kernels == "native" for _, config in jobs):
        return [run_lab(folder, config) for folder, config in jobs]
    import multiprocessing  # noqa: PLC0415 (only here)

    saved = {k: os.environ.get(k) for k in REPRODUCIBLE_KERNELS}
    os.environ.update(REPRODUCIBLE_KERNELS)  # spawned processes start with this environment
    try:
        # maxtasksperchild=1: a process per seed (a pool would reuse one for the next seed); leaving the `with` on an
        # error terminates the other seeds at once instead of training them to the end first.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool:
            pending = [pool.apply_async(_run_lab_pinned, job) for job in jobs]
            return [result.get() for result in pending]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--workers takes a positive integer; got {text!r}")
    return int(text)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {text!r}")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs at least two different seeds (one seed: --seed); got {text!r}")
    return seeds


class Lab:
    """Runs the stages, timing each, under `output_dir`."""

    def __init__(self, output_dir: str, config: LabConfig):
        self.dir, self.cfg = output_dir, config
        self.timings, self.report = {}, {"config": asdict(config)}
        os.makedirs(output_dir, exist_ok=True)

    def path(self, *parts) -> str:
        return os.path.join(self.dir, *parts)

    def stage(self, name):
        lab = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()
                print(f"[quickstart] seed {lab.cfg.seed}: {name} ...", flush=True)

            def __exit__(self, *exc):
                lab.timings[name] = round(time.perf_counter() - self.start, 1)
                print(f"[quickstart] seed {lab.cfg.seed}: {name}: {lab.timings[name]} s", flush=True)

        return _Timer()

    def training_args(self, steps: int, lr: float, batch: int | None = None, extra=()) -> list[str]:
        return ["--max_steps", str(max(steps, 1)), "--per_device_train_batch_size", str(batch or self.cfg.batch_size),
                "--learning_rate", str(lr), "--lr_scheduler_type", "cosine", "--warmup_steps", str(min(10, steps // 5)),
                "--logging_steps", str(max(steps // 4, 1)), "--save_strategy", "no", "--report_to", "none",
                "--use_cpu", "true", "--seed", str(self.cfg.seed), "--weight_decay", "0.0",
                "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra]


def run(module: str, args: list[str], **kwargs):
    script = __import__(f"train.{module}", fromlist=["main", "make_parser"])
    return script.main(*script.make_parser().parse_args_and_config(args), **kwargs)


# ------------------------------------------------------------------------------------------------------- stages


def write_data(lab: Lab):
    cfg = lab.cfg
    data = build_dataset({"train": cfg.train_per_domain, "validation": 0, "test": cfg.test_per_domain},
                         mixed=cfg.mixed, seed=cfg.seed, image_size=cfg.expert_image_size,
                         kind_questions=cfg.kind_questions, question_kinds=LAB_QUESTION_KINDS)
    save_dataset(data, lab.path("data"))
    export_sft_jsonl(data["train"], lab.path("data"), "train")
    # The caption stage: the same training images, each asked what kind of image it is.
    captions = ({"image": r["image"], "question": KIND_QUESTIONS[i % len(KIND_QUESTIONS)],
                 "answer": IMAGE_KINDS[r["domain"]], "domain": r["domain"]} for i, r in enumerate(data["train"]))
    export_sft_jsonl(captions, lab.path("data"), "captions")

    def pairs(split, seed):
        for pair, row in zip(make_preference_pairs(data[split], seed=seed), data[split]):
            yield {"image": row["image"], "question": row["question"], "domain": row["domain"],
                   "chosen": _text(pair["chosen"]), "rejected": _text(pair["rejected"])}

    export_preference_jsonl(pairs("train", cfg.seed), lab.path("data"), "preference-train")
    lab.test_pairs = list(pairs("test", cfg.seed + 1))
    return data


def _text(messages) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else "".join(i.get("text") or "" for i in content)


def train_joint(lab: Lab, data):
    """The generalist stand-in: a native InternVL trained jointly on every domain (train.sft)."""
    from chimera_mixpert.tiny import build_generalist, build_processor, build_tokenizer  # noqa: PLC0415 (transformers: --help stays fast)

    cfg = lab.cfg
    corpus = [f"{r['question']} {r['answer']}" for r in data["train"]]
    tokenizer = build_tokenizer("internvl", vocab_size=cfg.vocab_size, corpus=corpus)
    model = build_generalist("internvl", tokenizer, seed=cfg.seed, image_size=cfg.image_size, patch_size=cfg.patch_size,
                             hidden_size=cfg.hidden_size, vision_hidden_size=cfg.vision_hidden_size,
                             num_text_layers=cfg.num_text_layers, num_vision_layers=cfg.num_vision_layers)
    processor = build_processor("internvl", tokenizer, image_size=cfg.image_size, patch_size=cfg.patch_size,
                                max_patches=1)
    run("sft", ["--output_dir", lab.path("joint-captions"), "--train_file", lab.path("data", "captions.jsonl"),
                *lab.training_args(cfg.caption_steps, cfg.joint_lr)], model=model, processor=processor)
    run("sft", ["--output_dir", lab.path("joint"), "--train_file", lab.path("data", "train.jsonl"),
                *lab.training_args(cfg.joint_steps, cfg.joint_lr)], model=model, processor=processor)
    return tokenizer


def train_specialists(lab: Lab, tokenizer):
    """One higher-resolution InternViT per expert domain, trained as the vision tower (+ projector) of a specialist
    whose LLM is the joint model's, frozen. Returns `{domain: vision tower}`."""
    from transformers import AutoModelForImageTextToText  # noqa: PLC0415 (transformers: --help stays fast)

    from chimera_mixpert.tiny import build_generalist, build_processor  # noqa: PLC0415 (transformers: --help stays fast)

    cfg = lab.cfg
    joint = AutoModelForImageTextToText.from_pretrained(lab.path("joint"))
    towers = {}
    for i, domain in enumerate(EXPERT_DOMAINS):
        specialist = build_generalist("internvl", tokenizer, seed=cfg.seed + 10 + i, image_size=cfg.expert_image_size,
                                      patch_size=cfg.expert_patch_size, hidden_size=cfg.hidden_size,
                                      vision_hidden_size=cfg.vision_hidden_size, num_text_layers=cfg.num_text_layers,
                                      num_vision_layers=cfg.num_vision_layers)
        specialist.model.language_model.load_state_dict(joint.model.language_model.state_dict())
        specialist.lm_head.load_state_dict(joint.lm_head.state_dict())
        processor = build_processor("internvl", tokenizer, image_size=cfg.expert_image_size,
                                    patch_size=cfg.expert_patch_size)
        run("sft", ["--output_dir", lab.path("specialists", domain), "--train_file", lab.path("data", "train.jsonl"),
                    "--domains", domain, "--train_groups", "vision", "projector",
                    *lab.training_args(cfg.specialist_steps, cfg.specialist_lr)], model=specialist, processor=processor)
        towers[domain] = specialist.model.vision_tower
    return towers


def assemble_chimera(lab: Lab, towers):
    from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: PLC0415 (transformers: --help stays fast)

    from chimera_mixpert.tiny import build_processor  # noqa: PLC0415 (transformers: --help stays fast)
    from modeling_chimera import ChimeraForConditionalGeneration  # noqa: PLC0415 (transformers: --help stays fast)
    from processing_chimera import ChimeraProcessor  # noqa: PLC0415 (transformers: --help stays fast)

    cfg = lab.cfg
    joint = AutoModelForImageTextToText.from_pretrained(lab.path("joint"))
    joint_processor = AutoProcessor.from_pretrained(lab.path("joint"))
    torch.manual_seed(cfg.seed)
    model = ChimeraForConditionalGeneration.from_generalist(joint, towers, router_feature=cfg.router_feature,
                                                            image_end_token_id=joint_processor.end_image_token_id)
    expert_processor = build_processor("internvl", joint_processor.tokenizer, image_size=cfg.expert_image_size,
                                       patch_size=cfg.expert_patch_size).image_processor
    processor = ChimeraProcessor.from_generalist(joint_processor, {d: expert_processor for d in towers})
    model.save_pretrained(lab.path("chimera-assembled"))
    processor.save_pretrained(lab.path("chimera-assembled"))


def train_chimera(lab: Lab):
    cfg = lab.cfg
    common = ["--train_file", lab.path("data", "train.jsonl"), "--no_expert_domains", "general", "ocr"]
    run("chimera", ["--stage", "1", "--model_name_or_path", lab.path("chimera-assembled"), "--output_dir",
                    lab.path("chimera-stage1"), "--router_learning_rate", str(cfg.router_lr), *common,
                    *lab.training_args(cfg.stage1_steps, cfg.stage1_lr)])
    # The router alone on cached features (same objective as its part of stage 1, many more epochs).
    run("chimera", ["--stage", "router", "--model_name_or_path", lab.path("chimera-stage1"),
                    "--output_dir", lab.path("chimera-router"), *common,
                    "--num_train_epochs", str(cfg.chimera_router_epochs), "--per_device_train_batch_size", "256",
                    "--learning_rate", str(cfg.chimera_router_lr), "--lr_scheduler_type", "cosine",
                    "--weight_decay", "0.0", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
                    "--logging_steps", "200", "--disable_tqdm", "true", "--seed", str(cfg.seed)])
    for name, ratio in (("chimera-stage2", cfg.gscm_ratio), ("chimera-stage2-no-gscm", 0.0)):
        run("chimera", ["--stage", "2", "--gscm_ratio", str(ratio), "--model_name_or_path", lab.path("chimera-router"),
                        "--output_dir", lab.path(name), *common, *lab.training_args(cfg.stage2_steps, cfg.stage2_lr)])


def train_generalist_control(lab: Lab):
    """Chimera's control: the joint model continued on the same data, steps and learning rates, training what
    Chimera's stages train of the generalist (its projector in stage 1, projector + LLM in stage 2; the router stage
    trains neither). Chimera vs this model isolates the experts from the extra fine-tuning."""
    cfg = lab.cfg
    data = ["--train_file", lab.path("data", "train.jsonl")]
    run("sft", ["--model_name_or_path", lab.path("joint"), "--output_dir", lab.path("generalist-control-stage1"),
                *data, "--train_groups", "projector", *lab.training_args(cfg.stage1_steps, cfg.stage1_lr)])
    run("sft", ["--model_name_or_path", lab.path("generalist-control-stage1"), "--output_dir",
                lab.path("generalist-control"), *data, "--train_groups", "projector", "llm",
                *lab.training_args(cfg.stage2_steps, cfg.stage2_lr)])


def train_dpo(lab: Lab):
    """DPO (Chimera's last stage) and its control: the same trainer, pairs, steps and learning rate with TRL's
    `loss_type=sft` (the chosen answers' negative log-likelihood only), so DPO vs control isolates the rejected
    answers' contribution."""
    for name, loss in (("chimera-dpo", "sigmoid"), ("chimera-sft-chosen", "sft")):
        run("dpo", ["--model_name_or_path", lab.path("chimera-stage2"), "--output_dir", lab.path(name),
                    "--train_file", lab.path("data", "preference-train.jsonl"), "--beta", "0.1", "--loss_type", loss,
                    "--gradient_checkpointing", "false",
                    *lab.training_args(lab.cfg.dpo_steps, lab.cfg.dpo_lr, batch=max(lab.cfg.batch_size // 2, 2))])


def train_mixpert(lab: Lab):
    from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: PLC0415 (transformers: --help stays fast)

    from modeling_mixpert import MixpertForConditionalGeneration  # noqa: PLC0415 (transformers: --help stays fast)

    cfg = lab.cfg
    joint = AutoModelForImageTextToText.from_pretrained(lab.path("joint"))
    model = MixpertForConditionalGeneration.from_base(joint, domains=list(DOMAINS), num_expert_layers=2,
                                                      routing_strategy="score_difference", routing_threshold=0.6)
    model.save_pretrained(lab.path("mixpert-upcycled"))
    AutoProcessor.from_pretrained(lab.path("joint")).save_pretrained(lab.path("mixpert-upcycled"))
    run("mixpert", ["--phase", "experts", "--model_name_or_path", lab.path("mixpert-upcycled"),
                    "--output_dir", lab.path("mixpert-experts"), "--train_file", lab.path("data", "train.jsonl"),
                    "--projector_learning_rate", str(cfg.mixpert_expert_lr),
                    *lab.training_args(cfg.mixpert_expert_steps, cfg.mixpert_expert_lr)])
    # The control (Mixpert Table 7's all-as-one baseline): one expert-sized set of the same modules tuned on every
    # domain for as many steps as all the domain experts together, so each domain's data is seen as often.
    run("mixpert", ["--phase", "experts", "--domains", "all-as-one", "--model_name_or_path",
                    lab.path("mixpert-upcycled"), "--output_dir", lab.path("mixpert-control"),
                    "--train_file", lab.path("data", "train.jsonl"),
                    "--projector_learning_rate", str(cfg.mixpert_expert_lr),
                    *lab.training_args(cfg.mixpert_expert_steps * len(DOMAINS), cfg.mixpert_expert_lr)])
    run("mixpert", ["--phase", "router", "--model_name_or_path", lab.path("mixpert-experts"),
                    "--output_dir", lab.path("mixpert"), "--train_file", lab.path("data", "train.jsonl"),
                    "--num_train_epochs", str(cfg.router_epochs), "--per_device_train_batch_size", "64",
                    "--learning_rate", "3e-3", "--lr_scheduler_type", "cosine", "--save_strategy", "no",
                    "--report_to", "none", "--use_cpu", "true", "--logging_steps", "20", "--disable_tqdm", "true",
                    "--seed", str(cfg.seed)])


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate_all(lab: Lab, data):
    from train.evaluate import evaluate, load_model, plot_confusion, plot_per_domain, write_report  # noqa: PLC0415 (transformers: --help stays fast)

    test, mixed = list(data["test"]), list(data["mixed"])
    reports = {}

    def run_eval(name, folder, rows, split="test", **kwargs):
        kind, model, processor = load_model(lab.path(folder))
        report = evaluate(model, processor, rows, kind, batch_size=32, max_new_tokens=8, metric_overrides=LAB_METRICS,
                          dataset_name="synthetic", split=split, progress=False, **kwargs)
        write_report(report, lab.path("eval", name), title=name)
        reports[name] = report
        return kind, model, processor, report

    run_eval("generalist", "joint", test)
    run_eval("generalist-control", "generalist-control", test)
    run_eval("chimera", "chimera-stage2", test)
    run_eval("chimera-no-gscm", "chimera-stage2-no-gscm", test)
    run_eval("chimera-oracle", "chimera-stage2", test, oracle=True)
    _, mixpert, _, _ = run_eval("mixpert", "mixpert", test)
    run_eval("mixpert-control", "mixpert-control", test)
    run_eval("mixpert-oracle", "mixpert", test, oracle=True)
    routing, routing_share = {}, {}
    for strategy in ("direct", "score_threshold", "score_difference"):  # per call: the saved config is unchanged
        _, _, _, report = run_eval(f"mixpert-mixed-{strategy}", "mixpert", mixed, split="mixed",
                                   routing_strategy=strategy)
        routing[strategy], routing_share[strategy] = report["overall"], report["router"]["expert_share"]
    joint_mixed = run_eval("joint-mixed", "joint", mixed, split="mixed")[3]["overall"]

    chimera_router = reports["chimera"]["router"]
    mixpert_router = reports["mixpert"]["router"]["argmax_accuracy"]  # the router's top class, thresholds aside
    attention = gscm_attention_ratio(lab, test)
    dpo = {"before": preference_accuracy(lab, "chimera-stage2", lab.test_pairs),
           "after": preference_accuracy(lab, "chimera-dpo", lab.test_pairs),
           "control": preference_accuracy(lab, "chimera-sft-chosen", lab.test_pairs)}
    plot_confusion(chimera_router, lab.path("chimera_router_confusion.png"))
    plot_per_domain({"generalist": reports["generalist"], "chimera": reports["chimera"]},
                    lab.path("chimera_vs_generalist.png"), "Chimera vs its generalist (test)")
    plot_per_domain({"joint": reports["generalist"], "mixpert": reports["mixpert"]}, lab.path("mixpert_vs_joint.png"),
                    "Mixpert vs the joint model it was upcycled from (test)")
    plot_per_domain({"control": reports["generalist-control"], "chimera": reports["chimera"]},
                    lab.path("chimera_vs_control.png"), "Chimera vs its generalist continued as long (test)")
    plot_per_domain({"control": reports["mixpert-control"], "mixpert": reports["mixpert"]},
                    lab.path("mixpert_vs_control.png"), "Mixpert vs the all-as-one control (test)")
    return {
        "generalist": {"per_domain": _scores(reports["generalist"]), "overall": reports["generalist"]["overall"]},
        "generalist_control": {"per_domain": _scores(reports["generalist-control"]),
                               "overall": reports["generalist-control"]["overall"]},
        "chimera_no_gscm": {"per_domain": _scores(reports["chimera-no-gscm"]),
                            "overall": reports["chimera-no-gscm"]["overall"]},
        "mixpert_control": {"per_domain": _scores(reports["mixpert-control"]),
                            "overall": reports["mixpert-control"]["overall"]},
        "test_per_domain": {d: e["num_samples"] for d, e in reports["generalist"]["per_domain"].items()},
        "chimera": {
            "router_accuracy": chimera_router["accuracy"],
            "router_confusion": chimera_router,
            "gscm_attention_ratio": attention["ratio"],
            "gscm_attention": attention,
            "per_domain": _scores(reports["chimera"]),
            "per_domain_oracle_experts": _scores(reports["chimera-oracle"]),
            "overall": reports["chimera"]["overall"],
        },
        "mixpert": {
            "router_accuracy": mixpert_router,
            "per_domain": {d: {"joint": reports["generalist"]["per_domain"][d]["score"],
                               "mixpert": reports["mixpert"]["per_domain"][d]["score"]}
                           for d in reports["mixpert"]["per_domain"]},
            "per_domain_oracle_experts": _scores(reports["mixpert-oracle"]),
            "expert_share": reports["mixpert"]["router"]["expert_share"],
            "routing": routing,
            "routing_expert_share": routing_share,
            "routing_joint_model": joint_mixed,
        },
        "dpo": {"preference_accuracy": dpo},
        "metrics": {d: e["metric"] for d, e in reports["generalist"]["per_domain"].items()},
    }


def _scores(report):
    return {d: e["score"] for d, e in report["per_domain"].items()}


@torch.no_grad()
def gscm_attention_ratio(lab, rows) -> dict:
    """Chimera §4's attention analysis: the share of attention the answer's first prediction (the last prompt
    position) gives to expert tokens, averaged over layers and heads and over test images of expert domains, for
    stage 2 with GSCM ÷ stage 2 without it (same start, data and steps)."""
    from modeling_chimera import ChimeraForConditionalGeneration  # noqa: PLC0415 (transformers: --help stays fast)
    from processing_chimera import ChimeraProcessor  # noqa: PLC0415 (transformers: --help stays fast)
    from train.evaluate import prompt_for  # noqa: PLC0415 (transformers: --help stays fast)

    rows = [r for r in rows if r["domain"] in EXPERT_DOMAINS]
    shares = {}
    for name in ("chimera-stage2", "chimera-stage2-no-gscm"):
        model = ChimeraForConditionalGeneration.from_pretrained(lab.path(name), attn_implementation="eager").eval()
        processor = ChimeraProcessor.from_pretrained(lab.path(name), trust_remote_code=False)
        token_ids = torch.tensor(model.config.expert_token_ids)
        values = []
        for start in range(0, len(rows), 16):
            batch = rows[start : start + 16]
            inputs = processor(images=[[r["image"]] for r in batch],
                               text=[prompt_for(processor, r["question"]) for r in batch], return_tensors="pt",
                               padding=True)
            labels = torch.tensor([model.domains.index(r["domain"]) + 1 for r in batch])
            out = model.model(**inputs, expert_labels=labels, output_attentions=True)
            expert = torch.isin(out.expanded_input_ids, token_ids).float()  # (batch, seq)
            for layer in out.attentions:  # (batch, heads, seq, seq)
                last = layer[:, :, -1, :]  # attention of the last prompt position (left padding)
                values.append((last * expert[:, None, :]).sum(-1).mean(1))
        shares[name] = float(torch.cat(values).mean())
    with_gscm, without = shares["chimera-stage2"], shares["chimera-stage2-no-gscm"]
    return {"with_gscm": with_gscm, "without_gscm": without, "ratio": with_gscm / without if without > 0 else None}


@torch.no_grad()
def preference_accuracy(lab, folder, pairs, batch_size: int = 16) -> float:
    """Share of held-out pairs where the model gives the chosen answer a higher log-probability (summed over the
    answer's tokens) than the rejected one."""
    from modeling_chimera import ChimeraForConditionalGeneration  # noqa: PLC0415 (transformers: --help stays fast)
    from processing_chimera import ChimeraProcessor  # noqa: PLC0415 (transformers: --help stays fast)
    from train.evaluate import prompt_for  # noqa: PLC0415 (transformers: --help stays fast)

    model = ChimeraForConditionalGeneration.from_pretrained(lab.path(folder)).eval()
    processor = ChimeraProcessor.from_pretrained(lab.path(folder), trust_remote_code=False)
    processor.tokenizer.padding_side = "right"
    end = "<|im_end|>"

    def answer_logprob(batch, key):
        prompts = [prompt_for(processor, p["question"]) for p in batch]
        images = [[p["image"]] for p in batch]
        full = processor(images=images, text=[q + p[key] + end for q, p in zip(prompts, batch)], return_tensors="pt",
                         padding=True)
        prompt_len = processor(images=images, text=prompts, return_tensors="pt", padding=True)["attention_mask"].sum(1)
        ids = full["input_ids"]
        logp = model(**full).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        position = torch.arange(ids.shape[1] - 1)[None]
        answer = (position >= prompt_len[:, None] - 1) & (position < full["attention_mask"].sum(1)[:, None] - 1)
        return (logp * answer).sum(-1)

    wins = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        wins += int((answer_logprob(batch, "chosen") > answer_logprob(batch, "rejected")).sum())
    return wins / max(len(pairs), 1)


# ------------------------------------------------------------------------------------------------------ report


# Each claim as one number compared with a target (Chimera §4 and Mixpert §4 as the lab can test them). Differences are
# paired: the two models answer the same test images. `op` ">=" holds at the target, ">" only above it.
CLAIMS = (
    ("chimera_router", "Chimera router accuracy (paper 95.4%)", ">=", 0.95),
    ("chimera_vs_control", "Chimera - its control (generalist continued as long), expert domains", ">", 0.0),
    ("chimera_vs_generalist", "Chimera - its generalist, expert domains", ">=", 0.0),
    ("gscm_attention_ratio", "GSCM attention on expert tokens, with / without", ">=", 1.5),
    ("mixpert_vs_control", "Mixpert - its control (all-as-one), mean over domains", ">", 0.0),
    ("mixpert_vs_control_worst", "Mixpert - its control, worst domain", ">=", 0.0),
    ("mixpert_router", "Mixpert router accuracy (top class)", ">=", 0.90),
    ("routing", "score-difference - direct routing, mixed split", ">=", 0.0),
    ("dpo_vs_control", "DPO - its control (SFT on the chosen answers), preference accuracy", ">", 0.0),
)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _passes(value, op: str, target: float) -> bool:
    return value is not None and (value >= target if op == ">=" else value > target)


def claim_values(results: dict) -> dict:
    """The number behind each of `CLAIMS` for one lab run."""
    chimera, mixpert = results["chimera"], results["mixpert"]

    def expert_mean(scores):
        return _mean(scores[d] for d in EXPERT_DOMAINS)

    mixpert_gain = {d: v["mixpert"] - results["mixpert_control"]["per_domain"][d]
                    for d, v in mixpert["per_domain"].items()}
    routing, dpo = mixpert["routing"], results["dpo"]["preference_accuracy"]
    chimera_mean = expert_mean(chimera["per_domain"])
    values = {
        "chimera_router": chimera["router_accuracy"],
        "chimera_vs_control": chimera_mean - expert_mean(results["generalist_control"]["per_domain"]),
        "chimera_vs_generalist": chimera_mean - expert_mean(results["generalist"]["per_domain"]),
        "gscm_attention_ratio": chimera["gscm_attention_ratio"],
        "mixpert_vs_control": _mean(mixpert_gain.values()),
        "mixpert_vs_control_worst": min(mixpert_gain.values()),
        "mixpert_router": mixpert["router_accuracy"],
        "routing": routing["score_difference"] - routing["direct"],
        "dpo_vs_control": dpo["after"] - dpo["control"],
    }
    # Differences of means over the same images: round off float residue so a tie reads as a tie, not a 1e-17 gain.
    return {key: None if v is None else round(v, 9) for key, v in values.items()}


def claims(results: dict) -> list[dict]:
    """Each claim of `CLAIMS` for one run: its value, target and whether it held."""
    values = claim_values(results)
    return [{"key": key, "claim": f"{text} {op} {target:g}", "value": values[key], "target": target, "op": op,
             "held": _passes(values[key], op, target)} for key, text, op, target in CLAIMS]


def summarize_seeds(per_seed: dict) -> list[dict]:
    """Each claim over seeds: the per-seed values, their mean and sample standard deviation, and a verdict judged on
    the mean with its spread: `yes` / `no` when mean - sd and mean + sd fall on the same side of the target, else
    `yes (within spread)` / `no (within spread)`: a claim one standard deviation can flip is not decided. `n/a` when
    fewer than two seeds gave a value (a spread needs two)."""
    out = []
    for key, text, op, target in CLAIMS:
        values = [claim_values(results)[key] for results in per_seed.values()]
        known = [v for v in values if v is not None]
        mean = _mean(known) if known else None
        sd = (sum((v - mean) ** 2 for v in known) / (len(known) - 1)) ** 0.5 if len(known) > 1 else None
        held = _passes(mean, op, target)
        if sd is None:
            verdict = "n/a"
        else:
            decided = _passes(mean - sd, op, target) == _passes(mean + sd, op, target)
            verdict = ("yes" if held else "no") + ("" if decided else " (within spread)")
        out.append({"key": key, "claim": f"{text} {op} {target:g}", "target": target, "op": op,
                    "per_seed": dict(zip(per_seed, values)), "n": len(known), "mean": mean, "sd": sd,
                    "held": held and sd is not None, "held_every_seed": all(_passes(v, op, target) for v in values),
                    "verdict": verdict})
    return out


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_lab_report(lab: Lab, results: dict):
    results["claims"] = claims(results)
    results["timings_seconds"] = lab.timings
    results["config"] = lab.report["config"]
    with open(lab.path("report.json"), "w") as f:
        json.dump(results, f, indent=2)
    n = results["test_per_domain"]
    lines = ["# Mini-lab report", "", f"Seed {lab.cfg.seed}. Synthetic six-domain data, tiny models, CPU; "
             f"{min(n.values())} test images per domain (one image moves a domain's score by "
             f"{1 / min(n.values()):.3f}). Metrics per domain: "
             + ", ".join(f"{d}: {m}" for d, m in results["metrics"].items()) + ". Question kinds: "
             + "; ".join(f"{d}: {', '.join(k)}" for d, k in LAB_QUESTION_KINDS.items())
             + " (plus 'what kind of image is this?' in training).", "", "## Claims", "",
             "| claim | measured | held |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {_fmt(c['value'])} | {'yes' if c['held'] else 'NO'} |" for c in results["claims"]]
    chimera, mixpert = results["chimera"], results["mixpert"]
    lines += ["", "## Per domain (test split)", "",
              "Generalist = the joint model; its control = the joint model continued on Chimera's data, steps and "
              "learning rates without experts; Mixpert's control = the all-as-one model (one expert-sized set tuned on "
              "every domain as long as all experts together). Oracle = every image sent to its domain's expert.", "",
              "| domain | generalist | control | Chimera | no GSCM | Chimera (oracle) | Mixpert control | Mixpert "
              "| Mixpert (oracle) |", "|---|---|---|---|---|---|---|---|---|"]
    for d in sorted(results["generalist"]["per_domain"]):
        lines.append(f"| {d} | {results['generalist']['per_domain'][d]:.3f} | "
                     f"{results['generalist_control']['per_domain'][d]:.3f} | {chimera['per_domain'][d]:.3f} | "
                     f"{results['chimera_no_gscm']['per_domain'][d]:.3f} | "
                     f"{chimera['per_domain_oracle_experts'][d]:.3f} | "
                     f"{results['mixpert_control']['per_domain'][d]:.3f} | {mixpert['per_domain'][d]['mixpert']:.3f} "
                     f"| {mixpert['per_domain_oracle_experts'][d]:.3f} |")
    routing, dpo = mixpert["routing"], results["dpo"]["preference_accuracy"]
    lines += ["", f"Chimera router accuracy {chimera['router_accuracy']:.3f}; Mixpert router accuracy (top class) "
              f"{mixpert['router_accuracy']:.3f}; share of test images Mixpert sent to a domain expert (the rest to "
              f"the versatile one) {mixpert['expert_share']:.3f}.",
              f"GSCM attention share on expert tokens: {chimera['gscm_attention']['with_gscm']:.4f} with, "
              f"{chimera['gscm_attention']['without_gscm']:.4f} without.",
              f"Mixed split (ambiguous images), mean score: direct {routing['direct']:.3f}, score-threshold "
              f"{routing['score_threshold']:.3f}, score-difference {routing['score_difference']:.3f}; joint model "
              f"{mixpert['routing_joint_model']:.3f}.",
              f"Preference accuracy on held-out pairs: {dpo['before']:.3f} before, {dpo['after']:.3f} after DPO, "
              f"{dpo['control']:.3f} after its control (SFT on the chosen answers).", "",
              "## Time (seconds)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in lab.timings.items()]
    lines += ["", f"Kernels: {_kernels_text(results['kernels'])}.",
              "", "Plots: chimera_vs_generalist.png, chimera_vs_control.png, mixpert_vs_joint.png, "
              "mixpert_vs_control.png, chimera_router_confusion.png, eval/*/."]
    with open(lab.path("report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _kernels_text(kernels: dict | None) -> str:
    if not kernels:
        return "not recorded"
    return (f"{kernels['mode']} ({kernels['cpu_capability']} ATen kernels, {kernels['threads']} thread(s), "
            f"MKL_CBWR={kernels['MKL_CBWR'] or 'auto'}, ONEDNN_MAX_CPU_ISA={kernels['ONEDNN_MAX_CPU_ISA'] or 'auto'}, "
            f"torch {kernels['torch']}, {kernels['cpu'] or kernels['machine']})")


def plot_claims(summary: list[dict], path: str) -> str:
    """One panel per claim: each seed's value (dots), the mean with one standard deviation (bar) and the target."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (matplotlib: --help stays fast)

    fig = Figure(figsize=(3 * len(summary), 3))
    for ax, claim in zip(fig.subplots(1, len(summary)), summary):
        seeds = list(claim["per_seed"])
        points = [(i, v) for i, v in enumerate(claim["per_seed"].values()) if v is not None]  # a seed may give none
        ax.scatter([i for i, _ in points], [v for _, v in points], color="tab:blue", zorder=3, label="seeds")
        if claim["sd"] is not None:
            ax.errorbar([(len(seeds) - 1) / 2], [claim["mean"]], yerr=[claim["sd"]], fmt="s", color="black",
                        capsize=4, label="mean ± sd")
        ax.axhline(claim["target"], color="tab:red", linestyle="--", label="target")
        ax.set_xticks(range(len(seeds)), [f"seed {seed}" for seed in seeds], fontsize=7)
        ax.set_title(claim["key"] + f"\n{claim['verdict']}", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_seeds_report(output_dir: str, per_seed: dict, timings: dict, wall: dict | None = None) -> dict:
    """`report.json`, `report.md` and `claims.png` over seeds, in `output_dir` (each seed's own in `seed-<n>/`)."""
    summary = summarize_seeds(per_seed)
    keys = ("generalist", "generalist_control", "chimera", "chimera_no_gscm", "mixpert_control")
    domains = list(next(iter(per_seed.values()))["generalist"]["per_domain"])
    per_domain = {name: {d: _mean(r[name]["per_domain"][d] for r in per_seed.values()) for d in domains}
                  for name in keys}
    per_domain["mixpert"] = {d: _mean(r["mixpert"]["per_domain"][d]["mixpert"] for r in per_seed.values())
                             for d in domains}
    report = {"seeds": list(per_seed), "claims": summary, "mean_per_domain": per_domain,
              "timings_seconds": timings, "wall": wall,
              "kernels": {seed: r.get("kernels") for seed, r in per_seed.items()}}
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_claims(summary, os.path.join(output_dir, "claims.png"))
    seeds = list(per_seed)
    lines = ["# Mini-lab report over seeds", "",
             f"Seeds {', '.join(map(str, seeds))}; each seed's own report in seed-<n>/report.md. Each claim is judged "
             "on the mean over seeds; '(within spread)' when one standard deviation either side of the mean falls on "
             "both sides of the target.", "", "## Claims", "",
             "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | held | on every seed |",
             "|---|" + "---|" * len(seeds) + "---|---|---|"]
    for c in summary:
        cells = " | ".join(_fmt(v) for v in c["per_seed"].values())
        spread = f"{_fmt(c['mean'])} ± {_fmt(c['sd'])}" if c["sd"] is not None else _fmt(c["mean"])
        lines.append(f"| {c['claim']} | {cells} | {spread} | {c['verdict']} | "
                     f"{'yes' if c['held_every_seed'] else 'no'} |")
    lines += ["", "## Mean score per domain over seeds (test split)", "",
              "| domain | " + " | ".join(per_domain) + " |", "|---|" + "---|" * len(per_domain)]
    lines += [f"| {d} | " + " | ".join(f"{per_domain[name][d]:.3f}" for name in per_domain) + " |" for d in domains]
    lines += ["", "## Time (seconds)", "", "| seed | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in timings.items()]
    if wall is not None:
        lines += ["", f"Wall time of this invocation: {wall['seconds']} s for seeds "
                  f"{', '.join(map(str, wall['seeds_run'])) or '(none: all reused)'}, {wall['workers']} at once."]
    lines += ["", "Kernels: " + "; ".join(f"seed {seed}: {_kernels_text(k)}" for seed, k in report["kernels"].items())
              + "."]
    lines += ["", "Plot: claims.png (each claim: the seeds, the mean ± sd, the target)."]
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


def run_lab(output_dir: str, config: LabConfig) -> dict:
    """Every stage of the lab for one seed, in `output_dir`; returns the results (also in `report.json`)."""
    torch.manual_seed(config.seed)
    lab = Lab(output_dir, config)
    start = time.perf_counter()
    with lab.stage("data"):
        data = write_data(lab)
    with lab.stage("joint generalist"):
        tokenizer = train_joint(lab, data)
    with lab.stage("chimera experts"):
        towers = train_specialists(lab, tokenizer)
    with lab.stage("chimera assemble"):
        assemble_chimera(lab, towers)
    with lab.stage("chimera stages 1-2"):
        train_chimera(lab)
    with lab.stage("chimera control"):
        train_generalist_control(lab)
    with lab.stage("chimera dpo"):
        train_dpo(lab)
    with lab.stage("mixpert"):
        train_mixpert(lab)
    with lab.stage("evaluation"):
        results = evaluate_all(lab, data)
    lab.timings["total"] = round(time.perf_counter() - start, 1)
    results["kernels"] = {"mode": config.kernels, **kernel_record()}
    write_lab_report(lab, results)
    return results


def finished_run(folder: str, config: LabConfig) -> dict | None:
    """The results of a seed finished earlier in `folder` with the same config (its `report.json` is written last),
    so that an interrupted `--seeds` run goes on where it stopped; None otherwise."""
    path = os.path.join(folder, "report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if {"kernels": "native", **results.get("config", {})} != asdict(config):  # reports before --kernels ran native
        return None
    print(f"[quickstart] seed {config.seed}: finished earlier in {folder}, its results reused", flush=True)
    return results


def main(args):
    config = replace(SCALES[args.scale], kernels=args.kernels)
    if args.workers is not None and (args.kernels == "native" or args.seeds is None):
        raise SystemExit("--workers needs --seeds and --kernels reproducible: it runs that many seeds at once, one "
                         "thread each (with native kernels a seed already uses every core, and its numbers depend on "
                         "how many it gets); drop --workers or add those")
    if args.kernels == "reproducible":
        check_reproducible_kernels_apply()
    workers = args.workers or min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                  else os.cpu_count() or 1)
    if args.seeds is None:
        [results] = run_labs([(args.output_dir, config if args.seed is None else replace(config, seed=args.seed))],
                             workers)
        print(open(os.path.join(args.output_dir, "report.md")).read())
        return results
    start = time.perf_counter()
    jobs = [(os.path.join(args.output_dir, f"seed-{seed}"), replace(config, seed=seed)) for seed in args.seeds]
    per_seed = {cfg.seed: finished_run(folder, cfg) for folder, cfg in jobs}
    todo = [(folder, cfg) for folder, cfg in jobs if per_seed[cfg.seed] is None]
    per_seed.update({cfg.seed: results for (_, cfg), results in zip(todo, run_labs(todo, workers))})
    timings = {seed: results["timings_seconds"]["total"] for seed, results in per_seed.items()}
    timings["all"] = round(sum(timings.values()), 1)
    wall = {"seconds": round(time.perf_counter() - start, 1),
            "workers": 1 if config.kernels == "native" else min(workers, max(len(todo), 1)),
            "seeds_run": [cfg.seed for _, cfg in todo]}
    report = write_seeds_report(args.output_dir, per_seed, timings, wall)
    print(open(os.path.join(args.output_dir, "report.md")).read())
    return report


if __name__ == "__main__":
    main(make_parser().parse_args())
