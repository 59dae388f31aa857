"""Router-only evaluation (train.evaluate_router, Mixpert Table 3), how train.evaluate counts fallbacks, balanced
router data (--router_samples_per_domain) and the all-as-one baseline (Mixpert Table 7) on tiny models and the lab's
synthetic data. Routers are set by hand so that every decision, and so every confusion-matrix entry, is known."""

import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from chimera_mixpert.data.export import export_sft_jsonl
from chimera_mixpert.data.synthetic import build_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "train" / "configs" / "tiny"
DOMAINS = ["chart", "document", "general", "math", "ocr", "table"]  # sorted: the report's row order
MIXPERT_DOMAINS = ["chart", "table", "math"]  # document, general, ocr: no expert (the versatile one)


@pytest.fixture(scope="module")
def lab_data(tmp_path_factory):
    """The lab's synthetic data, 2 validation rows per domain (save_to_disk), and 3 train rows per domain as JSONL."""
    folder = tmp_path_factory.mktemp("lab")
    data = build_dataset({"train": 3, "validation": 2, "test": 0}, mixed=0, seed=0, image_size=32)
    # Only the non-empty split: `load_from_disk` fails on a saved split with no rows (datasets' own IndexError).
    datasets.DatasetDict(validation=data["validation"]).save_to_disk(str(folder / "data"))
    export_sft_jsonl(data["train"], str(folder), "sft")
    return folder


@pytest.fixture(scope="module")
def mixpert_dir(tmp_path_factory):
    """A tiny Mixpert over chart / table / math whose router scores every image [0.5, 0.3, 0.2]: top class chart,
    top-1 minus top-2 = 0.2."""
    from chimera_mixpert.tiny import build_tiny_mixpert

    model, processor = build_tiny_mixpert("internvl", MIXPERT_DOMAINS, image_size=32, patch_size=8, seed=0,
                                          generalist_kwargs={"hidden_size": 32})
    with torch.no_grad():
        model.model.vision_router.fc2.weight.zero_()
        model.model.vision_router.fc2.bias.copy_(torch.tensor([0.5, 0.3, 0.2]).log())
    folder = tmp_path_factory.mktemp("mixpert")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def evaluate_router(*args):
    from train.evaluate_router import main, make_parser

    return main(make_parser().parse_args([str(a) for a in args]))


def column(report, label):
    """Per data domain (sorted), how many of its images went to expert `label`."""
    j = report["labels"].index(label)
    return {d: row[j] for d, row in zip(report["domains"], report["domain_confusion_matrix"])}


def test_mixpert_router_report_counts_argmax_and_fallbacks_separately(lab_data, mixpert_dir, tmp_path):
    common = ["--model_name_or_path", mixpert_dir, "--dataset", lab_data / "data", "--batch_size", 5]
    direct = evaluate_router(*common, "--routing_strategy", "direct", "--output_dir", tmp_path / "direct")
    assert direct["labels"] == ["versatile", "chart", "table", "math"] and direct["domains"] == DOMAINS
    # Every image: top class chart. Rows = true domain, 2 images each, all in the chart column.
    assert direct["domain_confusion_matrix"] == [[0, 2, 0, 0]] * 6
    assert direct["num_images"] == direct["num_rows"] == 12 and direct["num_argmax_scored"] == 6
    assert direct["accuracy"] == direct["argmax_accuracy"] == pytest.approx(2 / 6)  # chart of chart / table / math
    assert direct["routed_to_own_expert_rate"] == pytest.approx(2 / 12) and direct["fallback_rate"] == 0.0
    assert direct["per_domain"]["chart"] == {"target": "chart", "argmax_accuracy": 1.0, "num_rows": 2,
                                             "routed_to_own_expert_rate": 1.0, "fallback_rate": 0.0,
                                             "num_argmax_scored": 2}
    assert direct["per_domain"]["general"]["argmax_accuracy"] is None
    assert direct["per_domain"]["general"]["target"] == "versatile"

    # score_difference: 0.5 - 0.3 < 0.6, so every image falls back to the versatile expert. The router's classification
    # is unchanged (same argmax accuracy); the images of domains without an expert are now where they belong.
    fallback = evaluate_router(*common, "--routing_strategy", "score_difference", "--routing_threshold", 0.6,
                               "--output_dir", tmp_path / "difference")
    assert column(fallback, "versatile") == dict.fromkeys(DOMAINS, 2) and fallback["fallback_rate"] == 1.0
    assert fallback["argmax_accuracy"] == pytest.approx(2 / 6)
    assert fallback["routed_to_own_expert_rate"] == pytest.approx(6 / 12)
    assert fallback["argmax_confusion_matrix"] == direct["argmax_confusion_matrix"]
    assert fallback["routing_strategy"] == "score_difference" and fallback["routing_threshold"] == 0.6
    below = evaluate_router(*common, "--routing_strategy", "score_difference", "--routing_threshold", 0.1,
                            "--output_dir", tmp_path / "below")
    assert column(below, "chart") == dict.fromkeys(DOMAINS, 2) and below["fallback_rate"] == 0.0
    threshold = evaluate_router(*common, "--routing_strategy", "score_threshold", "--routing_threshold", 0.6,
                                "--output_dir", tmp_path / "threshold")
    assert column(threshold, "versatile") == dict.fromkeys(DOMAINS, 2)

    written = json.loads((tmp_path / "difference" / "router_report.json").read_text())
    assert written["domain_confusion_matrix"] == fallback["domain_confusion_matrix"]
    markdown = (tmp_path / "difference" / "router_report.md").read_text()
    assert "Router accuracy: 0.333" in markdown and "Versatile fallback rate: 1.000" in markdown
    assert "| general | 2 | versatile | n/a | 1.000 | 1.000 |" in markdown
    assert (tmp_path / "difference" / "router_confusion.png").stat().st_size > 1000


