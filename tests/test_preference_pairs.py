"""`python -m train.make_preference_pairs`: DPO pairs sampled from a tiny saved Chimera, judged by real metrics.

A random tiny model is almost never right, so correctness is controlled without stubbing anything: by a dataset whose
references are answers the model itself samples (computed first, with the library, then reproduced by the command),
by `--threshold 0.0` (every sample correct) and by `--reference_as_chosen`."""

import json
from pathlib import Path

import pytest

from chimera_mixpert.data.synthetic import build_dataset, save_dataset
from chimera_mixpert.preferences import PairRules, question_pairs, sample_answers
from evaluation.metrics import DOMAINS, exact_match, score
from train.make_preference_pairs import load_model, main, make_parser

ROOT = Path(__file__).resolve().parent.parent
EXACT = [f"--metric={d}=exact_match" for d in DOMAINS]
# The synthetic tables are asked row / column counts, not the table's HTML: exact match, as in the mini-lab.
LAB = ["--metric=table=exact_match"]
SAMPLING = ["--num_samples", "4", "--max_new_tokens", "6", "--batch_size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from chimera_mixpert.tiny import build_tiny_chimera

    folder = tmp_path_factory.mktemp("prefs")
    save_dataset(build_dataset({"train": 2, "validation": 0, "test": 0}, mixed=0, image_size=32), folder / "data")
    model, processor = build_tiny_chimera()
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder


def run(lab, out, *flags, dataset=None):
    return main(make_parser().parse_args(["--model_name_or_path", str(lab / "model"), "--dataset",
                                          str(dataset or lab / "data"), "--output_dir", str(out), *flags]))


def read_pairs(folder):
    return [json.loads(line) for line in (folder / "preferences.jsonl").read_text().splitlines()]


def text(turns):
    return turns[0]["content"][0]["text"]


def test_question_pairs_rank_deduplicate_and_fall_back_with_the_real_metrics():
    row = {"domain": "document", "question": "Title?", "answer": "annual report"}
    samples = ["annual report", "xyz", " annual report", "annual reprt", "xyz"]  # ANLS 1.0, 0.0, 1.0, 12/13, 0.0
    strict = question_pairs(row, samples, PairRules(threshold=1.0, pairs_per_question=3))
    assert strict["outcome"] == "sampled" and strict["correct_samples"] == 2
    # one distinct correct answer, two distinct wrong ones (worst first): two distinct pairs, not three
    assert [(c, r) for c, _, r, _, _ in strict["pairs"]] == [("annual report", "xyz"),
                                                             ("annual report", "annual reprt")]
    assert [round(p[3], 4) for p in strict["pairs"]] == [0.0, round(12 / 13, 4)]
    lenient = question_pairs(row, samples, PairRules(threshold=0.9, pairs_per_question=3))
    assert [(c, r) for c, _, r, _, _ in lenient["pairs"]] == [("annual report", "xyz"), ("annual reprt", "xyz")]
    assert question_pairs(row, samples, PairRules(pairs_per_question=1))["pairs"][0][:3] == ("annual report", 1.0,
                                                                                           "xyz")
    assert question_pairs(row, ["annual report"] * 2, PairRules())["outcome"] == "all_correct"
    wrong = ["annual", "xyz", "annual"]
    assert question_pairs(row, wrong, PairRules()) == {"outcome": "no_correct", "pairs": [], "correct_samples": 0}
    fallback = question_pairs(row, wrong, PairRules(pairs_per_question=5, reference_as_chosen=True))
    assert fallback["outcome"] == "reference" and not fallback["reference_below_threshold"]
    # "annual" also scores 0 (ANLS below 0.5 is 0): a tie, so the sample order decides
    assert [(c, r, s) for c, _, r, _, s in fallback["pairs"]] == [("annual report", "annual", "reference"),
                                                                  ("annual report", "xyz", "reference")]


def test_pairs_from_references_the_model_itself_samples(lab, tmp_path):
    from train.dpo import load_preference_data
    from train.evaluate import load_rows

    rows = load_rows(str(lab / "data"), "train")
    _, model, processor = load_model(str(lab / "model"), device="cpu")
    samples = sample_answers(model, processor, rows, 4, batch_size=8, seed=0, progress=False, max_new_tokens=6,
                             temperature=1.0, top_p=1.0)
    assert len(samples) == len(rows) == 12 and all(len(s) == 4 for s in samples)
    # A dataset whose reference is the model's first sample (row 0: an answer it never gives), as JSONL + PNG.
    (tmp_path / "img").mkdir()
    references = ["never sampled"] + [s[0] for s in samples[1:]]
    with open(tmp_path / "own.jsonl", "w") as f:
        for i, (row, reference) in enumerate(zip(rows, references)):
            row["image"].save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"images": [f"img/{i}.png"], "question": row["question"], "answer": reference,
                                "domain": row["domain"]}) + "\n")
    stats = run(lab, tmp_path / "out", *SAMPLING, *EXACT, "--pairs_per_question", "3", "--seed", "0",
                dataset=tmp_path / "own.jsonl")
    pairs = read_pairs(tmp_path / "out")
    expected = []  # the rule, from the samples: correct ones in sample order, wrong ones in sample order
    for i, answers in enumerate(samples):
        unique = list(dict.fromkeys(answers))
        good = [a for a in unique if exact_match(a, references[i]) == 1.0]
        bad = [a for a in unique if exact_match(a, references[i]) < 1.0]
        if good and bad:
            expected += [(i, good[k % len(good)], bad[k % len(bad)]) for k in range(min(3, max(len(good), len(bad))))]
    assert [(p["question_index"], text(p["chosen"]), text(p["rejected"])) for p in pairs] == expected
    assert len(expected) > len({i for i, _, _ in expected}) > 5  # several questions, some with more than one pair
    for p in pairs:  # re-scored from the file: chosen correct, rejected not, both sampled by the model
        reference = references[p["question_index"]]
        assert score("exact_match", text(p["chosen"]), reference) >= 1.0 > score("exact_match", text(p["rejected"]),
                                                                                 reference)
        assert {text(p["chosen"]), text(p["rejected"])} <= set(samples[p["question_index"]])
        assert p["chosen_source"] == "sample" and p["images"] == [f"images/q{p['question_index']:06d}.png"]
    assert stats["no_correct"] >= 1 and stats["reference_as_chosen"] == 0 and stats["pairs"] == len(pairs)
    assert stats["questions"] == 12 and stats["questions_with_pairs"] == len({i for i, _, _ in expected})
    for domain, entry in stats["per_domain"].items():  # per-domain yield, from the file and the samples
        indices = [i for i, r in enumerate(rows) if r["domain"] == domain]
        assert entry["questions"] == len(indices) == 2 and entry["metric"] == "exact_match"
        assert entry["pairs"] == sum(p["domain"] == domain for p in pairs)
        assert entry["yield"] == len({i for i, _, _ in expected if i in indices}) / 2
        assert entry["correct_samples"] == sum(exact_match(a, references[i]) for i in indices for a in samples[i])
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats
    # train.dpo's loader reads the folder as written: images decoded, prompts / answers as TRL's conversations
    data = load_preference_data(str(tmp_path / "out" / "preferences.jsonl"))
    assert len(data) == len(pairs) and data[0]["images"][0].size == rows[pairs[0]["question_index"]]["image"].size
    assert data[0]["prompt"][0]["content"][1]["text"] == rows[pairs[0]["question_index"]]["question"]


