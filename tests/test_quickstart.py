"""The mini-lab end to end at toy size, and the evaluation CLI on its outputs."""

import json

import pytest

from train.quickstart import SCALES, claims, main, make_parser


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    results = main(make_parser().parse_args(["--output_dir", str(folder), "--scale", "toy"]))
    return folder, results


def test_toy_quickstart_writes_the_full_report(toy_run):
    folder, results = toy_run
    report = json.loads((folder / "report.json").read_text())
    domains = {"chart", "table", "math", "document", "ocr", "general"}
    assert set(report["generalist"]["per_domain"]) == domains == set(report["chimera"]["per_domain"])
    assert set(report["mixpert"]["per_domain"]) == domains
    assert all(set(v) == {"joint", "mixpert"} for v in report["mixpert"]["per_domain"].values())
    assert set(report["mixpert"]["routing"]) == {"direct", "score_threshold", "score_difference"}
    assert 0.0 <= report["chimera"]["router_accuracy"] <= 1.0 and 0.0 <= report["mixpert"]["router_accuracy"] <= 1.0
    assert report["chimera"]["gscm_attention"]["with_gscm"] > 0
    assert set(report["dpo"]["preference_accuracy"]) == {"before", "after"}
    assert [c["claim"] for c in report["claims"]][0].startswith("Chimera router accuracy")
    assert report["metrics"] == {"chart": "relaxed_accuracy", "table": "exact_match", "math": "mathvista",
                                 "document": "anls", "ocr": "ocrbench", "general": "exact_match"}
    for name in ("report.md", "chimera_vs_generalist.png", "mixpert_vs_joint.png", "chimera_router_confusion.png",
                 "eval/chimera/router_confusion.png", "eval/generalist/per_domain.png"):
        assert (folder / name).is_file(), name
    assert report["timings_seconds"]["total"] > 0
    n_test = SCALES["toy"].test_per_domain * 6
    assert json.loads((folder / "eval" / "chimera" / "report.json").read_text())["num_samples"] == n_test


def test_claims_are_judged_from_the_numbers_not_assumed():
    base = {
        "chimera": {"router_accuracy": 0.96, "gscm_attention_ratio": 1.2},
        "mixpert": {"per_domain": {"chart": {"joint": 0.5, "mixpert": 0.4}, "ocr": {"joint": 0.1, "mixpert": 0.3}},
                    "routing": {"direct": 0.3, "score_threshold": 0.2, "score_difference": 0.3}},
        "dpo": {"preference_accuracy": {"before": 0.5, "after": 0.5}},
    }
    held = {c["claim"].split(" ")[0] + c["claim"].split(" ")[1]: c["held"] for c in claims(base)}
    assert held == {"Chimerarouter": True, "GSCMraises": False, "Mixpert>=": False, "score-differencerouting": True,
                    "DPOraises": False}
    assert claims(base)[2]["note"] == "lower on ['chart']"


def test_evaluate_cli_on_a_saved_model(toy_run, tmp_path):
    from train.evaluate import main as evaluate, make_parser as evaluate_parser

    folder, _ = toy_run
    report = evaluate(evaluate_parser().parse_args([
        "--model_name_or_path", str(folder / "mixpert"), "--dataset", str(folder / "data"), "--split", "mixed",
        "--routing_strategy", "direct", "--output_dir", str(tmp_path), "--metric", "table=exact_match",
    ]))
    assert report["split"] == "mixed" and report["model_kind"] == "mixpert"
    assert len(report["router"]["confusion_matrix"]) == 7  # versatile + 6 domains
    assert (tmp_path / "report.md").read_text().startswith("# mixpert mixpert")
    streamed = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in streamed] == [p["prediction"] for p in report["predictions"]]
    with pytest.raises(ValueError, match=r"--routing_threshold must be in \[0, 1\]"):
        evaluate(evaluate_parser().parse_args(["--model_name_or_path", str(folder / "mixpert"), "--dataset",
                                               str(folder / "data"), "--routing_threshold", "1.5"]))
    with pytest.raises(ValueError, match="Mixpert models only"):
        evaluate(evaluate_parser().parse_args(["--model_name_or_path", str(folder / "joint"), "--dataset",
                                               str(folder / "data"), "--routing_strategy", "direct"]))