def test_router_only_decisions_are_the_models_own(lab_data):
    # A random router: evaluate_router's batched router-only path gives, image by image, the decisions and the
    # logits' argmax of the model's own get_image_features.
    from chimera_mixpert.tiny import build_tiny_mixpert
    from train.evaluate import load_rows, prompt_for
    from train.evaluate_router import route_rows

    model, processor = build_tiny_mixpert("internvl", MIXPERT_DOMAINS, image_size=32, patch_size=8, seed=1,
                                          generalist_kwargs={"hidden_size": 32})
    with torch.no_grad():  # sharper scores: some images clear the threshold, some fall back, top classes differ
        model.model.vision_router.fc2.weight.mul_(300.0)
    model.eval()
    rows = load_rows(str(lab_data / "data"), "validation")
    routed = route_rows(model, processor, rows, "mixpert", batch_size=5, routing_strategy="score_difference",
                        routing_threshold=0.1, progress=False)
    inputs = processor(images=[[r["image"]] for r in rows], text=[prompt_for(processor, r["question"]) for r in rows],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], input_ids=inputs["input_ids"],
                                                  routing_strategy="score_difference", routing_threshold=0.1)
    assert routed["expert_index"] == features.expert_index.tolist()
    assert routed["argmax"] == (features.router_logits.argmax(-1) + 1).tolist()
    assert routed["domains"] == [r["domain"] for r in rows]
    assert set(routed["argmax"]) == {1, 2, 3} and set(routed["expert_index"]) == {0, 3}  # top classes and fallbacks


def test_train_evaluate_reports_argmax_accuracy_and_fallbacks_like_evaluate_router(lab_data, mixpert_dir):
    # train.evaluate used to count a versatile fallback as a router error: accuracy 0.5 here instead of 1/3.
    from train.evaluate import evaluate, load_model, load_rows
    from train.evaluate_router import evaluate_router as router_only

    kind, model, processor = load_model(str(mixpert_dir))
    rows = load_rows(str(lab_data / "data"), "validation")
    rule = {"routing_strategy": "score_difference", "routing_threshold": 0.6}
    report = evaluate(model, processor, rows, kind, batch_size=6, max_new_tokens=1, progress=False, **rule)["router"]
    assert report["accuracy"] == pytest.approx(2 / 6) and report["fallback_rate"] == 1.0
    assert report["routed_to_own_expert_rate"] == pytest.approx(0.5) and report["expert_share"] == 0.0
    # The square matrix (rows: target expert, columns: expert used), as before: 6 images target the versatile expert.
    assert report["confusion_matrix"] == [[6, 0, 0, 0], [2, 0, 0, 0], [2, 0, 0, 0], [2, 0, 0, 0]]
    alone = router_only(model, processor, rows, kind, batch_size=5, progress=False, **rule)
    for key in ("accuracy", "routed_to_own_expert_rate", "fallback_rate", "confusion_matrix", "per_domain",
                "domain_confusion_matrix", "domain_argmax_confusion_matrix"):
        assert report[key] == alone[key], key
    oracle = evaluate(model, processor, rows, kind, batch_size=6, max_new_tokens=1, progress=False, oracle=True)
    assert oracle["router"]["routed_to_own_expert_rate"] == 1.0 and oracle["router"]["fallback_rate"] is None
    assert oracle["router"]["accuracy"] == pytest.approx(2 / 6)  # the router's own classification, not forced


