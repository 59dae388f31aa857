"""Bad input, grouped by kind: a clear error naming the argument, file or row, or correct behaviour; no code from a
folder runs without the user's consent."""

import json
from pathlib import Path

import pytest

from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert, chat_prompt

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("folder code ran")  # transformers runs a copy in its modules cache: absolute path
from transformers import TokenizersBackend


class EvilTokenizer(TokenizersBackend):  # a subclass: loading it marks this class, not transformers' own, as custom
    pass
"""


def plant(folder: Path) -> Path:
    """A saved model folder whose tokenizer_config.json names a .py file of the folder (`auto_map`)."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(folder / "EXECUTED")))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "EXECUTED"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    for name, (model, processor) in {"chimera": build_tiny_chimera("internvl"),
                                     "mixpert": build_tiny_mixpert("qwen2_vl", ["chart", "table"])}.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root


# ------------------------------------------------------------------------------------------ consent and identity


def test_no_code_from_a_folder_runs_without_trust_remote_code(saved):
    from chimera_mixpert.training import ModelArguments
    from processing_chimera import ChimeraProcessor
    from train.evaluate import load_model

    chimera, mixpert = plant(saved / "chimera"), plant(saved / "mixpert")
    ChimeraProcessor.from_pretrained(saved / "chimera")
    assert load_model(str(saved / "chimera"))[0] == "chimera"
    assert load_model(str(saved / "mixpert"))[0] == "mixpert"
    from train.chimera import ChimeraScriptArguments, load_model_and_processor as load_chimera
    from train.mixpert import MixpertScriptArguments, load_model_and_processor as load_mixpert

    load_chimera(ModelArguments(model_name_or_path=str(saved / "chimera")), ChimeraScriptArguments())
    load_mixpert(ModelArguments(model_name_or_path=str(saved / "mixpert")), MixpertScriptArguments())
    assert not chimera.exists() and not mixpert.exists()
    # The flag is what lets it run (what ChimeraProcessor used to pass itself): the check above can fail.
    ChimeraProcessor.from_pretrained(saved / "chimera", trust_remote_code=True)
    assert chimera.exists()
    chimera.unlink()


def test_scripts_refuse_a_folder_of_the_wrong_model_or_without_config(saved, tmp_path):
    from chimera_mixpert.training import ModelArguments
    from modeling_mixpert import MixpertForConditionalGeneration
    from train.evaluate import load_model
    from train.mixpert import MixpertScriptArguments, load_model_and_processor as load_mixpert

    with pytest.raises(ValueError, match=r"holds a 'chimera' model; train.mixpert trains 'mixpert' models"):
        load_mixpert(ModelArguments(model_name_or_path=str(saved / "chimera")), MixpertScriptArguments())
    with pytest.raises(ValueError, match=r"holds a 'chimera' model, not a 'mixpert' one"):
        MixpertForConditionalGeneration.from_pretrained(saved / "chimera")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        MixpertForConditionalGeneration.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------- resume


