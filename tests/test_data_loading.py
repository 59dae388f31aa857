"""Local training data: both row formats, clear errors, assistant-only labels and expert labels in batches."""

import json

import pytest
import torch

from chimera_mixpert.data.collators import VisionLanguageSFTCollator, make_domain_labels
from chimera_mixpert.data.loading import load_vl_dataset
from chimera_mixpert.tiny import FAMILIES, build_tiny_chimera, build_tiny_mixpert, random_images


def write(folder, name, rows, images=3):
    for i, image in enumerate(random_images(images, seed=1)):
        image.save(folder / f"img{i}.png")
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


HF_ROW = {
    "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                 {"role": "assistant", "content": "a cat"}],
    "images": ["img0.png"], "domain": "table",
}
LLAVA_ROW = {
    "conversations": [{"from": "human", "value": "<image>\nCount?"}, {"from": "gpt", "value": "three"},
                      {"from": "human", "value": "And <image> now?"}, {"from": "gpt", "value": "two"}],
    "image": ["img1.png", "img2.png"], "domain": "general",
}


def test_both_formats_normalise_to_messages_and_absolute_paths(tmp_path):
    hf = load_vl_dataset(write(tmp_path, "hf.jsonl", [HF_ROW]))[0]
    llava = load_vl_dataset(write(tmp_path, "llava.jsonl", [LLAVA_ROW]))[0]
    assert hf["images"] == [str(tmp_path / "img0.png")] and hf["domain"] == "table"
    assert [i["type"] for i in hf["messages"][0]["content"]] == ["image", "text"]
    assert hf["messages"][1]["content"][0]["text"] == "a cat"
    assert [m["role"] for m in llava["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [i["type"] for i in llava["messages"][2]["content"]] == ["text", "image", "text"]
    assert llava["images"] == [str(tmp_path / "img1.png"), str(tmp_path / "img2.png")]


def test_unmarked_images_go_before_the_first_user_text(tmp_path):
    row = {"messages": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "ok"}],
           "images": ["img0.png", "img1.png"]}
    loaded = load_vl_dataset(write(tmp_path, "d.jsonl", [row]))[0]
    assert [i["type"] for i in loaded["messages"][0]["content"]] == ["image", "image", "text"]
    assert loaded["domain"] == ""


def test_parquet_and_image_root(tmp_path):
    import datasets

    (tmp_path / "imgs").mkdir()
    write(tmp_path / "imgs", "unused.jsonl", [HF_ROW])
    datasets.Dataset.from_list([{"conversations": LLAVA_ROW["conversations"][:2], "image": "img0.png",
                                 "domain": "chart"}]).to_parquet(str(tmp_path / "d.parquet"))
    loaded = load_vl_dataset(str(tmp_path / "d.parquet"), image_root=str(tmp_path / "imgs"))[0]
    assert loaded["images"] == [str(tmp_path / "imgs" / "img0.png")]


