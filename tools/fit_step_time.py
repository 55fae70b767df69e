"""Time the fit loop's steps over 1 to 256 rows: how much host work a step costs as rows grow.

Each run fits ROWS fixed segments of --tokens tokens together, at a margin no
row can reach, so every step is a plain step (forward, backward, decisions,
masked update) and no row leaves before --steps. A step's time is the interval
between two calls of the loop's per-step decision read-out; the median over
the steps after the first few is reported. "model" is the forward and backward
pass alone at the same shape (the arithmetic); "host" is the step minus that;
"tensor ops" counts the operations a step dispatches (each is host work, and
a kernel launch on a GPU), a count that does not depend on the machine's load.
On the tiny test model the arithmetic is small, so "host" is the loop's own
cost. The README's figures come from:

    python tools/fit_step_time.py --rows 1 8 64 256 --threads 2
    python tools/fit_step_time.py --model embedded --rows 1 8 --tokens 27 --steps 12 --threads 2
    python tools/fit_step_time.py --model embedded --device cuda --bf16 --rows 1 8 64 256 512
    python tools/fit_step_time.py --model embedded --device cuda --bf16 --rows 1 16 64 --tokens 256 --steps 6

On a GPU each line also gives the most memory the loop held (the model included): with the
longest growing segments (--tokens 256, as --max-tokens), what sizes --batch-size there.

On a GPU the loop's one host sync per step makes the interval between two read-outs a whole step;
"model" is timed with the device synchronized before and after.

`--model micro` builds a 6,000-parameter model (hidden size 16, one layer) on the test model's
byte tokenizer, to see how far the arithmetic still counts at 256 rows on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmzip import fit  # noqa: E402
from lmzip.models import load_model  # noqa: E402
from lmzip.segmenting import Piece, Stream  # noqa: E402

TINY = str(ROOT / "tests" / "data" / "tiny-llama")
TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do. "


def streams(lm, rows: int, tokens: int):
    """`rows` fixed streams of `tokens` tokens each, from different places of the text."""
    copies = 8
    while len(ids := lm.tokenizer(TEXT * copies, add_special_tokens=False)["input_ids"]) <= tokens:
        copies *= 2  # longer segments than 8 copies hold (the embedded model: 185 tokens)
    for r in range(rows):
        start = (r * 7) % (len(ids) - tokens)
        chosen = ids[start:start + tokens]
        piece = Piece(lm.tokenizer.decode(chosen).encode("utf-8"), tuple(chosen))
        yield r, Stream.whole(lm.tokenizer, piece)


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched (forward, backward and the loop's own): each is
    host work, and on a GPU a kernel launch."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_times(lm, rows: int, tokens: int, steps: int, vectors: int, bf16: bool,
               counter: OpCounter | None = None) -> list[float]:
    """Seconds between consecutive steps of the real fit loop (tensor operations, with a counter)."""
    stamps: list[float] = []
    hook = "step_decisions" if hasattr(fit, "step_decisions") else "_batch_inputs"  # older loops
    real = getattr(fit, hook)

    def stamped(*args, **kwargs):
        stamps.append(counter.count if counter else time.perf_counter())
        return real(*args, **kwargs)

    setattr(fit, hook, stamped)
    try:
        cfg = fit.FitConfig(vectors=vectors, max_vectors=None, max_steps=steps, batch_size=rows, margin=1e9,
                            bf16=bf16)
        with counter or contextlib.nullcontext():
            for _ in fit.fit_streams(lm, streams(lm, rows, tokens), cfg):
                break  # the first row out of steps ends the measurement
    finally:
        setattr(fit, hook, real)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def model_pass(lm, rows: int, tokens: int, vectors: int, bf16: bool, repeat: int = 5) -> float:
    """Median seconds of the forward and backward pass alone, as the loop runs it: gradients to
    the vectors only, logits at the token positions only, an attention mask."""
    model = lm.fitting_copy() if bf16 else lm.model
    body, head = model.base_model, model.get_output_embeddings()
    device = lm.device
    times = []
    for _ in range(repeat + 1):
        vec = (0.1 * torch.randn(rows, vectors, lm.hidden_size, device=device)).requires_grad_(True)
        fixed = 0.1 * torch.randn(rows, 1 + tokens, lm.hidden_size, device=device)
        mask = torch.ones(rows, 1 + vectors + tokens, dtype=torch.long, device=device)
        target = torch.randint(0, lm.vocab_size, (rows, tokens), device=device)
        synchronize(device)
        started = time.perf_counter()
        x = torch.cat([fixed[:, :1], vec, fixed[:, 1:]], dim=1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            h = body(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
            logits = head(h[:, vectors: vectors + tokens]).float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)
        torch.autograd.grad(loss, vec)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def micro_model(folder: Path) -> str:
    """A Llama of hidden size 16 and one layer on the tiny model's byte tokenizer, saved in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer = runpy.run_path(str(ROOT / "tests" / "make_tiny_model.py"))["build_tokenizer"]
    tokenizer = build_tokenizer()
    end = len(tokenizer) - 1
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.2, eos_token_id=end, bos_token_id=end,
                         pad_token_id=end)
    with torch.random.fork_rng():  # leaves the caller's random state alone
        torch.manual_seed(1)
        LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (the test model, the default), 'micro', 'embedded', or a model spec")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vectors", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="fit under bf16 as lmzip does where it is native")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        spec = micro_model(Path(folder)) if args.model == "micro" else {"tiny": TINY, "embedded": None}.get(
            args.model, args.model)
        report(load_model(spec, device=args.device), args)


def report(lm, args) -> None:
    first = None
    cuda = lm.device.type == "cuda"
    for rows in args.rows:
        if cuda:
            torch.cuda.reset_peak_memory_stats(lm.device)
        times = step_times(lm, rows, args.tokens, args.steps, args.vectors, args.bf16)[args.skip:]
        # what the loop held at most, the model included: sizes --batch-size on a GPU
        peak = f", peak {torch.cuda.max_memory_allocated(lm.device) / 2**30:.2f} GiB" if cuda else ""
        step = statistics.median(times)
        arithmetic = model_pass(lm, rows, args.tokens, args.vectors, args.bf16)
        ops = statistics.median(step_times(lm, rows, args.tokens, args.skip + 4, args.vectors, args.bf16,
                                           OpCounter())[args.skip:])
        first = first or step
        where = f"{torch.get_num_threads()} threads" if lm.device.type == "cpu" else str(lm.device)
        print(f"{rows:4d} rows x {args.tokens} tokens, {where}: "
              f"step {step * 1000:7.1f} ms ({step / first:4.1f}x 1 row), model {arithmetic * 1000:7.1f} ms, "
              f"host {(step - arithmetic) * 1000:6.1f} ms, {ops:.0f} tensor ops, {len(times)} steps{peak}",
              flush=True)


if __name__ == "__main__":
    main()