def test_resume_last_skips_a_checkpoint_cut_short_by_a_kill(tmp_path):
    from types import SimpleNamespace

    from chimera_mixpert.training import last_complete_checkpoint, resume_checkpoint

    for step, state in ((2, "{}"), (4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-10").write_text("a file, not a checkpoint")
    args = SimpleNamespace(resume_from_checkpoint="last", output_dir=str(tmp_path))
    assert resume_checkpoint(args) == str(tmp_path / "checkpoint-4") == last_complete_checkpoint(str(tmp_path))
    for folder in ("checkpoint-2", "checkpoint-4"):
        (tmp_path / folder / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="--resume_from_checkpoint last: no complete checkpoint in"):
        resume_checkpoint(args)


def test_expert_labels_of_the_wrong_kind_are_refused(saved):
    import torch

    from modeling_chimera import ChimeraForConditionalGeneration
    from modeling_mixpert import MixpertForConditionalGeneration

    chimera = ChimeraForConditionalGeneration.from_pretrained(saved / "chimera")
    mixpert = MixpertForConditionalGeneration.from_pretrained(saved / "mixpert")
    for model in (chimera, mixpert):
        for bad in (torch.tensor([1.7]), torch.tensor([True]), [0.5]):
            with pytest.raises(ValueError, match=r"`expert_labels` must be integers .* got torch\.(float|bool)"):
                model.model._validate_expert_labels(bad, 1)


# ------------------------------------------------------------------------------------------------------- images


def test_images_of_every_depth_and_layout_become_the_same_8_bit_rgb(saved):
    import numpy as np
    import torch
    from PIL import Image

    from processing_chimera import ChimeraProcessor

    processor = ChimeraProcessor.from_pretrained(saved / "chimera")
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    gray8 = rgb8[..., 0]

    def pixels(image):
        out = processor(images=[[image]], text=[chat_prompt(processor)], return_tensors="pt")
        return out["pixel_values"], out["expert_pixel_values"]

    reference = pixels(Image.fromarray(rgb8))
    for same in (rgb8.astype(np.float32) / 255, rgb8.astype(np.float64), torch.from_numpy(rgb8).permute(2, 0, 1),
                 torch.from_numpy(rgb8.astype(np.float32) / 255).permute(2, 0, 1)):
        got = pixels(same)
        assert torch.equal(got[0], reference[0]) and all(torch.equal(a, b) for a, b in zip(got[1], reference[1]))
    # 16-bit grayscale PNG data (values 0..65535) reads as its 8-bit equivalent, not as an almost white image
    gray16 = Image.fromarray(gray8.astype(np.uint16) * 257)
    assert gray16.mode.startswith("I;16")
    assert torch.equal(pixels(gray16)[0], pixels(Image.fromarray(gray8))[0])


def test_bad_images_raise_errors_that_name_the_image(saved, tmp_path):
    import numpy as np
    from PIL import Image

    from chimera_mixpert.data.collators import VisionLanguageSFTCollator
    from modeling_chimera import ChimeraForConditionalGeneration
    from processing_chimera import ChimeraProcessor

    processor = ChimeraProcessor.from_pretrained(saved / "chimera")
    good = Image.new("RGB", (16, 16))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cases = [
        ([good, np.full((16, 16, 3), np.nan, np.float32)], r"image 1: the image holds NaN or infinite pixel values"),
        ([np.full((16, 16, 3), 300.0)],
         r"image 0: float pixel values in \[300, 300\]; expected \[0, 1\] or \[0, 255\]"),
        ([str(corrupt)], rf"image 0: cannot read image file {corrupt}"),
        ([str(tmp_path / "absent.png")], r"image 0: cannot read image file .*absent.png"),
        ([np.zeros((2, 2, 2, 3), np.uint8)], r"must be HW, HWC or CHW, got shape \(2, 2, 2, 3\)"),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=message):
            processor(images=[[image] for image in images], text=[chat_prompt(processor)] * len(images))
    processor.max_image_pixels = 100
    with pytest.raises(ValueError, match=r"image 0: 16x16 = 256 pixels, more than max_image_pixels=100"):
        processor(images=[[good]], text=[chat_prompt(processor)])
    processor.max_image_pixels = None
    assert processor(images=[[good]], text=[chat_prompt(processor)], return_tensors="pt")["pixel_values"].shape[0] >= 1

    # Inside a training batch, the unreadable file names itself.
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
           "images": [str(corrupt)], "domain": "table"}
    with pytest.raises(ValueError, match=rf"training image {corrupt}: cannot read image file"):
        VisionLanguageSFTCollator(processor)([row])

    # NaN pixels handed straight to the model: refused, not routed.
    model = ChimeraForConditionalGeneration.from_pretrained(saved / "chimera")
    inputs = processor(images=[[good]], text=[chat_prompt(processor)], return_tensors="pt")
    inputs["pixel_values"][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="`pixel_values` hold NaN or infinite values"):
        model(**inputs)


# -------------------------------------------------------------------------------------------------------- paths


def test_data_and_shard_paths_stay_inside_their_root(saved, tmp_path):
    from PIL import Image

    from chimera_mixpert.data.loading import load_vl_dataset
    from modeling_chimera import ChimeraForConditionalGeneration
    from train.dpo import load_preference_data

    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "inside.png")
    row = {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "a"}]}
    for name, image in (("up.jsonl", "../outside.png"), ("abs.jsonl", str(tmp_path / "outside.png"))):
        (tmp_path / "data" / name).write_text(json.dumps({**row, "images": ["inside.png", image]}) + "\n")
        with pytest.raises(ValueError, match=rf"{name}, row 0: image path .* leaves the image root .*"
                                             r"--allow_images_outside_root true"):
            load_vl_dataset(str(tmp_path / "data" / name))
        loaded = load_vl_dataset(str(tmp_path / "data" / name), allow_outside_root=True)
        assert loaded[0]["images"][1] == str(tmp_path / "outside.png")
    pairs = {"prompt": [{"role": "user", "content": "?"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}], "images": ["../outside.png"]}
    (tmp_path / "data" / "pref.jsonl").write_text(json.dumps(pairs) + "\n")
    with pytest.raises(ValueError, match="leaves the image root"):
        load_preference_data([str(tmp_path / "data" / "pref.jsonl")])

    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved / "chimera", folder)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").unlink()
    (tmp_path / "elsewhere.safetensors").write_bytes(weights)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match=r"names shards outside its folder: \['../elsewhere.safetensors'\]"):
        ChimeraForConditionalGeneration.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ inputs of the wrong kind