def test_chimera_router_report_counts_no_expert_as_a_class(lab_data, tmp_path):
    from chimera_mixpert.tiny import build_tiny_chimera
    from train.evaluate import evaluate, load_model, load_rows

    model, processor = build_tiny_chimera("internvl", {"table": "pix2struct_vision_model", "math": "clip_vision_model"},
                                          image_size=32, patch_size=8)
    with torch.no_grad():
        model.model.router.weight.zero_()  # equal logits: argmax is class 0, "no expert", for every image
    model.save_pretrained(tmp_path / "chimera")
    processor.save_pretrained(tmp_path / "chimera")
    report = evaluate_router("--model_name_or_path", tmp_path / "chimera", "--dataset", lab_data / "data",
                             "--output_dir", tmp_path / "eval")
    assert report["labels"] == ["none", "table", "math"] and column(report, "none") == dict.fromkeys(DOMAINS, 2)
    assert report["num_argmax_scored"] == 12 and report["accuracy"] == pytest.approx(8 / 12)  # 4 domains: no expert
    assert report["routed_to_own_expert_rate"] == report["accuracy"] and report["fallback_rate"] is None
    assert report["per_domain"]["math"]["argmax_accuracy"] == 0.0 and report["per_domain"]["ocr"]["target"] == "none"
    kind, model, processor = load_model(str(tmp_path / "chimera"))
    generated = evaluate(model, processor, load_rows(str(lab_data / "data"), "validation"), kind, batch_size=12,
                         max_new_tokens=1, progress=False)["router"]
    assert generated["domain_confusion_matrix"] == report["domain_confusion_matrix"]
    assert generated["accuracy"] == report["accuracy"]
    with pytest.raises(ValueError, match="apply to Mixpert models only"):
        evaluate_router("--model_name_or_path", tmp_path / "chimera", "--dataset", lab_data / "data",
                        "--routing_strategy", "direct")


def test_evaluate_router_refuses_bad_inputs(lab_data, mixpert_dir, tmp_path):
    from train.evaluate_router import check_router_domains

    from modeling_mixpert import MixpertForConditionalGeneration

    with pytest.raises(ValueError, match=r"--routing_threshold must be in \[0, 1\]"):
        evaluate_router("--model_name_or_path", mixpert_dir, "--dataset", lab_data / "data", "--routing_threshold", 2)
    model = MixpertForConditionalGeneration.from_pretrained(mixpert_dir)
    with pytest.raises(ValueError, match=r"val: domain 'chrat' \(rows \[1\]\) is neither an expert of the model"):
        check_router_domains([{"domain": "chart"}, {"domain": "chrat"}], model, "val")
    native = tmp_path / "native"
    model.model.native.config.save_pretrained(native)  # a config.json of a native model type
    with pytest.raises(ValueError, match="needs a Mixpert or Chimera model"):
        evaluate_router("--model_name_or_path", native, "--dataset", lab_data / "data")


def test_router_samples_per_domain_draws_n_rows_per_domain_by_seed(lab_data, tmp_path, caplog):
    from chimera_mixpert.data.loading import load_vl_dataset
    from chimera_mixpert.training import sample_per_domain

    data = load_vl_dataset(str(lab_data / "sft.jsonl"))
    first, again, other = (sample_per_domain(data, 2, seed=s) for s in (0, 0, 1))
    assert sorted(first["domain"]) == sorted(DOMAINS * 2)
    assert first["messages"] == again["messages"] and first["images"] == again["images"]
    assert first["images"] != other["images"]  # another seed, another draw
    with caplog.at_level("WARNING"):
        everything = sample_per_domain(data, 5, seed=0)
    assert len(everything) == 18 and "has 3 rows, fewer than --router_samples_per_domain 5" in caplog.text
    _, results = run_mixpert("mixpert_router.yaml", "--output_dir", tmp_path, "--num_train_epochs", 1,
                             "--train_file", lab_data / "sft.jsonl", "--router_samples_per_domain", 2)
    assert results["router_rows_per_domain"] == dict.fromkeys(DOMAINS, 2) and results["cached_rows"] == 12


def run_mixpert(config, *overrides):
    from train.mixpert import main, make_parser

    return main(*make_parser().parse_args_and_config(["--config", str(TINY / config), *map(str, overrides)]))


