"""Write image-QA rows as the local files the training scripts read (JSONL + PNG images)."""

from __future__ import annotations

import json
import os


def qa_messages(question: str, answer: str | None = None) -> list[dict]:
    """A one-image, one-question chat in the HF "messages" format (assistant turn only when `answer` is given)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _write_jsonl(rows, folder: str, name: str, record) -> str:
    """Save each row's `image` as `folder/images/name-<i>.png` and write `record(row)` plus that relative path as
    `images` to `folder/name.jsonl`. Returns the JSONL path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            image_path = os.path.join("images", f"{name}-{i}.png")
            row["image"].save(os.path.join(folder, image_path))
            f.write(json.dumps({**record(row), "images": [image_path], "domain": row["domain"]}) + "\n")
    return path


def export_sft_jsonl(rows, folder: str, name: str) -> str:
    """Rows with `image` (PIL), `question`, `answer`, `domain` -> `folder/name.jsonl` in the HF messages format, the
    images as `folder/images/name-<i>.png` (paths in the file are relative to `folder`). Returns the JSONL path."""
    return _write_jsonl(rows, folder, name, lambda row: {"messages": qa_messages(row["question"], row["answer"])})


def export_preference_jsonl(rows, folder: str, name: str) -> str:
    """Rows with `image` (PIL), `question`, `chosen`, `rejected`, `domain` -> a DPO file with `prompt` / `chosen` /
    `rejected` (conversational) and `images` (relative paths). Returns the JSONL path."""

    def record(row):
        return {
            "prompt": qa_messages(row["question"]),
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": row["rejected"]}]}],
        }

    return _write_jsonl(rows, folder, name, record)
