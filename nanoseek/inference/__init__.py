"""Inference: the latent caches, slot or paged, and the prefix cache (cache.py); token choice
(sampling.py); one request's settings and row state (sequence.py); the step function every caller
drives (batch.py: admit, chunked prefill, decode or MTP verify, preemption, leave); the model's
forwards and generate/stream (engine.py); continuous batching for the server (scheduler.py).

    from nanoseek.inference import Engine, SamplingParams
    engine = Engine(model, tokenizer)
    outs = engine.generate(prompts, max_new_tokens=64, temperature=0.6, top_p=0.95, seed=0)
"""

from .batch import Batch
from .engine import Engine
from .sequence import Completion, SamplingParams, Sequence

__all__ = ["Batch", "Completion", "Engine", "SamplingParams", "Sequence"]
