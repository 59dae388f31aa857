"""Load vision-language training data from local JSONL / JSON / parquet files with `datasets`.

Two row formats are accepted and normalised to one (what TRL and `processor.apply_chat_template` use):

* HF "messages + images" (TRL's format):
  `{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                 {"role": "assistant", "content": "..."}], "images": ["a.png"], "domain": "chart"}`
  String contents may hold `<image>` markers; without markers, images go before the first user text (TRL's
  `prepare_multimodal_messages` rule).
* LLaVA / InternVL "conversations":
  `{"conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}],
    "image": "a.png" | ["a.png", ...], "domain": "chart"}`

Normalised rows: `messages` (structured content: `{"type": "image"}` / `{"type": "text", "text": ...}` items),
`images` (absolute paths, in order of appearance), `domain` (string, `""` when absent).

Image paths are resolved against `image_root` (default: the data file's folder) and checked when loading: a missing
file, an unknown domain, an unknown role, a row without an assistant answer or a row with more `<image>` markers than
images raises an error naming the file and row; no row is dropped silently.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets


IMAGE_MARKER = "<image>"
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _split_markers(text: str) -> list[dict]:
    """'<image>\\nWhat?' -> [{'type': 'image'}, {'type': 'text', 'text': '\\nWhat?'}] (empty text pieces dropped)."""
    items = []
    for i, piece in enumerate(re.split(re.escape(IMAGE_MARKER), text)):
        if i > 0:
            items.append({"type": "image"})
        if piece.strip():
            items.append({"type": "text", "text": piece.strip()})
    return items


def _structured(content) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return _split_markers(content)
    items = []
    for item in content:
        kind = item.get("type")
        if kind == "image":
            items.append({"type": "image"})
        elif kind == "text":
            items.extend(_split_markers(item.get("text") or ""))
        else:
            raise ValueError(f"Unsupported content item type {kind!r}: expected 'image' or 'text'.")
    return items


def resolve_image_path(image: str, image_root: str, where: str, allow_outside_root: bool = False) -> str:
    """`image` (relative to `image_root`, or absolute) as an absolute path that must exist and, unless
    `allow_outside_root`, lie inside `image_root`: a data file must not make training read any file (`../../etc`)."""
    # Lexical check (`../`, absolute paths): symlinks the user made inside the root (shared storage) are allowed.
    path = os.path.abspath(image if os.path.isabs(image) else os.path.join(image_root, image))
    root = os.path.abspath(image_root)
    if not allow_outside_root and os.path.commonpath([path, root]) != root:
        raise ValueError(f"{where}: image path {image!r} leaves the image root {root}; move the image under it, set "
                         "--image_root, or pass --allow_images_outside_root true.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    return path


def _messages_and_images(row: dict, where: str) -> tuple[list[dict], list]:
    """A raw row's turns as `[{"role", "content"}]` (LLaVA `conversations` or HF `messages`) and its images as a
    list (paths or `{"path": ...}`, not resolved yet)."""
    if "conversations" in row and row["conversations"] is not None:
        messages = []
        for turn in row["conversations"]:
            role = _ROLE.get(str(turn.get("from", turn.get("role", ""))).lower())
            if role is None:
                raise ValueError(f"{where}: unknown speaker {turn.get('from')!r} (expected human/gpt/system).")
            messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
        images = row.get("image", row.get("images"))
    elif "messages" in row and row["messages"] is not None:
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in row["messages"]]
        for turn, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                hint = f" (LLaVA's {m['role']!r} belongs in `conversations` with `from`)" if m["role"] in _ROLE else ""
                raise ValueError(f"{where}: message {turn} has role {m['role']!r}; `messages` roles are system, user "
                                 f"and assistant{hint}.")
        images = row.get("images", row.get("image"))
    else:
        raise ValueError(f"{where}: a row needs `messages` (HF format) or `conversations` (LLaVA format).")
    if images is None:
        images = []
    elif isinstance(images, (str, dict)) or hasattr(images, "size"):
        images = [images]
    return messages, images


def _resolve_images(images: list, image_root: str, where: str, allow_outside_root: bool) -> list[str]:
    """Each image (a path, or a dict with `path`) as a checked absolute path (see `resolve_image_path`)."""
    resolved = []
    for image in images:
        if isinstance(image, str):
            resolved.append(resolve_image_path(image, image_root, where, allow_outside_root))
        elif isinstance(image, dict) and image.get("path"):
            resolved.append(resolve_image_path(image["path"], image_root, where, allow_outside_root))
        else:
            raise ValueError(f"{where}: images must be file paths, got {type(image).__name__}.")
    return resolved


def normalize_row(row: dict, index: int, image_root: str, source: str, domains: set | None = None,
                  allow_outside_root: bool = False) -> dict:
    """One raw row (either format) -> `{"messages", "images", "domain"}`; raises with `source` and `index` on errors."""
    where = f"{source}, row {index}"
    messages, images = _messages_and_images(row, where)
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        # Without an answer the row has no label token: a batch of such rows divides the loss by zero (NaN weights).
        raise ValueError(f"{where}: no non-empty assistant turn (the answer to train on); add one or drop the row.")
    messages = [{"role": m["role"], "content": _structured(m["content"])} for m in messages]
    markers = sum(item["type"] == "image" for m in messages for item in m["content"])
    if markers > len(images):
        raise ValueError(
            f"{where}: {markers} image markers (`<image>` / image items) but only {len(images)} image(s). Give one "
            "image per marker."
        )
    if markers < len(images):  # LLaVA / TRL convention: unmarked images go before the first user text
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"{where}: images given but no user turn to attach them to.")
        first_user["content"] = [{"type": "image"}] * (len(images) - markers) + first_user["content"]
    resolved = _resolve_images(images, image_root, where, allow_outside_root)
    domain = row.get("domain") or ""
    if domains is not None and domain not in domains:
        raise ValueError(f"{where}: unknown domain {domain!r}; known domains: {sorted(d for d in domains if d)}.")
    return {"messages": messages, "images": resolved, "domain": domain}


def load_vl_dataset(
    data_files: str | list[str],
    image_root: str | None = None,
    domains: list[str] | None = None,
    split: str = "train",
    allow_outside_root: bool = False,
) -> datasets.Dataset:
    """Load and normalise local vision-language data (see the module docstring).

    Args:
        data_files: one path or a list of paths; `.jsonl` / `.json` / `.parquet` (one format per call).
        image_root: folder relative image paths start from (default: the first data file's folder).
        domains: allowed domain names (e.g. a model's domains plus "general"); `None` accepts any.
        split: the `datasets` split name to return.
        allow_outside_root: accept image paths that leave `image_root` (`../`, absolute paths elsewhere).
    """
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files:
        raise ValueError("No data files given.")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"Data file not found: {f}")
    suffixes = {Path(f).suffix.lower() for f in files}
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    kinds = {builder.get(s) for s in suffixes}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"Data files must all be .jsonl/.json or all .parquet, got {sorted(suffixes)}.")
    raw = datasets.load_dataset(kinds.pop(), data_files={split: [str(f) for f in files]}, split=split)
    root = image_root or str(Path(files[0]).resolve().parent)
    allowed = set(domains) | {""} if domains is not None else None
    source = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"
    rows = [normalize_row(row, i, root, source, allowed, allow_outside_root) for i, row in enumerate(raw)]
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Value("string")),
        "domain": datasets.Value("string"),
    })
    return datasets.Dataset.from_list(rows, features=features)