def test_all_as_one_tunes_the_base_models_own_last_layers_and_projector_and_saves_a_native_vlm(lab_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    from chimera_mixpert.tiny import build_tiny_mixpert
    from chimera_mixpert.training import mixpert_groups
    from train.evaluate import main as evaluate, make_parser as evaluate_parser

    six = ["chart", "table", "math", "document", "ocr", "general"]  # the tiny config's domains
    initial = build_tiny_mixpert("internvl", six, image_size=32, patch_size=8, seed=0,
                                 generalist_kwargs={"hidden_size": 32})[0]
    before = {n: p.detach().clone() for n, p in initial.named_parameters()}
    model, results = run_mixpert("mixpert_experts.yaml", "--output_dir", tmp_path, "--domains", "all-as-one",
                                 "--max_steps", 2, "--train_file", lab_data / "sft.jsonl", "--save_strategy", "no")
    versatile = {id(p) for m in mixpert_groups(model)["versatile"] for p in m.parameters()}
    expected = {n for n, p in model.named_parameters() if id(p) in versatile}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == expected and all(n.startswith("model.backbone.") for n in moved)
    assert any(".multi_modal_projector." in n for n in moved) and any(".vision_tower." in n for n in moved)
    expert = sum(p.numel() for p in model.model.vision_experts["chart"].parameters())
    assert results["all-as-one"]["trainable"]["trainable"] == expert  # the size of one domain expert
    assert results["all-as-one"]["rows"] == 18 and results["all-as-one"]["rows_per_domain"] == dict.fromkeys(six, 3)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "internvl"  # a plain native VLM, no routing
    native = AutoModelForImageTextToText.from_pretrained(tmp_path)
    backbone = model.model.backbone.state_dict()
    saved = native.state_dict()
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in backbone.items())
    assert torch.equal(saved["lm_head.weight"], model.lm_head.weight)
    report = evaluate(evaluate_parser().parse_args(["--model_name_or_path", str(tmp_path), "--dataset",
                                                    str(lab_data / "data"), "--split", "validation",
                                                    "--max_new_tokens", "2", "--output_dir", str(tmp_path / "eval")]))
    assert report["model_kind"] == "native" and "router" not in report
    assert report["num_samples"] == 12 and set(report["per_domain"]) == set(DOMAINS)
    assert all(0.0 <= e["score"] <= 1.0 and not math.isnan(e["score"]) for e in report["per_domain"].values())


@pytest.mark.parametrize("flags", [["--domains", "all-as-one", "chart"],
                                   ["--phase", "router", "--domains", "all-as-one"]])
def test_all_as_one_stands_alone_in_the_experts_phase(flags, tmp_path):
    with pytest.raises(ValueError, match=r"--domains all-as-one \(Mixpert Table 7's baseline.*stands alone"):
        run_mixpert("mixpert_experts.yaml", "--output_dir", tmp_path, *flags)


def test_train_evaluate_counts_sub_image_tiles_like_evaluate_router(lab_data, tmp_path):
    # A sub_image Mixpert routes each of an image's tiles on its own (32 px images, 16 px tiles: several per image).
    # train.evaluate used to fail after generating everything; now each tile counts with its image's domain.
    from chimera_mixpert.tiny import build_tiny_mixpert
    from train.evaluate import load_rows, main as evaluate, make_parser, prompt_for

    model, processor = build_tiny_mixpert("internvl", MIXPERT_DOMAINS, seed=1, routing_granularity="sub_image",
                                          routing_strategy="direct")
    with torch.no_grad():  # a sharp random router: tiles of one image go to different experts
        model.model.vision_router.fc2.weight.mul_(300.0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = ["--model_name_or_path", tmp_path / "model", "--dataset", lab_data / "data", "--split", "validation"]
    report = evaluate(make_parser().parse_args([str(a) for a in [*common, "--batch_size", 5, "--max_new_tokens", 2,
                                                                 "--output_dir", tmp_path / "eval"]]))
    alone = evaluate_router(*common, "--batch_size", 4, "--output_dir", tmp_path / "router")
    router = report["router"]
    for key in ("accuracy", "num_rows", "num_argmax_scored", "routed_to_own_expert_rate", "fallback_rate",
                "expert_share", "confusion_matrix", "argmax_confusion_matrix", "domain_confusion_matrix",
                "domain_argmax_confusion_matrix", "per_domain", "domains", "labels"):
        assert router[key] == alone[key], key
    assert router["routing_granularity"] == "sub_image"

    # The decisions themselves, from the model's own get_image_features: one per tile, with its image's domain.
    rows = load_rows(str(lab_data / "data"), "validation")
    inputs = processor(images=[[r["image"]] for r in rows], text=[prompt_for(processor, r["question"]) for r in rows],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], input_ids=inputs["input_ids"])
    tiles = features.routed_image.tolist()
    assert len(tiles) == router["num_rows"] > len(rows) and sorted(set(tiles)) == list(range(len(rows)))
    expected = [[0] * 4 for _ in DOMAINS]
    for image, expert in zip(tiles, features.expert_index.tolist()):
        expected[DOMAINS.index(rows[image]["domain"])][expert] += 1
    assert router["domain_confusion_matrix"] == expected
    assert any(len({e for i, e in zip(tiles, features.expert_index.tolist()) if i == image}) > 1
               for image in range(len(rows)))  # some image's tiles really went to different experts

    # The report keeps its scores (and is written), router block included.
    assert report["num_samples"] == 12 and set(report["per_domain"]) == set(DOMAINS)
    assert all(e["num_samples"] == 2 and 0.0 <= e["score"] <= 1.0 for e in report["per_domain"].values())
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written["router"]["domain_confusion_matrix"] == expected and written["per_domain"] == report["per_domain"]
    assert f"of {len(tiles)} router decisions have a router class" in (tmp_path / "eval" / "report.md").read_text()


