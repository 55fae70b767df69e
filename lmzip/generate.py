"""Greedy decoding from memory vectors: the one path that turns vectors into tokens.

The encoder verifies a segment by decoding the fp16-rounded vectors it stores,
and the decoder decodes them the same way, so what was verified is what is
decoded. It runs in float32, eval mode, no sampling; the smallest gap between
the top two logits tells how far a segment is from a near-tie that another
machine's arithmetic (or another batch shape, see batch_decode.py) could flip.

The input is the archive's prefix tokens (a fixed start-of-text token that
the model is used to seeing first: it takes the attention-sink role that a
memory vector would otherwise have to play), then the K memory vectors.
"""

from __future__ import annotations

import torch

from .batch_decode import Decoded, greedy_decode_batch, memory_inputs, top2_margin
from .models import LoadedModel

__all__ = ["Decoded", "greedy_decode", "greedy_decode_batch", "memory_inputs", "teacher_forced_accuracy",
           "teacher_forced_logits"]


@torch.no_grad()
def greedy_decode(lm: LoadedModel, vectors: torch.Tensor, n_tokens: int, prefix: tuple[int, ...] = (),
                  use_cache: bool = True) -> Decoded:
    """Generate exactly `n_tokens` tokens after the prefix tokens and memory `vectors` (K, H).

    With the KV cache this is the batched decoder with one row, whose arithmetic is that of a
    plain one-row decode. Without it every step reruns the whole input: slow, and independent of
    the cache and batch bookkeeping, which makes it the reference the tests compare against.
    """
    if use_cache:
        return greedy_decode_batch(lm, [(vectors, n_tokens)], prefix, batch_size=1)[0]
    embeds = memory_inputs(lm, prefix, vectors).unsqueeze(0)  # (1, P + K, H)
    ids: list[int] = []
    margins: list[torch.Tensor] = []
    for _ in range(n_tokens):
        logits = lm.model(inputs_embeds=embeds, use_cache=False).logits[0, -1].float()  # (V,)
        next_id = int(torch.argmax(logits))
        margins.append(top2_margin(logits))
        ids.append(next_id)
        embeds = torch.cat([embeds, lm.embed(torch.tensor([[next_id]], device=lm.device))], dim=1)
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
