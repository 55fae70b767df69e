"""Where the exact lm arithmetic loses bits against the float32 model: a float simulation.

    python tools/lm_precision_study.py ../shared/corpus/alice29.txt --chunks 2 --chunk-tokens 2047

Runs the float32 model with some of the exact arithmetic's roundings imitated (in float32,
"fake quantization"), on the first --chunks chunks of the text, and prints bits per byte for
each variant beside the exact model's own bits on the same chunks:

  weights    every Linear weight per output row at +-63 (as the exact model's `Q`, `s`)
  norm-in    the inputs of q/k/v, gate/up and the head (the norms' outputs), per token vector
             at +-L (L = 127 in the exact model)
  other-in   the inputs of o_proj and down_proj likewise
  2 limbs    an input at +-127 * 128 (two int8 limbs' worth) instead of +-127
  smoothed   SmoothQuant's factors as powers of two, 2**rne(log2(max|x|^a / max|W|^(1-a))), from
             the float32 model's channel maxima over --calibration's first tokens (with the
             prefix token; /3 rounds half the binary exponent instead, on the integer model's
             maxima: SPEC.md 1.6); --unsmoothed leaves Linears out
  --only     weights at +-63 and int8 inputs of the named Linears alone

The attention's own roundings (int8 heads, the exp table, 18-bit weights) are not imitated:
what the exact model loses beyond the last variant is theirs. A study tool: nothing in lmzip
uses it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmzip.models import load_model  # noqa: E402

NORM_FED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
OTHER = ("o_proj", "down_proj")


def fake_quant(t: torch.Tensor, levels: int) -> torch.Tensor:
    """Per last-axis vector, round to `levels` steps either side of zero of its largest magnitude."""
    a = t.abs().amax(-1, keepdim=True)
    step = torch.where(a > 0, a / levels, torch.ones_like(a))
    return torch.clamp(torch.round(t / step), -levels, levels) * step


def linears(model):
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


def untie_head(model) -> None:
    """The head gets its own copy, so that quantizing it leaves the input embedding float32."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)


def quantize_weights(model) -> None:
    with torch.no_grad():
        for _, mod in linears(model):
            mod.weight.copy_(fake_quant(mod.weight, 63))


def input_hooks(model, norm_levels: int, other_levels: int, smooth: dict | None = None) -> list:
    """Fake-quantize each Linear's input; with `smooth` (name: per-channel factor s), of x / s."""
    hooks = []
    for name, mod in linears(model):
        leaf = name.rsplit(".", 1)[-1]
        levels = norm_levels if leaf in NORM_FED else other_levels if leaf in OTHER else 0
        s = (smooth or {}).get(name)
        if levels and s is None:
            hooks.append(mod.register_forward_pre_hook(lambda m, args, lv=levels: (fake_quant(args[0], lv),)))
        elif levels:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, lv=levels, s=s: (fake_quant(args[0] / s, lv) * s,)))
    return hooks


def channel_maxima(model, ids) -> dict:
    """Each Linear's largest |input| per channel over `ids` (one float32 pass)."""
    maxima, hooks = {}, []
    for name, mod in linears(model):
        def record(m, args, name=name):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima[name], a) if name in maxima else a
        hooks.append(mod.register_forward_pre_hook(record))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return maxima


def smoothing(model, maxima: dict, alpha: float) -> dict:
    """SmoothQuant's factors as powers of two, s = 2^rne(log2(max|x|^a / max|W|^(1-a))), shared by
    the Linears that read the same input (q/k/v, gate/up)."""
    mods = dict(linears(model))
    out = {}
    for name, mod in mods.items():
        leaf = name.rsplit(".", 1)[-1]
        group = [name]
        if leaf in ("q_proj", "k_proj", "v_proj"):
            group = [name.rsplit(".", 1)[0] + "." + p for p in ("q_proj", "k_proj", "v_proj")]
        elif leaf in ("gate_proj", "up_proj"):
            group = [name.rsplit(".", 1)[0] + "." + p for p in ("gate_proj", "up_proj")]
        w = torch.stack([mods[g].weight.abs().amax(0) for g in group]).amax(0)
        x = maxima[name].clamp_min(1e-6)
        out[name] = torch.exp2(torch.round(torch.log2(x ** alpha / w.clamp_min(1e-6) ** (1 - alpha))))
    return out


def quantize_weights_smoothed(model, smooth: dict) -> None:
    with torch.no_grad():
        for name, mod in linears(model):
            s = smooth[name]
            mod.weight.copy_(fake_quant(mod.weight * s, 63) / s)


def float_bits(model, chunks, prefix) -> float:
    bits = 0.0
    for chunk in chunks:
        with torch.no_grad():
            logits = model(torch.tensor([list(prefix) + list(chunk)])).logits[0, len(prefix) - 1:-1]
        sym = torch.tensor(chunk)[:, None]
        bits -= torch.log_softmax(logits.double(), -1).gather(1, sym).sum().item() / math.log(2)
    return bits


