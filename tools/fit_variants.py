"""Compare ways of fitting one segment: how many steps until it holds exactly.

Each chunk of a text is fitted alone (one row, no batching) with K vectors after
lmzip's prefix token, from lmzip's start (mean token embedding plus noise, the
same seed for every variant), until the float32 teacher-forced check on the
fp16-rounded vectors gets every token right by the margin: the check lmzip runs
before its greedy verification. A variant that has not got there after
`--max-steps` gradient evaluations counts as failed. Counts are loss evaluations
(the one that finds the segment holding included), so one more than the
updates lmzip's `steps` count. The README's table of
objectives and optimizers that did not pay comes from this script:

    python tools/fit_variants.py alice29-lf.txt --limit 8 adam lbfgs ...

(alice29-lf.txt: the corpus file with LF line ends, see the README's "Line ends").

Fitting runs under bfloat16 autocast where the CPU has native bf16 (as lmzip does).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from lmzip.bench import load_chunks
from lmzip.fit import FitConfig, _gap_to_runner_up, _holding, _VectorInit, bf16_available, sink_prefix
from lmzip.models import load_model


class Problem:
    """One segment: its tokens and what a loss over them needs."""

    def __init__(self, lm, ids: list[int], cfg: FitConfig, bf16: bool):
        self.lm, self.cfg, self.bf16 = lm, cfg, bf16
        self.prefix = sink_prefix(lm, cfg)
        self.ids = torch.tensor(ids)
        with torch.no_grad():
            self.tokens = lm.embed(self.ids).float()
            self.prefix_embeds = lm.embed(torch.tensor(self.prefix)).float()
        model = lm.fitting_copy() if bf16 else lm.model
        self.body, self.head = model.base_model, model.get_output_embeddings()

    def loss(self, vectors: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per-token gap to the runner-up) for vectors (K, H)."""
        x = torch.cat([self.prefix_embeds, vectors, self.tokens]).unsqueeze(0)
        first = len(self.prefix) + vectors.shape[0] - 1  # the position that predicts token 0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.body(inputs_embeds=x, use_cache=False).last_hidden_state[0]
            logits = self.head(hidden[first : first + len(self.ids)]).float()
        ce = F.cross_entropy(logits, self.ids, reduction="none")
        gap = _gap_to_runner_up(logits, self.ids)
        margin = self.cfg.margin
        if kind == "ce":
            loss = ce.mean()
        elif kind == "focal":  # down-weights tokens already likely (gamma 2)
            loss = ((1 - torch.exp(-ce)) ** 2 * ce).mean() * 4
        elif kind == "wrong":  # cross-entropy on tokens under twice the margin, a tenth elsewhere
            w = torch.where(gap.detach() < 2 * margin, 1.0, 0.1)
            loss = (ce * w).sum() / w.sum()
        else:
            raise ValueError(kind)
        return loss, gap.detach()

    def holds(self, vectors: torch.Tensor, gap: torch.Tensor) -> bool:
        """Cheap bf16 screen first, then lmzip's float32 check on the fp16 vectors."""
        if not bool((gap >= self.cfg.margin).all()):
            return False
        holding = _holding(self.lm, [(vectors.detach().half(), self.ids)], self.cfg.margin, self.prefix)[0]
        return holding >= len(self.ids)


