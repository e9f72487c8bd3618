"""The model's forwards for inference, and ``generate`` / ``stream`` over the inference core.

    engine = Engine(load_pretrained("out/model"), tokenizer)
    outs = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)           # greedy -> [Completion]
    outs[0].tokens, outs[0].finish_reason                                     # new ids, "stop" | "length"
    outs = engine.generate(prompts, 32, temperature=0.7, top_p=0.9, seed=0)  # sampled, reproducible
    outs = engine.generate(prompts, 32, speculative="mtp")                   # MTP drafts, same output
    for new in engine.stream(prompts, 32): ...                               # new ids per prompt, as made
    engine.stats  # tokens_per_forward, acceptance_rate, prefill_s, decode_s ...

``Engine.generate`` is "admit all, step until done" on a ``Batch`` (batch.py), the same core the
server's scheduler drives between requests; the engine itself holds the model's forwards: the
expanded MLA path for prefill, the absorbed one for decoding (optionally one compiled whole-cache
step), and the MTP module's forward for drafting. Its cache is a slot per prompt sized for the
call (``LatentCache``); with ``prefix_cache_bytes`` prompt prefixes are kept across calls.
Prompts in one call share a generator, so a seed reproduces the batch; a failure raises.
"""

from __future__ import annotations

import torch

from ..attention import Ragged, RaggedPart
from .batch import SPECULATIVE, Batch
from .cache import LatentCache, PrefixCache, attention_mask
from .compressed import CompressedCache
from .sequence import Completion, SamplingParams, Sequence, check_prompt, new_generator

# SamplingParams fields Engine.generate/stream take as keywords beside their own arguments
CONTROLS = {"min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
            "ignore_eos"}