def exact_bits(lm, chunks, prefix, arithmetic: int = 2) -> float:
    from lmzip.exact.coding import chunk_logits
    from lmzip.exact.forward import frequencies
    from lmzip.exact.model import ExactModel
    exact = ExactModel.from_loaded(lm, arithmetic)
    bits = 0.0
    for chunk in chunks:
        f = frequencies(exact, chunk_logits(exact, chunk, prefix)).double()
        sym = torch.tensor(chunk)[:, None]
        bits -= (f.gather(1, sym)[:, 0].log2() - f.sum(-1).log2()).sum().item()
    return bits


VARIANTS = {  # name: (weights, norm-in levels, other-in levels)
    "float32": (False, 0, 0),
    "weights": (True, 0, 0),
    "weights+norm-in": (True, 127, 0),
    "weights+other-in": (True, 0, 127),
    "weights+all-in": (True, 127, 127),
    "weights+all-in, norm-in 2 limbs": (True, 127 * 128, 127),
    "weights+all-in, all 2 limbs": (True, 127 * 128, 127 * 128),
    "smoothed a=0.5, weights+all-in": ("smooth", 127, 127),
    "smoothed a=0.5, weights+norm-in": ("smooth", 127, 0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--model", default=None)
    ap.add_argument("--chunk-tokens", type=int, default=2047)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--only", nargs="+", default=None, metavar="LEAF",
                    help="instead of the variants: weights at +-63 and int8 inputs of these Linears only "
                         "(q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head)")
    ap.add_argument("--calibration", default=None, help="text whose first --chunk-tokens tokens give "
                    "the smoothing factors (default: the chunk after those studied)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--calibration-tokens", type=int, default=0, help="default: --chunk-tokens")
    ap.add_argument("--unsmoothed", nargs="*", default=[], choices=["o_proj", "down_proj", "lm_head"],
                    help="Linears left unsmoothed (factor 1)")
    args = ap.parse_args(argv)
    lm = load_model(args.model, device="cpu")
    text = Path(args.file).read_bytes().decode("utf-8")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i:i + args.chunk_tokens] for i in range(0, len(ids), args.chunk_tokens)][:args.chunks]
    n = len(lm.tokenizer.decode([t for c in chunks for t in c]).encode("utf-8"))
    prefix = (lm.tokenizer.get_vocab().get("<|endoftext|>", lm.tokenizer.eos_token_id),)
    print(f"{args.file}: {len(chunks)} chunks of {args.chunk_tokens} tokens, {n} bytes", flush=True)
    if not args.no_exact:
        for arithmetic in (2, 3):
            print(f"  exact model /{arithmetic} (integer frequencies): "
                  f"{exact_bits(lm, chunks, prefix, arithmetic) / n:.4f} bpb", flush=True)
    untie_head(lm.model)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    if args.only:
        quantize_weights(lm.model)
        hooks = [mod.register_forward_pre_hook(lambda m, a: (fake_quant(a[0], 127),))
                 for name, mod in linears(lm.model) if name.rsplit(".", 1)[-1] in args.only]
        print(f"  weights, int8 inputs of {' '.join(args.only)}: {float_bits(lm.model, chunks, prefix) / n:.4f} bpb")
        for h in hooks:
            h.remove()
        return
    smooth = None
    if any(VARIANTS[v][0] == "smooth" for v in args.variants):
        cal_text = Path(args.calibration).read_bytes().decode("utf-8") if args.calibration else None
        cal = (lm.tokenizer(cal_text, add_special_tokens=False)["input_ids"][:args.chunk_tokens] if cal_text
               else ids[args.chunks * args.chunk_tokens:(args.chunks + 1) * args.chunk_tokens])
        cal = cal[:args.calibration_tokens or args.chunk_tokens]
        smooth = smoothing(lm.model, channel_maxima(lm.model, list(prefix) + cal), args.alpha)
        for name in smooth:
            if name.rsplit(".", 1)[-1] in args.unsmoothed:
                smooth[name] = torch.ones_like(smooth[name])
    for name in args.variants:
        weights, norm_levels, other_levels = VARIANTS[name]
        model = lm.model
        model.load_state_dict(original)
        if weights == "smooth":
            quantize_weights_smoothed(model, smooth)
        elif weights:
            quantize_weights(model)
        hooks = input_hooks(model, norm_levels, other_levels, smooth if weights == "smooth" else None)
        try:
            print(f"  {name}: {float_bits(model, chunks, prefix) / n:.4f} bpb", flush=True)
        finally:
            for h in hooks:
                h.remove()


if __name__ == "__main__":
    main()
