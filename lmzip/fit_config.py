"""The fitting options: plain data, importable without torch (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FitConfig:
    vectors: int = 2            # K memory vectors a segment starts with
    max_steps: int = 300        # fixed segments: step budget per attempt; growing segments: steps
                                # allowed without verifying a longer length before the segment closes
    max_vectors: int | None = 8  # a fixed segment out of steps retries with twice the vectors, up
                                 # to this many (None: no retry); then it goes to zstd
    start_tokens: int = 32      # growing segments: the length first tried
    grow_tokens: int = 8        # growing segments: tokens added after each verified length
    max_tokens: int = 256       # growing segments: the longest a segment may grow
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
    prefix: tuple[int, ...] | None = None  # tokens before the vectors (None: the model's
                                           # start-of-text token, see `sink_prefix`)

    @property
    def vector_limit(self) -> int:
        """The most vectors a segment may end up with."""
        return max(self.max_vectors or self.vectors, self.vectors)
