"""Time one fit step (forward and backward to the vectors) of the embedded model.

Rows of 1 prefix + K vectors + T tokens, as lmzip's fit lays them out, under
four settings: float32; bfloat16 autocast over the float32 model; autocast
over a copy with bfloat16 Linear weights; the same with eager attention, which
is `LoadedModel.fitting_copy()` on the CPU (what lmzip fits with where bf16 is
native).
The README's step costs come from:

    python tools/step_time.py --shapes 1x27 8x27 1x80 8x80 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from lmzip.models import load_model


def one_step(model, rows: int, tokens: int, vectors: int, autocast: bool, gen: torch.Generator):
    body, head = model.base_model, model.get_output_embeddings()
    hidden = head.weight.shape[1]
    x = (0.1 * torch.randn(rows, 1 + vectors + tokens, hidden, generator=gen)).requires_grad_(True)
    target = torch.randint(0, head.weight.shape[0], (rows, tokens), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = body(inputs_embeds=x, use_cache=False).last_hidden_state
        logits = head(h[:, vectors : vectors + tokens]).float()
    loss = F.cross_entropy(logits.transpose(1, 2), target)
    torch.autograd.grad(loss, x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--shapes", nargs="+", default=["1x27", "8x27", "1x80", "8x80"],
                        help="ROWSxTOKENS")
    parser.add_argument("--vectors", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device="cpu")
    fitting = lm.fitting_copy()
    fused = copy.deepcopy(fitting)
    fused.set_attn_implementation(lm.model.config._attn_implementation)
    settings = [("float32", lm.model, False), ("autocast", lm.model, True),
                ("autocast + bf16 weights", fused, True),
                (f"autocast + bf16 weights + {fitting.config._attn_implementation} attention", fitting, True)]
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        rows, tokens = map(int, shape.split("x"))
        for name, model, autocast in settings:
            one_step(model, rows, tokens, args.vectors, autocast, gen)  # warm-up
            started = time.perf_counter()
            for _ in range(args.repeat):
                one_step(model, rows, tokens, args.vectors, autocast, gen)
            ms = (time.perf_counter() - started) / args.repeat * 1000
            print(f"{rows} rows x {tokens} tokens, {torch.get_num_threads()} threads, {name}: "
                  f"{ms:.0f} ms per step, {ms / rows:.0f} ms per row", flush=True)


if __name__ == "__main__":
    main()