def test_loading_errors_name_the_file_and_row(tmp_path):
    missing = dict(HF_ROW, images=["nope.png"])
    with pytest.raises(FileNotFoundError, match=r"m.jsonl, row 1: image file not found: .*nope.png"):
        load_vl_dataset(write(tmp_path, "m.jsonl", [HF_ROW, missing]))
    with pytest.raises(ValueError, match=r"row 0: unknown domain 'poetry'; known domains: \['general', 'table'\]"):
        load_vl_dataset(write(tmp_path, "u.jsonl", [dict(HF_ROW, domain="poetry")]), domains=["table", "general"])
    too_many = dict(LLAVA_ROW, image=["img1.png"])
    with pytest.raises(ValueError, match=r"row 0: 2 image markers .* but only 1 image"):
        load_vl_dataset(write(tmp_path, "t.jsonl", [too_many]))
    # Rows without an answer have no label token: a batch of them used to train to NaN weights and exit 0.
    gpt_role = dict(HF_ROW, messages=[HF_ROW["messages"][0], {"role": "gpt", "content": "a cat"}])
    with pytest.raises(ValueError, match=r"g.jsonl, row 1: message 1 has role 'gpt'; `messages` roles are system, "
                                         r"user and assistant \(LLaVA's 'gpt' belongs in `conversations`"):
        load_vl_dataset(write(tmp_path, "g.jsonl", [HF_ROW, gpt_role]))
    for name, messages in (("q.jsonl", HF_ROW["messages"][:1]),
                           ("e.jsonl", [HF_ROW["messages"][0], {"role": "assistant", "content": ""}])):
        with pytest.raises(ValueError, match=r"row 0: no non-empty assistant turn \(the answer to train on\)"):
            load_vl_dataset(write(tmp_path, name, [dict(HF_ROW, messages=messages)]))
    with pytest.raises(ValueError, match="row 0: no non-empty assistant turn"):
        load_vl_dataset(write(tmp_path, "h.jsonl", [dict(LLAVA_ROW, conversations=LLAVA_ROW["conversations"][:1],
                                                         image=["img1.png"])]))
    with pytest.raises(ValueError, match="needs `messages`"):
        load_vl_dataset(write(tmp_path, "x.jsonl", [{"text": "hi"}]))
    with pytest.raises(FileNotFoundError, match="Data file not found"):
        load_vl_dataset(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="must all be .jsonl/.json or all .parquet"):
        load_vl_dataset(write(tmp_path, "a.csv", [HF_ROW]))


@pytest.mark.parametrize("family", FAMILIES)
def test_collator_labels_only_assistant_tokens_and_labels_every_image(family, tmp_path):
    model, processor = build_tiny_chimera(family)
    rows = [load_vl_dataset(write(tmp_path, "a.jsonl", [HF_ROW]))[0],
            load_vl_dataset(write(tmp_path, "b.jsonl", [LLAVA_ROW]))[0]]
    collator = VisionLanguageSFTCollator(processor, make_domain_labels(model.domains))
    batch = collator(rows)
    assert batch["expert_labels"].tolist() == [1, 0, 0]  # table = expert 1; general = no expert, for both images
    decode = processor.tokenizer.decode
    assert decode(batch["input_ids"][0][batch["labels"][0] != -100]) == "a cat<|im_end|>"
    assert decode(batch["input_ids"][1][batch["labels"][1] != -100]) == "three<|im_end|>two<|im_end|>"
    assert not bool((batch["labels"][batch["attention_mask"] == 0] != -100).any())
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.router_loss is not None


def test_collator_forced_label_unknown_domain_and_max_length(tmp_path):
    model, processor = build_tiny_mixpert("llava_onevision", domains=["chart", "table"])
    rows = [load_vl_dataset(write(tmp_path, "a.jsonl", [HF_ROW]))[0]]
    assert VisionLanguageSFTCollator(processor, force_expert_label=2)(rows)["expert_labels"].tolist() == [2]
    labels = make_domain_labels(model.domains)
    assert labels == {"chart": 1, "table": 2, "general": 0, "none": 0, "": -100}
    with pytest.raises(ValueError, match=r"Unknown domain 'table'; this model knows"):
        VisionLanguageSFTCollator(processor, {"chart": 1})(rows)
    with pytest.raises(ValueError, match="more than max_length=10"):
        VisionLanguageSFTCollator(processor, labels, max_length=10)(rows)


def test_collator_patches_templates_without_generation_markers():
    from trl.chat_template_utils import has_generation_markers

    from chimera_mixpert.data.collators import training_chat_template

    _, processor = build_tiny_chimera("qwen2_vl")
    processor.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match=r"no `\{% generation %\}`"):
        training_chat_template(processor)
    _, processor = build_tiny_chimera("qwen2_vl")
    assert has_generation_markers(training_chat_template(processor))
