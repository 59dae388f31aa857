"""Reference checkpoints for the cross-version remote-code checks (`tests/test_remote_code_compat.py`).

    python -m tests.remote_code_compat OUT_DIR

builds a tiny Chimera on each generalist family and a tiny Mixpert on each base family with this project, saves each
(model + processor, with its remote code) to `OUT_DIR/<kind>-<family>/`, and writes next to it `reference.pt`: the
inputs and what `tests/remote_code_check.probe` gives on the in-memory model, under the transformers installed here.
Another interpreter (another transformers release, this project not installed) then loads the folder and must
reproduce it exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


SETUPS = [(kind, family) for kind in ("chimera", "mixpert") for family in ("llava_onevision", "qwen2_vl", "internvl")]


def write_reference(kind: str, family: str, folder: Path) -> Path:
    import transformers

    from chimera_mixpert.tiny import build_tiny_chimera, build_tiny_mixpert, chat_prompt, random_images
    from tests.remote_code_check import probe

    if kind == "chimera":
        model, processor = build_tiny_chimera(family)
        expert_labels = torch.tensor([1, 2])  # both experts, one per image
    else:
        model, processor = build_tiny_mixpert(family)
        expert_labels = torch.tensor([2, 0])  # a domain expert and the versatile one
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = random_images(2, sizes=((16, 16), (16, 24)))
    prompts = [chat_prompt(processor), chat_prompt(processor, text="Which value is largest?")]
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))
    results = probe(model, processor, inputs, expert_labels, images[0])
    path = folder / "reference.pt"
    torch.save({"inputs": inputs, "expert_labels": expert_labels, "image": images[0], "results": results,
                "transformers": transformers.__version__}, path)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    for kind, family in SETUPS:
        print(write_reference(kind, family, out / f"{kind}-{family}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
