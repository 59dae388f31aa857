"""Preference pairs sampled from a trained model and judged by each domain's metric (Chimera's stage 3 data).

Chimera (arXiv 2412.05983, §3.4 / §4) ends with an optional DPO stage on preference pairs "constructed from 60K public
data": answers the stage-2 model gives, the right ones preferred over the wrong ones. This module builds such pairs
from any image-QA set with reference answers (`python -m train.make_preference_pairs` is its command line):

1. `sample_answers`: `num_samples` answers per question (`generate(do_sample=True, num_return_sequences=...)`,
   batched, seeded per batch), prompted exactly as the `prompt` column the pair will carry (so DPO scores the
   answers under the prompt they were sampled from);
2. `question_pairs`: each distinct answer is scored with the domain's metric (`evaluation.metrics`), *correct* when
   its score is >= `threshold`; chosen = correct answers, best first; rejected = incorrect ones, worst first; up to
   `pairs_per_question` pairs per question (below). No correct sample: the reference answer becomes the only chosen
   one with `reference_as_chosen`, else the question gives no pair; every sample correct: no pair;
3. `write_preference_folder`: TRL's preference format (`prompt` / `chosen` / `rejected` conversational, `images`
   relative to the file) as `preferences.jsonl`, each question's image once under `images/`, and `stats.json`.

Pairs per question: with `C` distinct correct answers (sorted by score, highest first) and `R` distinct incorrect
ones (lowest first), pair `i` is `(C[i % |C|], R[i % |R|])` for `i < min(pairs_per_question, max(|C|, |R|))`: the
most contrasted pair first, every distinct answer used before any is reused, never the same pair twice. Identical
answers (after stripping whitespace) count once.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from chimera_mixpert.data.export import qa_messages
from evaluation.metrics import DEFAULT_DOMAIN_METRICS, METRICS, score_row


logger = logging.getLogger(__name__)

PREFERENCE_FILE = "preferences.jsonl"
STATS_FILE = "stats.json"


@dataclass
class PairRules:
    """How samples become pairs (see the module docstring)."""

    threshold: float = 1.0
    pairs_per_question: int = 1
    reference_as_chosen: bool = False
    metric_overrides: dict = field(default_factory=dict)

    def metric(self, domain: str) -> str:
        return self.metric_overrides.get(domain) or DEFAULT_DOMAIN_METRICS[domain]


def parse_metric_overrides(pairs) -> dict:
    """`["table=exact_match", ...]` -> `{"table": "exact_match"}` (`--metric DOMAIN=METRIC`, as in `train.evaluate`)."""
    overrides = {}
    for pair in pairs or ():
        domain, sep, metric = pair.partition("=")
        if not sep or not domain or metric not in METRICS:
            raise ValueError(f"--metric {pair!r}: expected DOMAIN=METRIC with METRIC one of {sorted(METRICS)}.")
        overrides[domain] = metric
    return overrides


# ----------------------------------------------------------------------------------------------------------- scoring


def score_answer(row: dict, answer: str, metric: str) -> float:
    """One answer's score against the row's reference, with the targets and options `train.evaluate` uses (TEDS
    against `html` when the row has it; MathVista's `question_type` / `answer_type` / `choices` / `precision`). An
    answer the metric cannot parse (e.g. a generated table with `colspan="x"`) scores 0: it is a wrong answer."""
    try:
        return score_row(metric, answer, row)
    except (ValueError, TypeError, KeyError, IndexError):
        return 0.0


def distinct(answers) -> list[str]:
    """The answers without repeats (after stripping whitespace), in order of first appearance."""
    return list(dict.fromkeys(a.strip() for a in answers))


def question_pairs(row: dict, samples: list[str], rules: PairRules) -> dict:
    """The pairs of one question: `{"outcome", "pairs": [(chosen, chosen_score, rejected, rejected_score, source)],
    "correct_samples", "reference_below_threshold"}` (the last only with pairs). `outcome` is `sampled` (a correct
    and an incorrect sample), `reference` (no correct sample, the reference is chosen), `all_correct` or `no_correct`
    (no pair). `reference_below_threshold`: the reference was chosen although its own metric scores it below the
    threshold (e.g. a count question scored by TEDS against the table's HTML: name the right metric with
    `--metric`)."""
    metric = rules.metric(row["domain"])
    scores = {a: score_answer(row, a, metric) for a in distinct(samples)}
    correct_samples = sum(scores[a.strip()] >= rules.threshold for a in samples)
    # Stable sorts: ties keep the order in which the answers were sampled.
    chosen = sorted((a for a, s in scores.items() if s >= rules.threshold), key=lambda a: -scores[a])
    rejected = sorted((a for a, s in scores.items() if s < rules.threshold), key=lambda a: scores[a])
    source = "sample"
    if not rejected:
        return {"outcome": "all_correct", "pairs": [], "correct_samples": correct_samples}
    if not chosen:
        if not rules.reference_as_chosen:
            return {"outcome": "no_correct", "pairs": [], "correct_samples": correct_samples}
        reference = str(row["answer"]).strip()
        scores[reference] = score_answer(row, reference, metric)
        if scores[reference] < rules.threshold:
            logger.warning("Question %r: the reference answer %r scores %.3f < threshold %s with %s; it is chosen "
                           "anyway (--reference_as_chosen).", row["question"][:60], reference[:60], scores[reference],
                           rules.threshold, metric)
        chosen, source = [reference], "reference"
        rejected = [a for a in rejected if a != reference]  # a metric that fails its own reference: no self-pair
        if not rejected:
            return {"outcome": "no_correct", "pairs": [], "correct_samples": correct_samples}
    count = min(rules.pairs_per_question, max(len(chosen), len(rejected)))
    pairs = [(chosen[i % len(chosen)], scores[chosen[i % len(chosen)]], rejected[i % len(rejected)],
              scores[rejected[i % len(rejected)]], source) for i in range(count)]
    return {"outcome": "sampled" if source == "sample" else "reference", "pairs": pairs,
            "correct_samples": correct_samples,
            "reference_below_threshold": source == "reference" and scores[chosen[0]] < rules.threshold}


# ---------------------------------------------------------------------------------------------------------- sampling


def batch_seed(seed: int, start: int) -> int:
    """The torch seed of the batch starting at row `start`: one stream per `(seed, start)` (not `seed + start`, which
    would give seed 0's second batch the samples of seed 1's first)."""
    return int(np.random.SeedSequence([int(seed), int(start)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _to_device(batch, device) -> dict:
    # Chimera's `expert_pixel_values` is a list of tensors (one per expert), which `BatchFeature.to` leaves alone.
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return [v.to(device) for v in value]
        return value

    return {k: move(v) for k, v in batch.items()}


@torch.no_grad()
def sample_answers(model, processor, rows, num_samples: int, batch_size: int = 8, seed: int = 0,
                   progress: bool = True, **generate_kwargs) -> list[list[str]]:
    """`num_samples` sampled answers per row (`image`, `question`), in sample order. Each batch of `batch_size`
    questions is one `generate` call with `do_sample=True, num_return_sequences=num_samples`, under
    `torch.manual_seed(batch_seed(seed, start))`, inside `torch.random.fork_rng` (the caller's RNG is untouched): the
    same rows, seed, batch size and machine give the same answers. `generate_kwargs` (`temperature`, `top_p`,
    `max_new_tokens`, ...) go to `generate`."""
    tokenizer = processor.tokenizer
    device = model.device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="sampling", disable=not progress):
            batch = rows[start:start + batch_size]
            text = [processor.apply_chat_template(qa_messages(r["question"]), add_generation_prompt=True)
                    for r in batch]
            inputs = _to_device(processor(images=[[r["image"]] for r in batch], text=text, return_tensors="pt",
                                          padding=True), device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(batch_seed(seed, start))
                out = model.generate(**inputs, do_sample=True, num_return_sequences=num_samples,
                                     return_dict_in_generate=True, **generate_kwargs)
            decoded = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:],
                                             skip_special_tokens=True)
            # `num_return_sequences` puts each prompt's samples next to each other.
            answers += [[a.strip() for a in decoded[i * num_samples:(i + 1) * num_samples]] for i in range(len(batch))]
    finally:
        tokenizer.padding_side = side
    return answers


# ----------------------------------------------------------------------------------------------------------- writing


def _record(row: dict, image_path: str, pair: tuple, question_index: int) -> dict:
    chosen, chosen_score, rejected, rejected_score, source = pair
    return {
        "prompt": qa_messages(row["question"]),
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
        "images": [image_path],
        "domain": row["domain"],
        "question_index": question_index,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "chosen_source": source,
    }


def _domain_stats(metric: str) -> dict:
    return {"metric": metric, "questions": 0, "questions_with_pairs": 0, "pairs": 0, "reference_as_chosen": 0,
            "reference_below_threshold": 0, "all_correct": 0, "no_correct": 0, "samples": 0, "correct_samples": 0}


def _finish_stats(entry: dict) -> dict:
    entry["yield"] = entry["questions_with_pairs"] / max(entry["questions"], 1)
    entry["sample_accuracy"] = entry["correct_samples"] / max(entry["samples"], 1)
    return entry


_IMAGE_NAME = re.compile(r"q\d{6}\.png")  # `write_preference_folder`'s image names


def clear_previous_outputs(output_dir: str) -> list[str]:
    """Delete what an earlier `write_preference_folder` run left in `output_dir` (`preferences.jsonl`, `stats.json`,
    `images/q<row>.png`), so an earlier, larger run leaves no stale image; other files are kept. Returns the deleted
    paths (relative to `output_dir`)."""
    names = [n for n in (PREFERENCE_FILE, STATS_FILE) if os.path.isfile(os.path.join(output_dir, n))]
    images = os.path.join(output_dir, "images")
    if os.path.isdir(images):
        names += sorted(os.path.join("images", n) for n in os.listdir(images) if _IMAGE_NAME.fullmatch(n))
    for name in names:
        os.remove(os.path.join(output_dir, name))
    return names


def write_preference_folder(output_dir: str, rows, samples, rules: PairRules, settings: dict | None = None) -> dict:
    """Turn `samples` (one list per row) into pairs and write `output_dir/preferences.jsonl` (TRL's preference format:
    `prompt`, `chosen`, `rejected`, `images` + `domain`, `question_index`, `chosen_score`, `rejected_score`,
    `chosen_source`), the images of the questions that gave pairs as `output_dir/images/q<row>.png` (referenced
    relative to the file, as `train.dpo` reads them) and `output_dir/stats.json`; an earlier run's outputs are deleted
    first (`clear_previous_outputs`; the command refuses them without `--overwrite_output_dir`). Returns the stats."""
    clear_previous_outputs(output_dir)
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    per_domain = {}
    with open(os.path.join(output_dir, PREFERENCE_FILE), "w", encoding="utf-8") as f:
        for index, (row, answers) in enumerate(zip(rows, samples, strict=True)):
            result = question_pairs(row, answers, rules)
            entry = per_domain.setdefault(row["domain"], _domain_stats(rules.metric(row["domain"])))
            entry["questions"] += 1
            entry["samples"] += len(answers)
            entry["correct_samples"] += result["correct_samples"]
            outcome = result["outcome"]
            if outcome in ("all_correct", "no_correct"):
                entry[outcome] += 1
                continue
            entry["reference_as_chosen"] += outcome == "reference"
            entry["reference_below_threshold"] += result["reference_below_threshold"]
            entry["questions_with_pairs"] += 1
            entry["pairs"] += len(result["pairs"])
            image_path = os.path.join("images", f"q{index:06d}.png")
            row["image"].save(os.path.join(output_dir, image_path), format="PNG")
            for pair in result["pairs"]:
                f.write(json.dumps(_record(row, image_path, pair, index), ensure_ascii=False) + "\n")
    per_domain = {d: _finish_stats(per_domain[d]) for d in sorted(per_domain)}
    totals = {k: sum(e[k] for e in per_domain.values()) for k in
              ("questions", "questions_with_pairs", "pairs", "reference_as_chosen", "reference_below_threshold",
               "all_correct", "no_correct", "samples", "correct_samples")}
    stats = {**_finish_stats(totals), "per_domain": per_domain, "settings": settings or {}}
    with open(os.path.join(output_dir, STATS_FILE), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    return stats


def summary_table(stats: dict) -> str:
    """The stats as a Markdown table (what the command prints)."""
    lines = ["| domain | metric | questions | with pairs | pairs | reference chosen | all correct | none correct | "
             "sample accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for domain, e in list(stats["per_domain"].items()) + [("**all**", {**stats, "metric": ""})]:
        lines.append(f"| {domain} | {e['metric']} | {e['questions']} | {e['questions_with_pairs']} "
                     f"({e['yield']:.0%}) | {e['pairs']} | {e['reference_as_chosen']} | {e['all_correct']} | "
                     f"{e['no_correct']} | {e['sample_accuracy']:.3f} |")
    return "\n".join(lines)
