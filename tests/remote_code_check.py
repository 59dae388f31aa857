"""What a Hub user does with a saved Chimera / Mixpert, as one probe that runs on any transformers release.

This file imports only torch, PIL and transformers (never this project), so it runs in an interpreter where the project
is not installed and the model classes come from the checkpoint folder through `trust_remote_code`:

    python tests/remote_code_check.py --reference_dir REF [--model_root DIR | hub:ORG] [--save_dir OUT]

`probe()` runs forward (router decision and forced experts), `generate()` (greedy, beam search, sampling),
`pipeline("image-text-to-text")`, and a training step with gradient checkpointing. The main venv computes a reference
with the same `probe()` on the model it built (`tests/remote_code_compat.py`); here the loaded model must reproduce it
exactly: same logits bit for bit, same tokens, same pipeline reply, same loss and gradients. `--save_dir` re-saves the
loaded models with the installed transformers (for the reverse check: saved here, loaded by the reference venv).
Prints one JSON line per setup and exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def set_checkpointing(model, enable: bool) -> None:
    """Gradient checkpointing on or off; transformers 5.24 renamed it activation checkpointing (the old name warns)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def probe(model, processor, inputs: dict, expert_labels: torch.Tensor, image) -> dict:
    """Everything a user does with a VLM, on `inputs` (a processor batch), as tensors / strings to compare."""
    from transformers import pipeline

    results = {}
    model.eval()
    with torch.no_grad():
        results["logits"] = model(**inputs).logits
        routed = model(**inputs, expert_labels=expert_labels)
        results["logits_forced"] = routed.logits
        results["expert_index_forced"] = routed.expert_index
    generate_kwargs = dict(max_new_tokens=4, expert_labels=expert_labels)
    results["greedy"] = model.generate(**inputs, do_sample=False, **generate_kwargs)
    results["beam"] = model.generate(**inputs, do_sample=False, num_beams=2, **generate_kwargs)
    torch.manual_seed(0)
    results["sample"] = model.generate(**inputs, do_sample=True, top_k=0, **generate_kwargs)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    results["pipeline"] = pipe(text=messages, max_new_tokens=3, do_sample=False)[0]["generated_text"][-1]["content"]

    # One training step with gradient checkpointing: the loss and the trainable heads' gradients.
    model.train()
    set_checkpointing(model, True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels, expert_labels=expert_labels)
    out.loss.backward()
    results["loss"] = out.loss.detach()
    results["grads"] = {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.grad is not None and ("router" in name or "lm_head" in name)
    }
    model.zero_grad(set_to_none=True)
    set_checkpointing(model, False)
    model.eval()
    return results


def compare(results: dict, reference: dict) -> list[str]:
    """Names of the results that differ from the reference (empty: everything is identical)."""
    differ = []
    for key, expected in reference.items():
        got = results[key]
        if isinstance(expected, dict):
            same = expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
        elif isinstance(expected, torch.Tensor):
            same = got.shape == expected.shape and torch.equal(got, expected)
        else:
            same = got == expected
        if not same:
            differ.append(key)
    return differ


def main(argv=None) -> int:
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference_dir", required=True,
                        help="folder of `<setup>/reference.pt` files written by `python -m tests.remote_code_compat`")
    parser.add_argument("--model_root", default=None,
                        help="where the saved models are: a folder holding `<setup>/` (default: --reference_dir) or "
                        "`hub:<org>` to load the repo ids `<org>/<setup>`")
    parser.add_argument("--save_dir", default=None,
                        help="re-save each loaded model + processor to `<save_dir>/<setup>`")
    args = parser.parse_args(argv)

    root = args.model_root or args.reference_dir
    failed = False
    references = sorted(Path(args.reference_dir).glob("*/reference.pt"))
    if not references:
        raise FileNotFoundError(f"No */reference.pt under {args.reference_dir}: "
                                "run `python -m tests.remote_code_compat`.")
    for path in references:
        setup = path.parent.name
        source = f"{root[4:]}/{setup}" if root.startswith("hub:") else str(Path(root) / setup)
        reference = torch.load(path, weights_only=False)
        model = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
        if not type(model).__module__.startswith("transformers_modules."):
            raise AssertionError(f"{type(model).__module__}: the model class did not come from the checkpoint")
        results = probe(model, processor, reference["inputs"], reference["expert_labels"], reference["image"])
        differ = compare(results, reference["results"])
        failed = failed or bool(differ)
        if args.save_dir:
            model.save_pretrained(Path(args.save_dir) / setup)
            processor.save_pretrained(Path(args.save_dir) / setup)
        print(json.dumps({"setup": setup, "loaded_from": source, "transformers": transformers.__version__,
                          "reference_transformers": reference["transformers"], "checked": sorted(results),
                          "differ": differ}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
