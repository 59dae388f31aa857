"""The mini-lab end to end at toy size, and the evaluation CLI on its outputs."""

import dataclasses
import json
import os
import platform

import pytest

from train.quickstart import SCALES, claim_values, claims, main, make_parser, summarize_seeds, write_seeds_report


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
    assert set(report["dpo"]["preference_accuracy"]) == {"before", "after", "control"}
    for control in ("generalist_control", "chimera_no_gscm", "mixpert_control"):
        assert set(report[control]["per_domain"]) == domains, control
    assert report["test_per_domain"] == {d: SCALES["toy"].test_per_domain for d in domains}
    assert [c["key"] for c in report["claims"]] == [
        "chimera_router", "chimera_vs_control", "chimera_vs_generalist", "gscm_attention_ratio", "mixpert_vs_control",
        "mixpert_vs_control_worst", "mixpert_router", "routing", "dpo_vs_control"]
    assert report["metrics"] == {"chart": "relaxed_accuracy", "table": "exact_match", "math": "mathvista",
                                 "document": "anls", "ocr": "ocrbench", "general": "exact_match"}
    for name in ("report.md", "chimera_vs_generalist.png", "chimera_vs_control.png", "mixpert_vs_joint.png",
                 "mixpert_vs_control.png", "chimera_router_confusion.png", "eval/chimera/router_confusion.png",
                 "eval/generalist/per_domain.png", "eval/generalist-control/report.json",
                 "eval/mixpert-control/report.json", "eval/chimera-no-gscm/report.json",
                 "generalist-control/config.json", "mixpert-control/config.json", "chimera-sft-chosen/config.json"):
        assert (folder / name).is_file(), name
    # The controls: the native model continued as Chimera's stages train it, the all-as-one model as long as all the
    # domain experts together, the same DPO run with TRL's SFT loss.
    cfg = SCALES["toy"]

    def summary(name):
        return json.loads((folder / name / "run_summary.json").read_text())

    assert json.loads((folder / "generalist-control" / "config.json").read_text())["model_type"] == "internvl"
    assert summary("generalist-control-stage1")["groups"] == ["projector"]
    assert summary("generalist-control")["groups"] == ["projector", "llm"]
    assert summary("generalist-control")["global_step"] == cfg.stage2_steps == summary("chimera-stage2")["global_step"]
    assert summary("generalist-control-stage1")["global_step"] == cfg.stage1_steps
    mixpert_control = summary("mixpert-control")
    assert json.loads((folder / "mixpert-control" / "config.json").read_text())["model_type"] == "internvl"
    assert mixpert_control["domains"] == "all-as-one" and mixpert_control["global_step"] == cfg.mixpert_expert_steps * 6
    assert summary("chimera-sft-chosen")["loss_type"] == ["sft"] and summary("chimera-dpo")["loss_type"] == ["sigmoid"]
    assert summary("chimera-sft-chosen")["groups"] == summary("chimera-dpo")["groups"] == ["llm"]
    # Each routing rule is applied to its own evaluation (the direct rule sends every image to a domain expert).
    share = report["mixpert"]["routing_expert_share"]
    assert share["direct"] == 1.0 and share["score_difference"] < 1.0
    assert report["timings_seconds"]["total"] > 0
    assert report["kernels"]["mode"] == "native" and report["kernels"]["threads"] >= 1
    assert "Kernels: native (" in (folder / "report.md").read_text()
    n_test = SCALES["toy"].test_per_domain * 6
    assert json.loads((folder / "eval" / "chimera" / "report.json").read_text())["num_samples"] == n_test