def test_evaluate_cli_oracle_forces_each_domains_expert(toy_run, tmp_path):
    from train.evaluate import main as evaluate, make_parser as evaluate_parser

    folder, _ = toy_run
    args = ["--dataset", str(folder / "data"), "--split", "test", "--output_dir", str(tmp_path), "--oracle"]
    report = evaluate(evaluate_parser().parse_args(["--model_name_or_path", str(folder / "chimera-stage2"), *args]))
    assert report["experts"] == "oracle" and report["router"]["routed_to_own_expert_rate"] == 1.0
    expert_domains = set(report["router"]["labels"][1:])
    expected = sum(p["domain"] in expert_domains for p in report["predictions"]) / report["num_samples"]
    assert report["router"]["expert_share"] == pytest.approx(expected) and 0 < expected < 1
    assert "oracle experts" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="--oracle needs a Chimera or Mixpert model"):
        evaluate(evaluate_parser().parse_args(["--model_name_or_path", str(folder / "joint"), *args]))
    with pytest.raises(ValueError, match="expected DOMAIN=METRIC with METRIC one of"):
        evaluate(evaluate_parser().parse_args(["--model_name_or_path", str(folder / "chimera-stage2"), *args,
                                               "--metric", "table"]))


def test_evaluation_refuses_domains_outside_the_vocabulary(toy_run):
    # Mixpert's old default domain `doc` was scored by exact match and never routed, silently (one vocabulary now).
    from evaluation.metrics import DEFAULT_DOMAIN_METRICS, DOMAINS
    from modeling_mixpert import MixpertForConditionalGeneration
    from train.evaluate import check_domains, score_rows

    folder, _ = toy_run
    assert DOMAINS == ("chart", "table", "math", "document", "ocr", "general") == tuple(DEFAULT_DOMAIN_METRICS)
    model = MixpertForConditionalGeneration.from_pretrained(folder / "mixpert")
    rows = [{"domain": "chart", "answer": "1"}, {"domain": "chrat", "answer": "1"}]
    with pytest.raises(ValueError, match=r"lab: domain 'chrat' \(rows \[1\]\) is not one of .*--metric chrat=METRIC"):
        check_domains(rows, "mixpert", model, dataset_name="lab")
    check_domains(rows, "mixpert", model, {"chrat": "exact_match"})  # named metric: accepted
    with pytest.raises(KeyError):
        score_rows(rows, ["1", "1"])  # never a silent exact-match fallback
    model.config.domains = ["chart", "doc"]
    with pytest.raises(ValueError, match=r"The model's domains \['doc'\] are not in the domain vocabulary"):
        check_domains(rows[:1], "mixpert", model)
    assert MixpertForConditionalGeneration.config_class().domains == ["chart", "document", "math", "ocr", "general"]


def test_a_malformed_prediction_scores_zero_with_a_warning_instead_of_losing_the_report(caplog):
    from train.evaluate import score_rows

    table = "<table><tr><td>1</td></tr></table>"
    rows = [{"domain": "table", "answer": "1", "html": table}] * 2
    with caplog.at_level("WARNING"):
        scores = score_rows(rows, [table, '<table><tr><td colspan="x">1</td></tr></table>'])
    assert scores["table"]["score"] == 0.5 and scores["table"]["num_samples"] == 2
    assert "row 1 (table, teds)" in caplog.text and "it scores 0" in caplog.text


def test_expert_token_ablation_on_the_toy_lab(toy_run):
    """bench.chimera_expert_tokens: the assembled Chimera with no expert answers exactly as the generalist it wraps,
    and an expert block masked from attention changes no answer (its tokens' positions alone do nothing)."""
    from bench.chimera_expert_tokens import main as ablation, make_parser as ablation_parser

    folder, _ = toy_run
    out = ablation(ablation_parser().parse_args(["--lab", str(folder), "--stages", "chimera-router"]))
    answers = out["answers"]
    assert out["assembled_identical_to_joint"] and answers["assembled, no expert"] == answers["joint"]
    assert answers["chimera-router, experts masked"] == answers["chimera-router, no expert"]
    assert len(answers["joint"]) == len(out["scores"]["joint"]) * 3  # the toy lab: 3 test images per domain
    assert set(out["scores"]) == {"joint", "assembled, no expert", "chimera-router, no expert",
                                  "chimera-router, experts", "chimera-router, experts masked",
                                  "chimera-router, experts zeroed"}