def test_reference_fallback_threshold_and_same_seed_same_bytes(lab, tmp_path):
    from train.evaluate import load_rows

    rows = load_rows(str(lab / "data"), "train")
    first = run(lab, tmp_path / "a", *SAMPLING, *LAB, "--reference_as_chosen", "--pairs_per_question", "2")
    again = run(lab, tmp_path / "b", *SAMPLING, *LAB, "--reference_as_chosen", "--pairs_per_question", "2")
    for name in ["preferences.jsonl", "stats.json"] + [f"images/{p.name}" for p in (tmp_path / "a/images").iterdir()]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first == again
    other = run(lab, tmp_path / "c", *SAMPLING, *LAB, "--reference_as_chosen", "--pairs_per_question", "2",
                "--seed", "1")
    assert (tmp_path / "c/preferences.jsonl").read_bytes() != (tmp_path / "a/preferences.jsonl").read_bytes()
    assert other["questions"] == 12
    pairs = read_pairs(tmp_path / "a")
    metrics = first["settings"]["metrics"]
    assert metrics == {"chart": "relaxed_accuracy", "document": "anls", "general": "exact_match", "math": "mathvista",
                       "ocr": "ocrbench", "table": "exact_match"}
    from chimera_mixpert.preferences import score_answer

    for p in pairs:  # re-scored with each domain's metric (MathVista with its choices / answer type)
        row = rows[p["question_index"]]
        metric = metrics[row["domain"]]
        assert score_answer(row, text(p["chosen"]), metric) >= 1.0 > score_answer(row, text(p["rejected"]), metric)
        if p["chosen_source"] == "reference":
            assert text(p["chosen"]) == row["answer"]
    fallbacks = {p["question_index"] for p in pairs if p["chosen_source"] == "reference"}
    assert first["reference_as_chosen"] == len(fallbacks) > 0 and first["reference_below_threshold"] == 0
    assert first["questions_with_pairs"] == first["questions"] - first["all_correct"]  # nothing lost to no_correct
    # --threshold 0.0: every sample is correct, so no question gives a pair
    none = run(lab, tmp_path / "d", *SAMPLING, *LAB, "--threshold", "0.0")
    assert none["pairs"] == 0 and none["all_correct"] == 12 and none["sample_accuracy"] == 1.0
    assert (tmp_path / "d/preferences.jsonl").read_text() == ""
    # one sample per question is enough when the reference is the chosen answer
    single = run(lab, tmp_path / "e", *SAMPLING, *LAB, "--num_samples", "1", "--reference_as_chosen",
                 "--pairs_per_question", "3")
    # a lone sample is either correct (no pair) or wrong (paired with the reference)
    assert single["samples"] == single["questions"] == 12 and single["no_correct"] == 0
    assert single["pairs"] == single["questions_with_pairs"] == single["reference_as_chosen"]
    assert single["pairs"] == 12 - single["all_correct"]
    assert all(p["chosen_source"] == "reference" for p in read_pairs(tmp_path / "e"))


