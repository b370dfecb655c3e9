"""Prefix and suffix token positions, from token ids — one code path for training and generation.

The paper: ψ_P edits the first p instruction tokens after the image, ψ_S the last s tokens of the
prompt. The reference code used hard-coded offsets, and its training "suffix" covered the last
*answer* tokens while inference covered the last *prompt* tokens. Here both come from the same
function and the same definition:

- prompt tokens: `prompt_mask` (training: attended and label == −100; generation: the attention
  mask, the default), so answer tokens are never prompt tokens;
- the instruction: prompt tokens strictly after the sample's last image token, or strictly after
  its first attended token (BOS) when it has no image token;
- prefix: its first p tokens; suffix: its last s tokens. When it has n < p + s tokens, each is
  capped at n // 2 (p → min(p, n//2), s → min(s, n//2); the paper's code "clamps p and s to half its
  length", where p = s), so they never overlap.

Everything is batched tensor arithmetic (no per-sample Python loop), so left and right padding,
mixed lengths and mixed image/no-image batches cost the same and give the same positions relative
to the text.
"""

from __future__ import annotations

import torch


def edit_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int | None,
    prefix_len: int,
    suffix_len: int,
    prompt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions edited by the prefix and suffix editors.

    Returns `(prefix_idx [B,p] long, prefix_valid [B,p] bool, suffix_idx [B,s] long,
    suffix_valid [B,s] bool)`. Slots past a sample's (clamped) length are invalid and hold index 0,
    which is never a valid position (an instruction token always follows an image or BOS token).
    Valid prefix indices ascend; valid suffix slots hold the last s instruction tokens in order.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"edit_positions: input_ids must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}")
    if prefix_len < 0 or suffix_len < 0:
        raise ValueError(f"edit_positions: lengths must be ≥ 0, got prefix {prefix_len}, suffix {suffix_len}")
    batch, seq = input_ids.shape
    device = input_ids.device
    for name, mask in (("attention_mask", attention_mask), ("prompt_mask", prompt_mask)):
        if mask is not None and tuple(mask.shape) != (batch, seq):
            raise ValueError(
                f"edit_positions: {name} has shape {tuple(mask.shape)}, expected {(batch, seq)} like input_ids "
                "(a 4-D attention mask cannot give token positions: pass the 2-D padding mask)"
            )
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompt = attended if prompt_mask is None else (prompt_mask.bool() & attended)

    arange = torch.arange(seq, device=device).expand(batch, seq)
    # Anchor = last image token, else first attended token; the instruction starts after it.
    if image_token_id is not None:
        is_image = (input_ids == image_token_id) & attended
        last_image = torch.where(is_image, arange, -1).amax(dim=1)
    else:
        last_image = torch.full((batch,), -1, device=device, dtype=torch.long)
    first_attended = torch.where(attended, arange, seq).amin(dim=1)
    anchor = torch.where(last_image >= 0, last_image, first_attended)
    instruction = prompt & (arange > anchor[:, None])

    n = instruction.sum(dim=1)  # [B]
    short = n < prefix_len + suffix_len
    half = n // 2
    p_eff = torch.where(short, half.clamp(max=prefix_len), torch.full_like(n, prefix_len))
    s_eff = torch.where(short, half.clamp(max=suffix_len), torch.full_like(n, suffix_len))

    # Instruction positions in ascending order, padded with `seq` (sorts last), then gathered by rank.
    ordered = torch.where(instruction, arange, seq).sort(dim=1).values  # [B, T]

    def take(ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if ranks.shape[1] == 0:
            return torch.zeros((batch, 0), dtype=torch.long, device=device)
        picked = ordered.gather(1, ranks.clamp(0, max(seq - 1, 0)))
        return torch.where(valid, picked, 0)

    slots_p = torch.arange(prefix_len, device=device).expand(batch, prefix_len)
    prefix_valid = slots_p < p_eff[:, None]
    prefix_idx = take(slots_p, prefix_valid)

    slots_s = torch.arange(suffix_len, device=device).expand(batch, suffix_len)
    suffix_valid = slots_s < s_eff[:, None]
    suffix_idx = take(n[:, None] - s_eff[:, None] + slots_s, suffix_valid)
    return prefix_idx, prefix_valid, suffix_idx, suffix_valid


def prompt_mask_from_labels(attention_mask: torch.Tensor | None, labels: torch.Tensor, ignore_index: int = -100):
    """Training's prompt mask: attended tokens whose label is `ignore_index` (answers are trained on)."""
    prompt = labels == ignore_index
    return prompt if attention_mask is None else prompt & attention_mask.bool()