@pytest.mark.parametrize("kind", ["chimera", "mixpert"])
def test_inputs_of_the_wrong_kind_name_the_argument(saved, tmp_path, kind):
    import shutil

    import torch
    from transformers import AutoProcessor

    from chimera_mixpert.tiny import random_images
    from modeling_chimera import ChimeraForConditionalGeneration
    from modeling_mixpert import MixpertForConditionalGeneration
    from processing_chimera import ChimeraProcessor

    model_class = ChimeraForConditionalGeneration if kind == "chimera" else MixpertForConditionalGeneration
    model = model_class.from_pretrained(saved / kind)
    processor = (ChimeraProcessor if kind == "chimera" else AutoProcessor).from_pretrained(saved / kind)
    images = random_images(2)
    inputs = processor(images=[[images[0]], [images[1]]], text=[chat_prompt(processor)] * 2, return_tensors="pt",
                       padding=True)
    cases = [
        (dict(labels="abc"), r"`labels` must be a LongTensor of token ids .* got str"),
        (dict(labels=inputs["input_ids"].float()), r"`labels` must be a LongTensor .* got torch.float32"),
        (dict(expert_labels=["a", "b"]), r"`expert_labels` must be integers .* got \['a', 'b'\]"),
        (dict(input_ids=inputs["input_ids"][:0], attention_mask=inputs["attention_mask"][:0], pixel_values=None),
         r"`input_ids` is empty \(shape \(0, \d+\)\)"),
        (dict(pixel_values=inputs["pixel_values"][0]), r"`pixel_values` holds \d+ (tiles|patches)"),
    ]
    if kind == "chimera":
        swapped = list(reversed(inputs["expert_pixel_values"]))
        cases.append((dict(expert_pixel_values=swapped, expert_labels=torch.tensor([1, 2])),
                      r"Expert 1 \('table', pix2struct_vision_model\) cannot encode `expert_pixel_values\[0\]` of "
                      r"shape \(2, 3, 16, 16\): pass the list `ChimeraProcessor` returns, in the model's expert order"))
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**{k: v for k, v in {**inputs, **change}.items() if v is not None})
    folder = tmp_path / "truncated"
    shutil.copytree(saved / kind, folder)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"cannot be read .* a safetensors file is truncated or corrupt"):
        model_class.from_pretrained(folder)


def test_a_save_killed_halfway_leaves_the_previous_model_whole(saved, tmp_path, monkeypatch):
    import os

    from chimera_mixpert.training import save_atomically
    from modeling_mixpert import MixpertForConditionalGeneration

    model = MixpertForConditionalGeneration.from_pretrained(saved / "mixpert")
    save_atomically(str(tmp_path), model)
    before = (tmp_path / "model.safetensors").read_bytes()

    def killed_while_writing(folder, *args, **kwargs):  # half the weights written, then the process dies
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        save_atomically(str(tmp_path), model)
    assert (tmp_path / "model.safetensors").read_bytes() == before  # the previous save, whole
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".saving-")]  # no staging folder left behind
    MixpertForConditionalGeneration.from_pretrained(tmp_path)