def test_the_written_pairs_train_with_train_dpo(lab, tmp_path):
    import train.dpo

    run(lab, tmp_path / "pairs", *SAMPLING, *LAB, "--reference_as_chosen", "--limit", "6")
    config = ROOT / "train" / "configs" / "tiny" / "chimera_dpo.yaml"
    trainer = train.dpo.main(*train.dpo.make_parser().parse_args_and_config([
        "--config", str(config), "--model_name_or_path", str(lab / "model"), "--output_dir", str(tmp_path / "dpo"),
        "--train_file", str(tmp_path / "pairs" / "preferences.jsonl"), "--max_steps", "1", "--save_strategy", "no"]))
    assert trainer.state.global_step == 1
    assert any(h.get("rewards/accuracies") is not None for h in trainer.state.log_history)


@pytest.mark.parametrize("flags, error, match", [
    (["--num_samples", "1"], ValueError, "one sample cannot be both .* or pass --reference_as_chosen"),
    (["--num_samples", "0", "--reference_as_chosen"], ValueError, "--num_samples must be >= 1, got 0"),
    (["--threshold", "1.5"], ValueError, r"--threshold must be in \[0, 1\]"),
    (["--temperature", "0"], ValueError, "--temperature must be > 0 for sampling"),
    (["--top_p", "0"], ValueError, r"--top_p must be in \(0, 1\]"),
    (["--pairs_per_question", "0"], ValueError, "--pairs_per_question must be >= 1"),
    (["--metric", "table"], ValueError, "expected DOMAIN=METRIC with METRIC one of"),
])
def test_bad_flags_are_refused_before_loading(lab, tmp_path, flags, error, match):
    with pytest.raises(error, match=match):
        run(lab, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_bad_data_and_an_existing_output_are_refused(lab, tmp_path):
    rows = [{"images": ["a.png"], "question": "What?", "answer": "1", "domain": "chart"}]
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "no_domain.jsonl").write_text(json.dumps({k: v for k, v in rows[0].items() if k != "domain"}) + "\n")
    with pytest.raises(ValueError, match=r"no_domain.jsonl, row 0: missing \['domain'\]"):
        run(lab, tmp_path / "out", dataset=tmp_path / "no_domain.jsonl")
    (tmp_path / "chrat.jsonl").write_text(json.dumps({**rows[0], "domain": "chrat"}) + "\n")
    with pytest.raises(ValueError, match=r"domain 'chrat' \(rows \[0\]\) is not one of .*--metric chrat=METRIC"):
        run(lab, tmp_path / "out", dataset=tmp_path / "chrat.jsonl")
    stats = run(lab, tmp_path / "out", *SAMPLING, "--metric", "chrat=exact_match", dataset=tmp_path / "chrat.jsonl")
    assert stats["per_domain"]["chrat"]["metric"] == "exact_match" and stats["questions"] == 1
    with pytest.raises(FileExistsError, match="preferences.jsonl already exists: pass --overwrite_output_dir"):
        run(lab, tmp_path / "out", *SAMPLING, dataset=tmp_path / "chrat.jsonl")
    assert run(lab, tmp_path / "out", *SAMPLING, "--metric", "chrat=exact_match", "--overwrite_output_dir",
               dataset=tmp_path / "chrat.jsonl") == stats


def test_overwrite_deletes_the_earlier_runs_outputs_and_keeps_other_files(lab, tmp_path):
    out = tmp_path / "out"
    first = run(lab, out, *SAMPLING, *LAB, "--reference_as_chosen")
    assert first["questions_with_pairs"] > 2  # more questions (images) than the second run can have
    (out / "images" / "notes.txt").write_text("mine")
    second = run(lab, out, *SAMPLING, *LAB, "--reference_as_chosen", "--limit", "2", "--overwrite_output_dir")
    referenced = {p["images"][0] for p in read_pairs(out)}
    assert len(referenced) == second["questions_with_pairs"] <= 2
    written = {f"images/{p.name}" for p in (out / "images").iterdir() if p.suffix == ".png"}
    assert written == referenced  # none of the first run's images is left
    assert (out / "images" / "notes.txt").read_text() == "mine"  # not an output of the command: kept
    assert json.loads((out / "stats.json").read_text())["questions"] == 2