class Engine:
    """The model's forwards and ``generate``/``stream`` over a ``Batch``; see the module docstring."""

    def __init__(self, model, tokenizer=None, compile: bool = False, prefix_cache_bytes: int = 0):
        """compile=True: the one-token decode step runs through torch.compile over the whole
        preallocated cache (static shapes; the first request pays the compilation).
        prefix_cache_bytes > 0: prompt prefixes are kept and reused across calls; call
        ``prefix.clear()`` after changing the weights."""
        # a vision-language model (vision.VLModel): the engine drives its language model and runs
        # the towers once per image when a prompt is admitted (``images=`` of generate/stream)
        self.vision = model.eval() if hasattr(model, "language") else None
        self.image_processor = None  # set by from_pretrained from the checkpoint's preprocessor_config.json
        model = model.language if self.vision is not None else model
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        if compile and self.config.attention == "v4":
            raise ValueError("compile=True: DeepSeek-V4's cache has no whole-cache compiled decode step")
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.stats: dict = {}
        self._compiled_decode = torch.compile(self._decode_whole, dynamic=True) if compile else None
        self._streams: torch.Tensor | None = None  # DeepSeek-V4: the last forward's residual streams

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        quantize: str | None = None, compile: bool = False, prefix_cache_bytes: int = 0,
                        group_size: int = 128) -> "Engine":
        """An Engine over the checkpoint at `path` with the tokenizer saved next to it, on `device`,
        optionally quantized to int8/int4 as it loads (``load_pretrained``'s quantize and group_size)."""
        from ..hf.io import load_with_tokenizer
        from ..hf.vl import is_vl_checkpoint, load_image_processor, load_vl_with_tokenizer
        if not is_vl_checkpoint(path):
            model, tokenizer = load_with_tokenizer(path, dtype=dtype, device=device, quantize=quantize,
                                                   group_size=group_size)
            return cls(model, tokenizer, compile=compile, prefix_cache_bytes=prefix_cache_bytes)
        if quantize is not None:
            raise ValueError(f"{path}: a DeepSeek-VL checkpoint does not load quantized")
        model, tokenizer = load_vl_with_tokenizer(path, dtype=dtype, device=device)
        engine = cls(model, tokenizer, compile=compile, prefix_cache_bytes=prefix_cache_bytes)
        engine.image_processor = load_image_processor(path, model.config)
        return engine

    # ------------------------------------------------------------------ sizes
    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def eos_ids(self) -> set[int]:
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_id", None) is not None:
            eos.add(self.tokenizer.eos_id)
        return eos

    def cache_bytes_per_token(self) -> int:
        """Main-model cache bytes per token: ``cache_width`` (MLA's latent or GQA's K/V) x layers x element size.
        Speculative decoding adds the MTP module's own entries (one more layer's worth per depth)."""
        return self.config.cache_bytes_per_token(self.dtype.itemsize)

    def new_cache(self, batch_size: int, max_len: int, mtp_layers: int = 0) -> LatentCache | CompressedCache:
        cfg = self.config
        if cfg.attention == "v4":  # a window and compressed entries (no per-token latent)
            return CompressedCache(cfg, batch_size, max_len, self.dtype, self.device, mtp_layers=mtp_layers)
        return LatentCache(cfg.num_hidden_layers + mtp_layers, batch_size, max_len, cfg.cache_width,
                           self.dtype, self.device)

    # ------------------------------------------------------------------ forwards
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                absorb: bool, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Main model over ids [B, T] at positions [B, T] -> normed final hidden [B, T, D]
        (inputs_embeds [B, T, D]: ``embed_images``' instead of the ids' embeddings)."""
        cache.prepare(positions)
        if self.config.attention == "v4":  # its MTP module reads the residual streams: kept for mtp_forward
            self._streams = self.model.forward_streams(ids, positions, cache, inputs_embeds)
            return self.model.model.norm(self.model.model.hc_head(self._streams))
        h = self.model.forward_hidden(ids, positions, _mask(positions, cache), cache, absorb, inputs_embeds)
        return self.model.model.norm(h)

    def forward_ragged(self, parts: list[tuple[torch.Tensor, torch.Tensor, LatentCache, bool]]) -> list[torch.Tensor]:
        """Several forwards as one: parts of (ids [B, T], positions [B, T], cache view, absorb) ->
        each part's normed final hidden [B, T, D]. Every weight is read once for all the parts
        (``attention.Ragged``); attention runs per part. DeepSeek-V4 has no ragged path."""
        if self.config.attention == "v4":
            raise ValueError("DeepSeek-V4 forwards one row at a time: no ragged forward")
        specs = []
        for ids, positions, cache, absorb in parts:
            cache.prepare(positions)
            specs.append(RaggedPart(ids.shape[0], ids.shape[1], _mask(positions, cache), cache, absorb))
        flat = [torch.cat([t.reshape(1, -1) for t in ts], dim=1) for ts in zip(*[p[:2] for p in parts])]
        h = self.model.model.norm(self.model.forward_hidden(flat[0], flat[1], None, Ragged(specs)))
        sizes = [p.rows * p.tokens for p in specs]
        return [x.view(p.rows, p.tokens, -1) for p, x in zip(specs, h[0].split(sizes))]

    # ------------------------------------------------------------------ images
    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images -> their tokens [n * N, D], one after another (the towers run once per image)."""
        if self.vision is None:
            raise ValueError("this model has no vision towers; it cannot take images")
        from ..vision.image import ImageProcessor
        proc = self.image_processor or ImageProcessor.for_config(self.vision.config)
        low, high = proc(images)
        with torch.inference_mode():
            dev, dt = self.device, self.dtype
            tokens = self.vision.model.encode_images(low.to(dev, dt), None if high is None else high.to(dev, dt))
        return tokens.flatten(0, 1).to(dt)

    def embed_images(self, ids: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Embeddings of a prefill chunk ids [B, T] (row b: seqs[b] from its ``prefilled``), each
        prompt's image tokens at its <image_placeholder> positions (generated ids are never replaced)."""
        h = self.model.model.embed_tokens(ids)
        image_id = self.vision.config.image_token_id if self.vision is not None else None
        for b, s in enumerate(seqs):
            if s.images is None:
                continue
            prompt = torch.tensor(s.prompt, device=ids.device)
            slots = (prompt == image_id).nonzero().flatten()             # every image position in the prompt
            before = int((slots < s.prefilled).sum())                    # filled by earlier chunks
            here = slots[(slots >= s.prefilled) & (slots < s.prefilled + ids.shape[1])]
            h[b, here - s.prefilled] = s.images[before:before + len(here)].to(h.dtype)
        return h

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """One token per row through the absorbed path (the compiled whole-cache step if enabled)."""
        if self._compiled_decode is None:
            return self.forward(ids, positions, cache, absorb=True)
        cache.prepare(positions, whole=True)
        return self._compiled_decode(ids, positions, cache)

    def _decode_whole(self, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """forward() for one token per row over all the cache's slots: the step torch.compile sees."""
        mask = attention_mask(positions, cache.max_len)
        return self.model.model.norm(self.model.forward_hidden(ids, positions, mask, cache, absorb=True))

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                    cache: LatentCache, absorb: bool) -> torch.Tensor:
        """MTP module 1: (main hidden at i, token i+1) -> its normed output [B, T, D] predicting i+2.
        DeepSeek-V4's module reads the main model's residual streams instead of the hidden: those of
        the last ``forward``, whose first T positions `hidden` is."""
        layer = self.model.mtp_layers[0]
        cache.prepare(positions)
        if self.config.attention == "v4":
            streams = self._streams[:, :hidden.shape[1]]
            return layer(streams, self.model.model.embed_tokens(next_ids), next_ids, positions, cache)
        emb = self.model.model.embed_tokens(next_ids)
        cos, sin = self.model.model.rotary_emb(positions, emb.dtype)
        return layer.shared_head.norm(layer(hidden, emb, cos, sin, _mask(positions, cache), cache, absorb))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    # ------------------------------------------------------------------ requests
    def _validate(self, prompts, max_new_tokens, params: SamplingParams, speculative) -> None:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
        for i, p in enumerate(prompts):
            check_prompt(p, max_new_tokens, self.config.max_position_embeddings, self.config.vocab_size,
                         what=f"prompts[{i}]")
        params.validate()
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative={speculative!r}: expected None or 'mtp'")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: list[list[int]] | None = None, speculative: str | None = None,
                 seeds: list[int] | None = None, images: list[list] | None = None, **controls) -> list[Completion]:
        """Each prompt's new token ids and finish reason (prompt, EOS and stop sequence excluded):
        admit every prompt, step until all are done. seeds: one per prompt instead of `seed`, each
        row then sampled with its own generator, so a row's tokens do not depend on the others.
        images: per prompt, the PIL images whose tokens fill its <image_placeholder> ids (a VL model).
        controls: the server's other settings, as ``SamplingParams`` fields (CONTROLS: min_p,
        presence/frequency/repetition_penalty, logit_bias, min_tokens, ignore_eos)."""
        seqs, batch = self._start(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, speculative, seeds,
                                  images, controls)
        for _ in self._run(seqs, batch):
            pass
        return [Completion(s.out, s.finish_reason, s.cached_tokens) for s in seqs]

    def stream(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop: list[list[int]] | None = None, speculative: str | None = None, images: list[list] | None = None,
               **controls):
        """Like ``generate`` but yields, after every forward, each prompt's newly final tokens.

        Tokens that might begin a stop sequence are held back until they cannot. Greedy when
        temperature is 0; a seed makes sampling reproducible. speculative="mtp": the MTP module
        drafts one token that the main model verifies in the same forward as the next.
        """
        seqs, batch = self._start(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, speculative,
                                  None, images, controls)
        yield from self._run(seqs, batch)

    def attach_images(self, seq: Sequence, images: list | None, what: str = "the prompt") -> None:
        """Encode a prompt's images and check they fill its <image_placeholder> ids exactly."""
        tokens = self.encode_images(list(images)) if images else None
        self.check_images(seq.prompt, tokens, what, len(images or []))
        seq.images = tokens

    def check_images(self, prompt: list[int], tokens: torch.Tensor | None, what: str = "the prompt",
                     n_images: int | None = None) -> None:
        """ValueError unless image tokens [n, D] fill the prompt's <image_placeholder> ids exactly."""
        image_id = self.vision.config.image_token_id if self.vision is not None else None
        slots = sum(t == image_id for t in prompt) if image_id is not None else 0
        if tokens is None:
            if slots:
                raise ValueError(f"{what} has {slots} image positions but no images")
            return
        if tokens.shape[0] != slots:
            per = self.vision.config.num_image_tokens
            n = n_images if n_images is not None else tokens.shape[0] // per
            raise ValueError(f"{what}: {n} images need {n} x {per} <image_placeholder> ids; the prompt has {slots}")

    def image_slots(self) -> list[int]:
        """The ids one image takes in a prompt (a content piece for ``chat_prompt``)."""
        cfg = self.vision.config
        return [cfg.image_token_id] * cfg.num_image_tokens

    def _start(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, speculative, seeds=None,
               images=None, controls=None):
        """Validate a generate/stream call and admit its prompts into a batch of their own."""
        unknown = sorted(set(controls or {}) - CONTROLS)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a generation setting (expected one of {', '.join(sorted(CONTROLS))})")
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed,
                                stop_token_ids=[list(s) if isinstance(s, (list, tuple)) else s for s in stop or []],
                                **(controls or {}))
        self._validate(prompts, max_new_tokens, params, speculative)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
        if temperature <= 0:
            generators = [None] * len(prompts)
        elif seeds is None:  # one stream for the whole batch
            generators = [new_generator(seed, self.device)] * len(prompts)
        else:
            generators = [new_generator(s, self.device) for s in seeds]
        seqs = [Sequence(p, params, generator=g) for p, g in zip(prompts, generators)]
        for i, (s, imgs) in enumerate(zip(seqs, images or [None] * len(seqs))):
            self.attach_images(s, imgs, what=f"prompts[{i}]")
        batch = Batch(self, len(seqs), max(len(p) for p in prompts) + max_new_tokens + 1, speculative)
        batch.admit(seqs)
        return seqs, batch

    def _run(self, seqs: list[Sequence], batch: Batch):
        """Step the batch until every sequence is done, yielding each one's new final tokens."""
        while True:
            failed = next((s for s in seqs if s.finish_reason == "error"), None)
            if failed is not None:
                raise RuntimeError(failed.error) from failed.exception
            self.stats = _rates(batch.stats)
            yield [s.take()[0] for s in seqs]
            batch.leave()
            if not batch.rows:
                return
            batch.step()


def _rates(stats: dict) -> dict:
    """A batch's counters plus tokens per forward and the MTP acceptance rate."""
    s = dict(stats)
    s["tokens_per_forward"] = s["new_tokens"] / max(s["row_forwards"], 1)
    s["acceptance_rate"] = s["accepted"] / s["drafted"] if s["drafted"] else None
    return s


def _mask(positions: torch.Tensor, cache: LatentCache) -> torch.Tensor | None:
    """The forward's mask, or None when every row is at the same contiguous positions and either
    one token is decoded or the keys start at 0: plain causal attention is then exact, and the
    layers skip building and applying a mask (prefill takes SDPA's causal kernel)."""
    start = cache.start
    if cache.unpadded:  # DeepSeek-V4 masks by position itself
        return None
    if start is not None and (positions.shape[1] == 1 or start == 0):
        return None
    return attention_mask(positions, cache.attend_len)
