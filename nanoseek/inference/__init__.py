"""Inference: the latent and prefix caches (cache.py), token choice (sampling.py), the core that
every caller drives (engine.py: Engine, Batch, Sequence) and continuous batching (scheduler.py).

    from nanoseek.inference import Engine, SamplingParams
    engine = Engine(model, tokenizer)
    outs = engine.generate(prompts, max_new_tokens=64, temperature=0.6, top_p=0.95, seed=0)
"""

from .engine import Batch, Completion, Engine, SamplingParams, Sequence

__all__ = ["Batch", "Completion", "Engine", "SamplingParams", "Sequence"]
