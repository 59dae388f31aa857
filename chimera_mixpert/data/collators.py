"""Batch collation for supervised training of Chimera / Mixpert (and their native backbones).

The collator renders each conversation with the processor's chat template, runs the processor on text and images
together (so image tokens and tiles are right), keeps the loss on assistant turns only, and adds `expert_labels`
(one per image, from the row's `domain`).

Assistant-only labels use transformers' `return_assistant_tokens_mask`, which needs `{% generation %}` markers in
the chat template; templates without them are patched with TRL's `get_training_chat_template` (Qwen2.5-VL, LLaVA-NeXT
and the other templates TRL knows), and an unknown template raises with the fix.
"""

from __future__ import annotations

import torch
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from processing_chimera import DEFAULT_MAX_IMAGE_PIXELS, load_rgb_image


def make_domain_labels(model_domains, none_domains=("general", "none")) -> dict[str, int]:
    """Domain name -> expert label: `k` for the `k`-th model domain (1-based), 0 for `none_domains` that are not model
    domains (Chimera's "no expert", Mixpert's versatile expert), and -100 for rows without a domain (router decides,
    no router loss)."""
    labels = {d: i for i, d in enumerate(model_domains, start=1)}
    for d in none_domains:
        labels.setdefault(d, 0)
    labels[""] = -100
    return labels


def training_chat_template(processor) -> str:
    """The processor's chat template if it marks assistant text with `{% generation %}`, else TRL's patched one."""
    template = processor.chat_template
    if template is None:
        raise ValueError("The processor has no chat template; set `processor.chat_template` before training.")
    if has_generation_markers(template):
        return template
    try:
        patched = get_training_chat_template(processor)
    except ValueError as err:
        raise ValueError(
            "The chat template has no `{% generation %}` / `{% endgeneration %}` markers around assistant text, and "
            "TRL has no patched version of it. Add the markers (see transformers' chat templating docs, 'assistant "
            "token masks') and set `processor.chat_template`."
        ) from err
    return patched if patched is not None else template


class VisionLanguageSFTCollator:
    """Rows `{"messages", "images", "domain"}` (see `chimera_mixpert.data.loading`) -> a model batch with `labels` on
    assistant tokens only and `expert_labels` per image.

    Args:
        processor: the model's processor (`ChimeraProcessor` or a native one for Mixpert).
        domain_labels (`dict[str, int]`, *optional*): domain -> expert label (`make_domain_labels`). `None`: no
            `expert_labels` in the batch.
        force_expert_label (`int`, *optional*): give every image this label instead (Mixpert expert tuning).
        max_length (`int`, *optional*): raise if a sample is longer (truncating would cut image tokens or answers).
    """

    def __init__(self, processor, domain_labels: dict | None = None, force_expert_label: int | None = None,
                 max_length: int | None = None):
        self.processor = processor
        self.domain_labels = domain_labels
        self.force_expert_label = force_expert_label
        self.max_length = max_length
        self.chat_template = training_chat_template(processor)

    def _conversation(self, row) -> list[dict]:
        paths = iter(row["images"])
        messages = []
        for message in row["messages"]:
            content = []
            for item in message["content"]:
                if item["type"] == "image":
                    # Decoded here, not by the processor: an unreadable file then names itself (torchvision's
                    # decoder says only "Internal error"), and 16-bit / float images are scaled, not clipped.
                    path = next(paths)
                    content.append({"type": "image", "image": load_rgb_image(
                        path, f"training image {path}", getattr(self.processor, "max_image_pixels",
                                                                 DEFAULT_MAX_IMAGE_PIXELS))})
                else:
                    content.append({"type": "text", "text": item["text"]})
            messages.append({"role": message["role"], "content": content})
        return messages

    def _expert_labels(self, rows) -> torch.LongTensor | None:
        if self.domain_labels is None and self.force_expert_label is None:
            return None
        labels = []
        for row in rows:
            if self.force_expert_label is not None:
                label = self.force_expert_label
            elif row["domain"] in self.domain_labels:
                label = self.domain_labels[row["domain"]]
            else:
                known = sorted(d for d in self.domain_labels if d)
                raise ValueError(f"Unknown domain {row['domain']!r}; this model knows {known}.")
            labels.extend([label] * len(row["images"]))
        return torch.tensor(labels, dtype=torch.long)

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.processor.apply_chat_template(
            [self._conversation(row) for row in rows],
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            processor_kwargs={"padding": True, "return_tensors": "pt"},
        )
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            lengths = batch["attention_mask"].sum(-1).tolist()
            raise ValueError(
                f"A sample has {max(lengths)} tokens, more than max_length={self.max_length}; truncating would cut "
                "image tokens or answers. Raise max_length or shorten the data."
            )
        mask = batch.pop("assistant_masks")
        mask = torch.as_tensor(mask, dtype=torch.bool) & batch["attention_mask"].bool()
        batch["labels"] = torch.where(mask, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
        expert_labels = self._expert_labels(rows)
        if expert_labels is not None and expert_labels.numel() > 0:
            batch["expert_labels"] = expert_labels
        return dict(batch)
