"""Fitting memory vectors: only the vectors train, the model stays frozen.

Each segment gets K vectors of the model's hidden size, prepended to its token
embeddings and trained on cross-entropy of the segment's tokens. Many segments
share one forward and backward pass; each row has its own Adam state and
schedule, leaves the batch as soon as it verifies or runs out of steps, and a
waiting segment takes its place. A row counts as done only when the real
decoder (`greedy_decode`) reproduces its tokens from the fp16-rounded vectors
with every top-1 logit ahead of the runner-up by at least the margin.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .generate import greedy_decode, teacher_forced_accuracy
from .models import LoadedModel


@dataclass(frozen=True)
class FitConfig:
    vectors: int = 4            # K memory vectors per segment
    max_steps: int = 300        # step budget per segment; past it the segment goes to zstd
    lr: float = 0.2             # peak learning rate
    warmup: int = 10            # linear warm-up steps
    betas: tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.0
    batch_size: int = 8         # segments fitted together
    margin: float = 1.0         # required top-1 minus top-2 logit gap at every decoded token
    hinge: float = 0.0          # weight of a hinge pushing each gap past 2x the margin (0: CE alone)
    seed: int = 0               # initial vectors are drawn from this seed
    bf16: bool | None = None    # fit under bfloat16 autocast (None: where the hardware has it);
                                # verification always decodes in float32


@dataclass(frozen=True)
class FitResult:
    vectors: torch.Tensor | None  # (K, H) float16 when verified, else None
    steps: int
    seconds: float
    accuracy: float               # teacher-forced, on the last fp16 vectors tried
    min_margin: float             # of the last real decode tried (-inf if none)


@dataclass
class _Row:
    key: Hashable
    ids: torch.Tensor      # (T,)
    embeds: torch.Tensor   # (T, H), frozen token embeddings
    started: float
    step: int = 0
    last_margin: float = float("-inf")


def verify(lm: LoadedModel, vectors16: torch.Tensor, ids, margin: float):
    """Decode exactly as the decoder will; return (ok, min_margin)."""
    decoded = greedy_decode(lm, vectors16.float(), len(ids))
    ok = decoded.ids == list(ids) and decoded.min_margin >= margin
    return ok, decoded.min_margin


def _lr(cfg: FitConfig, step: torch.Tensor) -> torch.Tensor:
    """Warm-up, then cosine decay to a tenth of the peak at the step budget."""
    warm = step / max(cfg.warmup, 1)
    progress = ((step - cfg.warmup) / max(cfg.max_steps - cfg.warmup, 1)).clamp(0, 1)
    cosine = 0.1 + 0.9 * 0.5 * (1 + torch.cos(math.pi * progress))
    return cfg.lr * torch.where(step < cfg.warmup, warm, cosine)


def _init_vectors(lm: LoadedModel, cfg: FitConfig, generator: torch.Generator) -> torch.Tensor:
    scale = float(lm.model.get_input_embeddings().weight.std())
    noise = torch.randn(cfg.vectors, lm.hidden_size, generator=generator)
    return (noise * scale).to(lm.device)


def bf16_available(device: torch.device) -> bool:
    """bfloat16 autocast pays on GPUs and on CPUs with native bf16 (AVX-512 BF16, AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _gap_to_runner_up(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Target logit minus the best other logit, per position (negative when wrong)."""
    right = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, target.unsqueeze(-1), float("-inf")).amax(-1)
    return right - others


def fit_segments(lm: LoadedModel, jobs: Iterable[tuple[Hashable, tuple[int, ...]]],
                 cfg: FitConfig) -> Iterator[tuple[Hashable, FitResult]]:
    """Fit every (key, token ids) job; yield (key, result) as each one finishes."""
    device, k = lm.device, cfg.vectors
    bf16 = bf16_available(device) if cfg.bf16 is None else cfg.bf16
    generator = torch.Generator().manual_seed(cfg.seed)
    pending = deque(jobs)
    rows: list[_Row] = []
    params = m = v = None  # (B, K, H) each

    def admit():
        nonlocal params, m, v
        new = []
        while pending and len(rows) + len(new) < cfg.batch_size:
            key, ids = pending.popleft()
            t = torch.tensor(ids, device=device)
            with torch.no_grad():
                new.append(_Row(key, t, lm.embed(t), time.perf_counter()))
        if not new:
            return
        init = torch.stack([_init_vectors(lm, cfg, generator) for _ in new])
        zeros = torch.zeros_like(init)
        params = init if params is None else torch.cat([params, init])
        m = zeros if m is None else torch.cat([m, zeros])
        v = zeros.clone() if v is None else torch.cat([v, zeros])
        rows.extend(new)

    def finish(i: int, vectors16):
        row = rows[i]
        acc = teacher_forced_accuracy(lm, (vectors16 if vectors16 is not None
                                           else params[i].half()).float(), row.ids.tolist())
        return row.key, FitResult(vectors16, row.step, time.perf_counter() - row.started,
                                  acc, row.last_margin)

    admit()
    while rows:
        b = len(rows)
        lengths = [len(r.ids) for r in rows]
        t_max = max(lengths)
        tokens = torch.zeros(b, t_max, lm.hidden_size, device=device)
        target = torch.zeros(b, t_max, dtype=torch.long, device=device)
        valid = torch.zeros(b, t_max, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            tokens[i, : lengths[i]] = r.embeds
            target[i, : lengths[i]] = r.ids
            valid[i, : lengths[i]] = True
        attention = torch.cat([torch.ones(b, k, dtype=torch.long, device=device), valid.long()], dim=1)

        params.requires_grad_(True)
        embeds = torch.cat([params, tokens], dim=1)  # (B, K+T, H)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = lm.model(inputs_embeds=embeds, attention_mask=attention, use_cache=False).logits
        logits = logits[:, k - 1 : k - 1 + t_max].float()  # (B, T, V): position k-1+j predicts token j
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, T)
        gap = _gap_to_runner_up(logits, target)  # (B, T)
        # Optional hinge on thin gaps: it helps the tiny test model reach the margin with
        # one vector, but on SmolLM2 cross-entropy alone verified in fewer steps (README).
        loss = ce + cfg.hinge * F.relu(2 * cfg.margin - gap)
        per_row = (loss * valid).sum(1) / valid.sum(1)
        (grad,) = torch.autograd.grad(per_row.sum(), params)
        params = params.detach()

        with torch.no_grad():
            gap = gap.detach().masked_fill(~valid, float("inf"))
            candidates = (gap.amin(1) >= cfg.margin).tolist()
            done: dict[int, torch.Tensor | None] = {}
            for i, r in enumerate(rows):
                if candidates[i]:
                    vectors16 = params[i].half()
                    ok, r.last_margin = verify(lm, vectors16, r.ids.tolist(), cfg.margin)
                    if ok:
                        done[i] = vectors16.cpu()
                        continue
                r.step += 1
                if r.step >= cfg.max_steps:
                    done[i] = None

            # Adam, row by row in one go: each row has its own step count and learning rate.
            steps = torch.tensor([r.step for r in rows], device=device, dtype=torch.float32)
            steps = steps.clamp(min=1).view(b, 1, 1)
            b1, b2 = cfg.betas
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            update = (m / (1 - b1 ** steps)) / ((v / (1 - b2 ** steps)).sqrt() + 1e-8)
            params -= _lr(cfg, steps) * (update + cfg.weight_decay * params)

        if done:
            results = [finish(i, vec) for i, vec in done.items()]
            keep = [i for i in range(b) if i not in done]
            rows = [rows[i] for i in keep]
            params, m, v = params[keep], m[keep], v[keep]
            if not rows:
                params = m = v = None
            yield from results
            admit()