def _results(router=0.96, chimera=0.5, control=0.4, generalist=0.45, gscm=1.2, mixpert=(0.4, 0.3),
             mixpert_control=0.35, routing=(0.3, 0.3), dpo=(0.5, 0.6, 0.55)):
    """A lab's results with the numbers the claims and the report read. Mixpert scores `mixpert[0]` on the first
    three domains, `mixpert[1]` on the last three."""
    domains = ("chart", "table", "math", "document", "ocr", "general")

    def scores(value):
        return {"per_domain": dict.fromkeys(domains, value)}

    return {
        "chimera": {"router_accuracy": router, "gscm_attention_ratio": gscm, **scores(chimera)},
        "generalist": scores(generalist), "generalist_control": scores(control), "chimera_no_gscm": scores(0.0),
        "mixpert": {"router_accuracy": 0.92,
                    "per_domain": {d: {"joint": 0.0, "mixpert": mixpert[i // 3]} for i, d in enumerate(domains)},
                    "routing": {"direct": routing[0], "score_threshold": 0.0, "score_difference": routing[1]}},
        "mixpert_control": scores(mixpert_control),
        "dpo": {"preference_accuracy": dict(zip(("before", "after", "control"), dpo))},
    }


def test_claims_are_judged_from_the_numbers_not_assumed():
    values = claim_values(_results())
    assert values["chimera_vs_control"] == pytest.approx(0.1)
    assert values["chimera_vs_generalist"] == pytest.approx(0.05)
    assert values["mixpert_vs_control"] == 0.0  # +0.05 and -0.05: a tie, exactly (no rounding residue)
    assert values["mixpert_vs_control_worst"] == pytest.approx(-0.05)
    assert values["dpo_vs_control"] == pytest.approx(0.05) and values["routing"] == 0.0
    held = {c["key"]: c["held"] for c in claims(_results())}
    assert held == {"chimera_router": True, "chimera_vs_control": True, "chimera_vs_generalist": True,
                    "gscm_attention_ratio": False, "mixpert_vs_control": False, "mixpert_vs_control_worst": False,
                    "mixpert_router": True, "routing": True, "dpo_vs_control": True}
    # ">" needs a gain, ">=" accepts a tie
    assert {c["key"]: c["held"] for c in claims(_results(chimera=0.4))}["chimera_vs_control"] is False
    assert {c["key"]: c["held"] for c in claims(_results(chimera=0.45))}["chimera_vs_generalist"] is True


def test_claims_over_seeds_are_judged_on_the_mean_with_its_spread(tmp_path):
    per_seed = {0: _results(router=0.97, chimera=0.55), 1: _results(router=0.96, chimera=0.35),
                2: _results(router=0.98, chimera=0.45)}
    summary = {c["key"]: c for c in summarize_seeds(per_seed)}
    router = summary["chimera_router"]
    assert router["per_seed"] == {0: 0.97, 1: 0.96, 2: 0.98}
    assert router["mean"] == pytest.approx(0.97) and router["sd"] == pytest.approx(0.01)
    assert router["verdict"] == "yes" and router["held_every_seed"]
    # Chimera - control: +0.15, -0.05, +0.05 -> mean +0.05, sd 0.1: held on the mean, not decided, not every seed
    versus = summary["chimera_vs_control"]
    assert versus["mean"] == pytest.approx(0.05) and versus["sd"] == pytest.approx(0.1)
    assert versus["held"] and versus["verdict"] == "yes (within spread)" and not versus["held_every_seed"]
    assert summary["gscm_attention_ratio"]["verdict"] == "no"  # 1.2 on every seed, sd 0
    report = write_seeds_report(str(tmp_path), per_seed, {0: 10.0, 1: 11.0, 2: 12.0, "all": 33.0})
    assert report["seeds"] == [0, 1, 2] and len(report["claims"]) == 9
    assert report["mean_per_domain"]["chimera"]["chart"] == pytest.approx(0.45)
    text = (tmp_path / "report.md").read_text()
    assert "| Chimera - its control (generalist continued as long), expert domains > 0 | 0.150 | -0.050 | 0.050 | " \
           "0.050 ± 0.100 | yes (within spread) | no |" in text
    assert (tmp_path / "claims.png").stat().st_size > 0 and json.loads((tmp_path / "report.json").read_text())


def test_a_claim_is_undecided_without_two_values_and_a_tie_at_the_target_holds(tmp_path):
    per_seed = {0: _results(gscm=None, routing=(0.3, 0.3)), 1: _results(gscm=1.6), 2: _results(gscm=None)}
    summary = {c["key"]: c for c in summarize_seeds(per_seed)}
    gscm = summary["gscm_attention_ratio"]
    assert gscm["n"] == 1 and gscm["sd"] is None and gscm["verdict"] == "n/a" and not gscm["held"]
    assert summary["routing"]["verdict"] == "yes" and summary["routing"]["sd"] == 0.0  # ">=": a tie holds
    assert summary["chimera_vs_control"]["verdict"] == "yes"  # +0.1 on every seed
    # below the target by less than one sd on one side: "no (within spread)"
    per_seed = {0: _results(router=0.97), 1: _results(router=0.90), 2: _results(router=0.92)}
    assert {c["key"]: c for c in summarize_seeds(per_seed)}["chimera_router"]["verdict"] == "no (within spread)"
    write_seeds_report(str(tmp_path), {0: _results(gscm=None), 1: _results(gscm=1.6)}, {0: 1.0, 1: 1.0, "all": 2.0})
    assert "| GSCM attention on expert tokens, with / without >= 1.5 | n/a | 1.600 | 1.600 | n/a |" in \
        (tmp_path / "report.md").read_text()


def test_seeds_run_the_lab_per_seed_folder_and_reuse_finished_seeds(tmp_path, monkeypatch, capsys):
    import train.quickstart as quickstart

    calls = []

    def fake_run_lab(folder, config):
        calls.append((folder, config.seed))
        results = {**_results(router=0.9 + config.seed / 100), "timings_seconds": {"total": 10.0 + config.seed}}
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "report.json"), "w") as f:
            json.dump({**results, "config": dataclasses.asdict(config)}, f)
        return results

    monkeypatch.setattr(quickstart, "run_lab", fake_run_lab)
    report = main(make_parser().parse_args(["--output_dir", str(tmp_path), "--scale", "toy", "--seeds", "3,5"]))
    assert calls == [(str(tmp_path / "seed-3"), 3), (str(tmp_path / "seed-5"), 5)]
    assert report["timings_seconds"] == {3: 13.0, 5: 15.0, "all": 28.0}
    assert {c["key"]: c for c in report["claims"]}["chimera_router"]["per_seed"] == {3: 0.93, 5: 0.95}
    assert "# Mini-lab report over seeds" in capsys.readouterr().out
    # Rerun: both seeds finished with the same config, so nothing trains again; a changed config retrains.
    calls.clear()
    main(make_parser().parse_args(["--output_dir", str(tmp_path), "--scale", "toy", "--seeds", "3,5"]))
    assert calls == []
    data = json.loads((tmp_path / "seed-5" / "report.json").read_text())
    changed = {**data, "config": {**data["config"], "joint_steps": 1}}
    (tmp_path / "seed-5" / "report.json").write_text(json.dumps(changed))
    main(make_parser().parse_args(["--output_dir", str(tmp_path), "--scale", "toy", "--seeds", "3,5"]))
    assert calls == [(str(tmp_path / "seed-5"), 5)]
    # A report written before --kernels existed (no such key) ran native kernels: reused by a native run only.
    calls.clear()
    data = json.loads((tmp_path / "seed-3" / "report.json").read_text())
    data["config"].pop("kernels")
    (tmp_path / "seed-3" / "report.json").write_text(json.dumps(data))
    main(make_parser().parse_args(["--output_dir", str(tmp_path), "--scale", "toy", "--seeds", "3,5"]))
    assert calls == []


def _weights(folder) -> dict:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.safetensors"))}


def _run_quickstart(argv, env=None):
    import subprocess  # noqa: PLC0415 (only here)
    import sys  # noqa: PLC0415 (only here)

    result = subprocess.run([sys.executable, "-m", "train.quickstart", "--scale", "toy", *argv], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# What the pins leave to the CPU is glibc's choice of libm code: masking AVX, AVX2, FMA and AVX-512 from it (its
# x86-64-v2 level) makes it take the code an older CPU gets.
_OLDER_CPU = {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX,-AVX2,-FMA,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"}


def _glibc_hwcaps_active(env) -> str:
    import subprocess  # noqa: PLC0415 (only here)

    out = subprocess.run(["/lib64/ld-linux-x86-64.so.2", "--list-diagnostics"], capture_output=True, text=True,
                         env={**os.environ, **env}).stdout
    return next(line for line in out.splitlines() if line.startswith("dl_hwcaps_subdirs_active="))


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in {"x86_64", "amd64"}, reason="the pins are x86-64's")
def test_reproducible_kernels_give_the_same_bits_whatever_the_workers_and_the_cpu_features(tmp_path):
    # Two seeds two at a time, then seed 2 alone as on an older CPU (`_OLDER_CPU`, checked to take effect): every
    # weight file of seed 2 and every number of its report are identical.
    assert _glibc_hwcaps_active(_OLDER_CPU) != _glibc_hwcaps_active({}), "glibc ignored the mask"
    _run_quickstart(["--output_dir", str(tmp_path / "pair"), "--seeds", "1,2", "--workers", "2",
                     "--kernels", "reproducible"])
    _run_quickstart(["--output_dir", str(tmp_path / "alone"), "--seed", "2", "--kernels", "reproducible"], _OLDER_CPU)
    pair, alone = _weights(tmp_path / "pair" / "seed-2"), _weights(tmp_path / "alone")
    assert len(pair) > 20 and pair == alone
    reports = [json.loads((folder / "report.json").read_text()) for folder in (tmp_path / "pair" / "seed-2",
                                                                              tmp_path / "alone")]
    for report in reports:
        assert {k: report["kernels"][k] for k in ("mode", "cpu_capability", "threads", "MKL_CBWR",
                                                  "ONEDNN_MAX_CPU_ISA")} == {
            "mode": "reproducible", "cpu_capability": "DEFAULT", "threads": 1, "MKL_CBWR": "COMPATIBLE",
            "ONEDNN_MAX_CPU_ISA": "SSE41"}
        report.pop("kernels"), report.pop("timings_seconds")
    assert reports[0] == reports[1]
    assert _weights(tmp_path / "pair" / "seed-1") != pair  # another seed, other weights
    # The check sees what one kernel changes: with native kernels, ATen's baseline code instead of this CPU's changes
    # the weights' bits.
    _run_quickstart(["--output_dir", str(tmp_path / "native"), "--seed", "2"])
    _run_quickstart(["--output_dir", str(tmp_path / "baseline"), "--seed", "2"], {"ATEN_CPU_CAPABILITY": "default"})
    native = json.loads((tmp_path / "native" / "report.json").read_text())["kernels"]
    assert native["mode"] == "native" and native["cpu_capability"] != "DEFAULT", "x86-64 CPUs since 2013 have AVX2"
    assert _weights(tmp_path / "native").keys() == pair.keys()
    assert _weights(tmp_path / "native") != _weights(tmp_path / "baseline") != pair


def test_workers_need_reproducible_kernels(tmp_path):
    for argv in (["--workers", "2", "--seeds", "1,2"], ["--workers", "2", "--kernels", "reproducible"]):
        with pytest.raises(SystemExit, match="--workers needs --seeds and --kernels reproducible"):
            main(make_parser().parse_args(["--output_dir", str(tmp_path), "--scale", "toy", *argv]))


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers takes a positive integer"),
    (["--kernels", "fast"], "invalid choice: 'fast'"),
    (["--seeds", "0"], "at least two different seeds"),
    (["--seeds", "0,0"], "at least two different seeds"),
    (["--seeds", "0,a"], "integers separated by commas"),
    (["--seed", "1", "--seeds", "0,1"], "not allowed with argument"),
])
def test_bad_seeds_are_refused_naming_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_seeds_parse_in_the_order_given():
    assert make_parser().parse_args(["--seeds", "2,0,1"]).seeds == [2, 0, 1]
    assert make_parser().parse_args([]).seeds is None


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