def adam(problem, start, budget, lr=0.2, betas=(0.9, 0.9), warmup=10, schedule="cosine", kind="ce",
         whiten=None, sign=False):
    """Adam as lmzip runs it (per-coordinate, warm-up then cosine over the budget); `whiten`
    fits z with vectors = mean + z @ L.T instead; `sign` steps by the sign of the momentum."""
    z = start.clone() if whiten is None else torch.linalg.solve_triangular(
        whiten[1], (start - whiten[0]).T, upper=False).T
    z.requires_grad_(True)
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    for step in range(1, budget + 1):
        vectors = z if whiten is None else whiten[0] + z @ whiten[1].T
        loss, gap = problem.loss(vectors, kind)
        if problem.holds(vectors, gap):
            return step
        (g,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            rate = lr * step / warmup if step < warmup else lr
            if schedule == "cosine" and step >= warmup:
                progress = min((step - warmup) / max(budget - warmup, 1), 1.0)
                rate = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
            m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
            if sign:
                z -= rate * torch.sign(m)
                continue
            v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            z -= rate * (m / (1 - betas[0] ** step)) / ((v / (1 - betas[1] ** step)).sqrt() + 1e-8)
    return None


class _Stop(Exception):
    pass


def lbfgs(problem, start, budget, lr=1.0, line_search="strong_wolfe"):
    """torch.optim.LBFGS run as one call over the whole budget, so its line search has room;
    every loss evaluation counts, line-search trials too."""
    vectors = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([vectors], lr=lr, max_iter=budget, max_eval=budget, history_size=20,
                            tolerance_grad=0.0, tolerance_change=0.0, line_search_fn=line_search)
    evaluations, held_at = 0, None

    def closure():
        nonlocal evaluations, held_at
        evaluations += 1
        if evaluations > budget:
            raise _Stop
        opt.zero_grad()
        loss, gap = problem.loss(vectors, "ce")
        if problem.holds(vectors, gap):
            held_at = evaluations
            raise _Stop
        loss.backward()
        return loss

    try:
        while evaluations < budget:  # LBFGS may stop early on its own (a flat direction)
            opt.step(closure)
    except _Stop:
        pass
    return held_at


def whitening(lm):
    """Mean and Cholesky factor of the token embeddings' covariance."""
    weight = lm.model.get_input_embeddings().weight.float()
    mean = weight.mean(0)
    cov = torch.cov((weight - mean).T)
    return mean, torch.linalg.cholesky(cov + 1e-6 * torch.eye(cov.shape[0]))


VARIANTS = {
    "adam": dict(),                                   # lmzip's default
    "adam-beta2-0.999": dict(betas=(0.9, 0.999)),
    "adam-constant-lr": dict(schedule="constant"),
    "adam-lr-0.3": dict(lr=0.3),
    "focal": dict(kind="focal"),
    "wrong-tokens": dict(kind="wrong"),
    "sign-momentum": dict(sign=True, lr=0.02),
    "whitened-lr-1": dict(whiten=True, lr=1.0),
    "whitened-lr-3": dict(whiten=True, lr=3.0),
    "lbfgs": dict(optimizer="lbfgs"),
    "lbfgs-no-line-search": dict(optimizer="lbfgs", lr=0.5, line_search=None),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text")
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--model", default=None, help="lmzip's embedded model unless given")
    parser.add_argument("--chunk-chars", type=int, default=100)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--vectors", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--no-bf16", action="store_true")
    args = parser.parse_args(argv)

    lm = load_model(args.model, device="cpu")  # the figures are CPU ones; autocast below is the CPU's
    cfg = FitConfig(vectors=args.vectors)
    bf16 = bf16_available(lm.device) and not args.no_bf16
    chunks = load_chunks([args.text], args.chunk_chars, args.limit)  # the bench's chunks, line ends kept
    problems = [Problem(lm, lm.tokenizer(c, add_special_tokens=False)["input_ids"], cfg, bf16) for c in chunks]
    white = None
    for name in args.variants:
        options = dict(VARIANTS[name])
        if options.pop("whiten", False):
            white = white or whitening(lm)
            options["whiten"] = white
        run = lbfgs if options.pop("optimizer", "adam") == "lbfgs" else adam
        started, steps = time.perf_counter(), []
        for problem in problems:
            init = _VectorInit(lm, cfg.seed)  # the same start for every variant
            steps.append(run(problem, init(cfg.vectors), args.max_steps, **options))
        done = [s for s in steps if s is not None]
        print(json.dumps({"variant": name, "steps": steps, "exact": len(done), "chunks": len(steps),
                          "steps_total": sum(s if s is not None else args.max_steps for s in steps),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
