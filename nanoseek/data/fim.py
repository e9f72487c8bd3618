"""Fill-in-the-middle (FIM) document transform, as DeepSeek-Coder applies it during pretraining.

    rng = random.Random(0)
    docs = [fim_transform(d, rate=0.5, rng=rng) for d in docs]

A document is cut at two random character positions into prefix, middle and suffix, and
rearranged so that ordinary next-token training teaches the model to write the middle given
both sides (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"):

  PSM  <｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>{middle}
  SPM  <｜fim▁begin｜><｜fim▁hole｜>{suffix}<｜fim▁end｜>{prefix}{middle}

DeepSeek-Coder's sentinels play the roles of <PRE> (fim▁begin), <SUF> (fim▁hole) and <MID>
(fim▁end). In SPM the prefix and middle are contiguous, so the middle continues the prefix. At
inference a PSM prompt ends with <｜fim▁end｜> and the model writes the middle.
"""

from __future__ import annotations

import random

from nanoseek.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Cut `text` at two uniform random character positions into (prefix, middle, suffix)."""
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:a], text[a:b], text[b:]


def psm(prefix: str, middle: str, suffix: str) -> str:
    """Prefix-suffix-middle layout."""
    return f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}{middle}"


def spm(prefix: str, middle: str, suffix: str) -> str:
    """Suffix-prefix-middle layout (the variant whose prefix runs straight into the middle)."""
    return f"{FIM_BEGIN}{FIM_HOLE}{suffix}{FIM_END}{prefix}{middle}"


def fim_transform(text: str, rate: float, rng: random.Random, spm_rate: float = 0.5) -> str:
    """With probability `rate` return `text` in FIM layout (SPM with probability `spm_rate`,
    else PSM); otherwise return it unchanged. Draws from `rng` only, so it is reproducible."""
    if not 0.0 <= rate <= 1.0 or not 0.0 <= spm_rate <= 1.0:
        raise ValueError(f"rate={rate}, spm_rate={spm_rate}: both must be in [0, 1]")
    if rng.random() >= rate:
        return text
    layout = spm if rng.random() < spm_rate else psm
    return layout(*fim_split(text, rng))
