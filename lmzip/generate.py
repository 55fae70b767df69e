"""Greedy decoding from memory vectors: the one path that turns vectors into tokens.

The encoder verifies a segment with `greedy_decode` on the fp16-rounded vectors
it stores, and the decoder calls the same function, so what was verified is
what is decoded. It runs in float32, eval mode, no sampling; the smallest gap
between the top two logits tells how far a segment is from a near-tie that
another machine's arithmetic could flip.

The input is the archive's prefix tokens (a fixed start-of-text token that
the model is used to seeing first: it takes the attention-sink role that a
memory vector would otherwise have to play), then the K memory vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import LoadedModel


@dataclass(frozen=True)
class Decoded:
    ids: list[int]
    min_margin: float  # smallest (top-1 logit - top-2 logit) over all steps


def _top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = torch.topk(logits, 2, dim=-1).values  # (..., 2)
    return top[..., 0] - top[..., 1]


def memory_inputs(lm: LoadedModel, prefix: tuple[int, ...], vectors: torch.Tensor) -> torch.Tensor:
    """(P + K, H) float32 input embeddings: the prefix tokens' embeddings, then the vectors."""
    ids = torch.tensor(prefix, dtype=torch.long, device=lm.device)
    return torch.cat([lm.embed(ids).float(), vectors.to(lm.device, torch.float32)])


@torch.no_grad()
def greedy_decode(lm: LoadedModel, vectors: torch.Tensor, n_tokens: int, prefix: tuple[int, ...] = (),
                  use_cache: bool = True) -> Decoded:
    """Generate exactly `n_tokens` tokens after the prefix tokens and memory `vectors` (K, H)."""
    model = lm.model
    embeds = memory_inputs(lm, prefix, vectors).unsqueeze(0)  # (1, P + K, H)
    ids: list[int] = []
    margins: list[torch.Tensor] = []
    past = None
    step_input = embeds
    for _ in range(n_tokens):
        if use_cache:
            out = model(inputs_embeds=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = model(inputs_embeds=embeds, use_cache=False)
        logits = out.logits[0, -1].float()  # (V,)
        next_id = int(torch.argmax(logits))
        margins.append(_top2_margin(logits))
        ids.append(next_id)
        next_embed = lm.embed(torch.tensor([[next_id]], device=lm.device))  # (1, 1, H)
        step_input = next_embed
        if not use_cache:
            embeds = torch.cat([embeds, next_embed], dim=1)
    min_margin = float(torch.stack(margins).min()) if margins else float("inf")
    return Decoded(ids, min_margin)


@torch.no_grad()
def teacher_forced_logits(lm: LoadedModel, vectors: torch.Tensor, ids: torch.Tensor,
                          prefix: tuple[int, ...] = ()) -> torch.Tensor:
    """(T, V) float32 logits for each token of `ids` (T,), given the true text before it."""
    embeds = torch.cat([memory_inputs(lm, prefix, vectors), lm.embed(ids).float()])
    k = len(prefix) + vectors.shape[0]
    return lm.model(inputs_embeds=embeds.unsqueeze(0), use_cache=False).logits[0, k - 1 : k - 1 + len(ids)].float()


def teacher_forced_accuracy(lm: LoadedModel, vectors: torch.Tensor, ids: list[int],
                            prefix: tuple[int, ...] = ()) -> float:
    """Share of positions whose argmax is the right token when the true text so far is given."""
    target = torch.tensor(ids, device=lm.device)
    logits = teacher_forced_logits(lm, vectors, target, prefix)
    return float((logits.argmax(-1) == target).float().mean())
