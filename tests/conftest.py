import os

import pytest
import torch

# Two cores: keep every test process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny matrices gain nothing from a second one, and on a shared
    2-core machine OpenMP's spinning threads slow every op ~100x whenever another process holds the
    other core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_(model, seed: int = 0, scale: float = 0.05):
    """Every weight random, norms and balancing biases included (nothing left at 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def tokens(completions):
    """The new token ids of each of ``Engine.generate``'s completions."""
    return [c.tokens for c in completions]


def arithmetic_checkpoint(path):
    """A tiny random model (2 layers, MoE, MTP) saved at `path` with a tokenizer trained on the
    built-in arithmetic task: what the RL and distillation tests start from."""
    from nanoseek import ModelConfig, Transformer, save_pretrained
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train([ex.text() for ex in get_task("arithmetic").examples("train", 200)], vocab_size=320)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2)
    save_pretrained(Transformer(cfg), path)
    tok.save_pretrained(path)
    return path


def paged_greedy(engine, prompts, max_tokens, pages=32, page=4):
    """Greedy tokens of `prompts` through the inference core on a paged cache (all admitted at once,
    stepped until done): what the engine's slot cache must agree with."""
    from nanoseek.inference import Batch, SamplingParams, Sequence
    from nanoseek.inference.cache import PagedLatentCache, PrefixCache
    cfg = engine.config
    cache = PagedLatentCache(cfg.num_hidden_layers, pages, page, cfg.cache_width, engine.dtype, slots=len(prompts),
                             max_len=cfg.max_position_embeddings)
    batch = Batch(engine, len(prompts), cfg.max_position_embeddings, None, PrefixCache(0, page), cache)
    seqs = [Sequence(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
    batch.admit(seqs)
    while batch.rows:
        batch.step()
        batch.leave()
    return [s.out for s in seqs]


def transformers_model(cfg, seed: int = 1):
    """transformers' model for a nanoseek config (built from its config.json), every weight random."""
    import warnings

    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    return randomize_(hf, seed=seed)
