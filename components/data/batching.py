"""Chat formatting, tokenization and collation — one code path for training and generation.

Why prompt and completion are tokenized separately and concatenated: the prompt ids a model sees at
inference ("USER: <image>\\n{instruction} ASSISTANT:") are then exactly the prompt ids it was trained on,
and the answer-only loss mask is exact (no BPE merge can straddle the boundary). The <image> marker is
expanded to the processor's number of image tokens before tokenizing, as LlavaProcessor does.

`max_length` counts TEXT tokens: the image tokens one image expands to (576 for LLaVA-1.5 at 336 px)
come on top, asked of the processor, so one setting means the same for a 16-token and a 576-token
base. Every answer target ends with the tokenizer's end-of-sequence token whatever the chat template
renders after the answer (llava-hf's template ends an assistant turn with a space, no `</s>`): a model
that never sees EOS in its labels never learns to stop.

Training pads on the right (labels of pads are -100); generation pads on the left so every row's
next token is at the last position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from components.data.images import load_image

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenized example. `image` is a path, a PIL image or None (text-only)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens; equal to input_ids on answer tokens
    image: Any = None
    record: str = ""  # id, for error messages


def _messages(instruction: str, has_image: bool, answer: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "image"}] if has_image else []
    content.append({"type": "text", "text": instruction})
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


class ChatFormatter:
    """Renders rows with the base's chat template and tokenizes them (see the module docstring)."""

    def __init__(self, processor, max_length: int = 128):
        """`max_length`: the most TEXT tokens (prompt + answer) of one example; image tokens come on top."""
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not self.template:
            raise ValueError(
                "the base's processor has no chat template (no chat_template.json / chat_template.jinja in the "
                "folder, none in tokenizer_config.json): add the model's chat template file to the folder"
            )
        self.n_image_tokens = image_token_count(processor) if hasattr(processor, "image_processor") else 0

    def _render(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            msgs, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def prompt_text(self, instruction: str, has_image: bool) -> str:
        """The prompt as the template renders it, with a single <image> marker (not yet expanded)."""
        return self._render(_messages(instruction, has_image), add_generation_prompt=True)

    def _ids(self, text: str, first: bool) -> list[int]:
        bos = self.tokenizer.bos_token
        add = first and not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add)["input_ids"]

    def encode_prompt(self, instruction: str, has_image: bool) -> list[int]:
        text = self.prompt_text(instruction, has_image)
        if has_image:
            if text.count(self.image_token) != 1:
                raise ValueError(f"chat template rendered {text.count(self.image_token)} image markers, expected 1")
            text = text.replace(self.image_token, self.image_token * self.n_image_tokens)
        return self._ids(text, first=True)

    def encode(self, instruction: str, answer: str, has_image: bool, record: str = "", image: Any = None) -> Encoded:
        """Prompt + answer ids with the prompt masked; the answer ends with EOS. `max_length` counts text
        tokens (image tokens come on top). Over-long answers are truncated (EOS kept); an over-long
        prompt is an error naming the record (truncating it would cut image tokens or the question)."""
        prompt_only = self.prompt_text(instruction, has_image)
        full = self._render(_messages(instruction, has_image, answer), add_generation_prompt=False)
        if not full.startswith(prompt_only):
            raise ValueError(
                f"record {record}: the chat template's prompt is not a prefix of the full conversation; "
                "answer-only masking needs it to be"
            )
        prompt_ids = self.encode_prompt(instruction, has_image)
        # Trailing whitespace after the answer (llava-hf: "ASSISTANT: {answer} ") is dropped and EOS is
        # appended unless the template already closed the turn with it (vicuna/tiny: "{answer}</s>").
        answer_ids = self._ids(full[len(prompt_only) :].rstrip(), first=False)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the base's tokenizer has no eos_token: answers could not teach the model to stop")
        if not answer_ids or answer_ids[-1] != eos:
            answer_ids = answer_ids + [eos]
        n_image = self.n_image_tokens if has_image else 0
        text_prompt = len(prompt_ids) - n_image
        room = self.max_length - text_prompt
        if room < 2:
            raise ValueError(
                f"record {record}: field 'instruction' gives a prompt of {text_prompt} text tokens"
                + (f" (+ {n_image} image tokens)" if n_image else "")
                + f", leaving no room for an answer within max_length={self.max_length} text tokens; "
                "raise max_length or shorten it"
            )
        if len(answer_ids) > room:  # an over-long answer is cut, but still ends with EOS
            answer_ids = answer_ids[: room - 1] + [eos]
        return Encoded(
            input_ids=prompt_ids + answer_ids,
            labels=[IGNORE_INDEX] * len(prompt_ids) + list(answer_ids),
            image=image,
            record=record,
        )


def image_token_count(processor) -> int:
    """How many <image> tokens one image expands to, asked of the processor itself (so a llava-hf
    checkpoint's own settings count, not ours)."""
    from PIL import Image

    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
    h = crop.get("height") or crop.get("shortest_edge") or 224
    w = crop.get("width") or crop.get("shortest_edge") or 224
    out = processor(text=[processor.image_token], images=[Image.new("RGB", (w, h))], return_tensors="pt")
    return int((out["input_ids"] == processor.image_token_id).sum())


def pixel_values(processor, images: Sequence[Any]) -> torch.Tensor | None:
    pil = [load_image(im) for im in images if im is not None]
    if not pil:
        return None
    return processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]


def collate(
    examples: Sequence[Encoded], processor, pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of `Encoded` into a model batch (input_ids, attention_mask, labels, pixel_values)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, sl] = torch.tensor(e.input_ids)
        labels[i, sl] = torch.tensor(e.labels)
        mask[i, sl] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pv = pixel_values(processor, [e.image for e in examples]) if hasattr(processor, "image_processor") else None
    if pv is not None:
        batch["pixel_values"] = pv
    return batch


def pad_token_id(processor) -> int:
    tok = getattr(processor, "tokenizer", processor)
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError("the base's tokenizer has neither a pad nor an eos token")
    return int(pid)
