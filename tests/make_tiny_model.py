"""Build the tiny test model in tests/data/tiny-llama (run once; the output is committed).

A Llama-architecture model with random weights from a fixed seed and a
byte-level tokenizer (256 byte tokens, no merges) made with the `tokenizers`
library: any UTF-8 text round-trips through it exactly, and it loads through
the same `--model DIRECTORY` path as any real model. The archives in
formats/ were made with it, so rebuilding it with other weights breaks them.

    python tests/make_tiny_model.py [OUTPUT_DIR]
"""

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

OUT = Path(__file__).parent / "data" / "tiny-llama"


def build_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def build_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(20261122)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.2, eos_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return LlamaForCausalLM(config)


def main(out: Path) -> None:
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    model.to(torch.float16)  # halves the committed size; lmzip computes in float32
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