def _save_mixpert(folder, **mixpert_kwargs):
    """The tiny config's Mixpert (six domains, 32 px images, 8 px patches), with `mixpert_kwargs`, saved."""
    from chimera_mixpert.tiny import build_tiny_mixpert

    six = ["chart", "table", "math", "document", "ocr", "general"]
    model, processor = build_tiny_mixpert("internvl", six, image_size=32, patch_size=8, seed=0,
                                          generalist_kwargs={"hidden_size": 32}, **mixpert_kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def test_all_as_one_without_expert_projectors_leaves_the_projector_frozen(lab_data, tmp_path):
    # expert_projector=False: domain experts share the base projector and never tune it, so neither does the baseline.
    initial = _save_mixpert(tmp_path / "upcycled", expert_projector=False)
    before = {n: p.detach().clone() for n, p in initial.named_parameters()}
    expert = sum(p.numel() for p in initial.model.vision_experts["chart"].parameters())
    model, results = run_mixpert("mixpert_experts.yaml", "--output_dir", tmp_path / "run", "--domains", "all-as-one",
                                 "--model_name_or_path", tmp_path / "upcycled", "--max_steps", 2,
                                 "--train_file", lab_data / "sft.jsonl", "--save_strategy", "no")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(n.startswith("model.backbone.") for n in moved)
    assert any(".vision_tower." in n for n in moved) and not any(".multi_modal_projector." in n for n in moved)
    projector = sum(p.numel() for p in model.model.backbone.multi_modal_projector.parameters())
    layers = {n for n, p in model.named_parameters() if n.startswith("model.backbone.vision_tower.")}
    assert sum(dict(model.named_parameters())[n].numel() for n in moved) == expert  # every expert weight moved
    assert projector > 0 and moved <= layers
    result = results["all-as-one"]
    assert result["trainable_parameters"] == result["domain_expert_trainable_parameters"] == expert
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["results"]["all-as-one"]["trainable_parameters"] == expert
    assert summary["results"]["all-as-one"]["domain_expert_trainable_parameters"] == expert


def test_all_as_one_refuses_lora_experts_naming_both_sizes(lab_data, tmp_path):
    model = _save_mixpert(tmp_path / "upcycled", expert_adapter="lora", expert_lora_rank=4)
    lora = sum(p.numel() for p in model.model.vision_experts["chart"].parameters())
    full = _save_mixpert(tmp_path / "full")
    versatile = sum(p.numel() for p in full.model.vision_experts["chart"].parameters())
    assert lora < versatile
    message = (rf"--domains all-as-one needs full experts, but this Mixpert has expert_adapter='lora': one domain "
               rf"expert trains {lora} parameters .* \({versatile}\).*--expert_adapter full")
    with pytest.raises(ValueError, match=message):
        run_mixpert("mixpert_experts.yaml", "--output_dir", tmp_path / "run", "--domains", "all-as-one",
                    "--model_name_or_path", tmp_path / "upcycled", "--train_file", lab_data / "sft.jsonl")
    assert not (tmp_path / "run" / "config.json").exists()