def test_review_edge_cases_dark_16_bit_bf16_tensors_int32_labels_symlinks_stale_shards(saved, tmp_path):
    import os

    import numpy as np
    import torch
    from PIL import Image

    from chimera_mixpert.data.loading import load_vl_dataset
    from chimera_mixpert.training import save_atomically
    from modeling_mixpert import MixpertForConditionalGeneration
    from processing_chimera import load_rgb_image
    from train.evaluate import load_rows

    dark = np.full((4, 4), 200, np.uint16)  # a dark 16-bit image: 200 / 65535 of full scale, not 200 / 255
    assert np.asarray(load_rgb_image(dark)).max() == 1
    half = torch.full((3, 8, 8), 0.5, dtype=torch.bfloat16)
    assert np.asarray(load_rgb_image(half)).tolist() == np.full((8, 8, 3), 128).tolist()

    model = MixpertForConditionalGeneration.from_pretrained(saved / "mixpert")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(input_ids=ids, labels=ids.int()).loss)  # int32 labels work like int64 ones

    # A symlinked image folder inside the data root is the user's own: accepted.
    (tmp_path / "storage").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "storage" / "a.png")
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "storage", tmp_path / "data" / "images")
    row = {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "a"}],
           "images": ["images/a.png"], "domain": "chart", "question": "?", "answer": "a"}
    (tmp_path / "data" / "d.jsonl").write_text(json.dumps(row) + "\n")
    assert len(load_vl_dataset(str(tmp_path / "data" / "d.jsonl"))) == 1
    # Evaluation decodes images like training does (a 16-bit PNG is scaled, not clipped to white).
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "storage" / "a.png")
    image = load_rows(str(tmp_path / "data" / "d.jsonl"))[0]["image"]
    assert np.asarray(image).max() == 128

    # A sharded previous save does not linger next to a new single-file save.
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (out / name).write_text("stale")
    save_atomically(str(out), model)
    assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]
    MixpertForConditionalGeneration.from_pretrained(out)


def test_assembly_refuses_keywords_it_does_not_know():
    """A config keeps any keyword as an attribute, so a typo or a non-existent option used to be accepted and do
    nothing (`from_base(..., expert_adapter="lora")` before LoRA experts existed)."""
    from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert

    with pytest.raises(TypeError, match=r"from_base\(\) got unknown keyword argument\(s\) 'expert_adaptor' "
                                        r"\(did you mean 'expert_adapter'\?\)\. .*"
                                        r"MixpertConfig: .*routing_strategy"):
        build_tiny_mixpert("internvl", expert_adaptor="lora")
    with pytest.raises(TypeError, match=r"'routing_stratgy' \(did you mean 'routing_strategy'\?\)"):
        build_tiny_mixpert("internvl", routing_stratgy="direct")
    with pytest.raises(TypeError, match=r"from_generalist\(\) .*'gscm_ration' \(did you mean 'gscm_ratio'\?\)"):
        build_tiny_chimera("internvl", gscm_ration=0.1)
    model, _ = build_tiny_mixpert("internvl", routing_strategy="direct", routing_granularity="sub_image")
    assert (model.config.routing_strategy, model.config.routing_granularity) == ("direct", "sub_image")


@pytest.mark.parametrize("script, argv, flag", [
    ("sft", ["--tiny_experts", "chart=clip_vision_model"], "--tiny_experts"),
    ("chimera", ["--tiny_domains", "chart,table", "--tiny_num_expert_layers", "1"],
     "--tiny_domains, --tiny_num_expert_layers"),
    ("mixpert", ["--tiny_model", "mixpert"], "--tiny_model"),
    ("dpo", ["--bf16", "false", "--tiny_model", "mixpert", "--tiny_experts", "chart=clip_vision_model"],
     "--tiny_experts"),
])
def test_scripts_refuse_the_tiny_flags_of_another_script(tmp_path, script, argv, flag):
    # One TinyArguments group serves every script; a flag of another script's tiny model must not parse and do nothing.
    import importlib

    module = importlib.import_module(f"train.{script}")
    args = module.make_parser().parse_args_and_config(["--output_dir", str(tmp_path), *argv])
    with pytest.raises(ValueError, match=rf"train.{script} builds a tiny \w+ model, which does not read {flag}: drop"):
        module.main(*args)
    assert not any(tmp_path.iterdir())  # refused before anything was built or written
