"""The rendered model card parses on the Hub's terms; `pipeline("image-text-to-text")` runs both models."""

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import pipeline

from chimera_mixpert.model_card import main as render_main, make_parser
from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert, random_images

REPORT = {
    "dataset": "synthetic-six-domain", "split": "test", "num_samples": 20,
    "per_domain": {"chart": {"metric": "relaxed_accuracy", "score": 0.5, "num_samples": 10},
                   "table": {"metric": "teds", "score": 0.75, "num_samples": 10}},
    "router": {"accuracy": 0.95},
}


@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_model_card_renders_and_parses_with_model_index(kind, tmp_path):
    import json

    model, processor = build_tiny_chimera("internvl") if kind == "chimera" else build_tiny_mixpert("internvl")
    model.save_pretrained(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    out = render_main(make_parser().parse_args([
        "--model_dir", str(tmp_path), "--report", str(tmp_path / "report.json"), "--repo_id", f"org/{kind}-tiny",
        "--base_model", "OpenGVLab/InternVL3-1B-hf", "--dataset", "org/synthetic",
    ]))
    card = ModelCard.load(out)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.license == "apache-2.0" and data.base_model == ["OpenGVLab/InternVL3-1B-hf"]
    assert kind in data.tags and data.datasets == ["org/synthetic"]
    results = {(r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("chart", "relaxed_accuracy"): 0.5, ("table", "teds"): 0.75, ("routing", "accuracy"): 0.95}
    text = card.text
    for section in ("## Uses", "## How to Get Started", "## Training Details", "## Evaluation",
                    "## Bias, Risks, and Limitations", "## Citation", "2412.05983", "2505.24541", f"org/{kind}-tiny"):
        assert section in text, section
    assert "{{" not in card.content  # every template variable was filled


def test_model_card_without_report_says_so(tmp_path):
    model, _ = build_tiny_mixpert("qwen2_vl")
    model.save_pretrained(tmp_path)
    card = ModelCard.load(render_main(make_parser().parse_args(["--model_dir", str(tmp_path)])))
    assert card.data.eval_results is None and "Not evaluated yet" in card.text


@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_pipeline_runs_chat_messages_with_images(kind, tmp_path):
    model, processor = build_tiny_chimera("qwen2_vl") if kind == "chimera" else build_tiny_mixpert("qwen2_vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    assert type(pipe.model).__name__ == ("ChimeraForConditionalGeneration" if kind == "chimera"
                                         else "MixpertForConditionalGeneration")
    image = random_images(1)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is shown?"}]}]
    out = pipe(text=messages, max_new_tokens=3, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    # The same answer as calling generate() directly on the processor's inputs.
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        direct = pipe.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = processor.batch_decode(direct[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert reply["content"] == expected
