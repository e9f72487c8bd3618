"""config.json's spellings, read into ``ModelConfig`` fields (``ModelConfig.from_hf`` calls these).

    read_config   a directory, the file or a dict -> (dict, where it came from)
    v4_fields     DeepSeek-V4's keys, published or transformers' spelling
    rope_fields   the RoPE/YaRN block, rope_scaling or rope_parameters
"""

from __future__ import annotations

import json
import os
from typing import Any


def read_config(source: str | os.PathLike | dict) -> tuple[dict, str]:
    """A config.json's dict (from a directory, the file, or the dict itself) and where it came from."""
    if isinstance(source, dict):
        return dict(source), "config dict"
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            return json.load(f), path
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def v4_fields(d: dict) -> dict:
    """Pop a V4 config.json's keys in either spelling, DeepSeek's published one (compress_ratios,
    num_hash_layers, qk_rope_head_dim, rope_scaling) or the one transformers writes (layer_types +
    compress_rates, mlp_layer_types, partial_rotary_factor, rope_parameters {main, compress}), as
    ModelConfig fields; the compress block's YaRN is left in d for rope_fields."""
    kw: dict[str, Any] = {}
    if "sliding_window" in d:
        kw["window_size"] = d.pop("sliding_window")
    types, rates = d.pop("layer_types", None), dict(d.pop("compress_rates", None) or {})
    for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                         ("compress_rate_hca", "heavily_compressed_attention")):
        if legacy in d:
            rates[kind] = d.pop(legacy)
    if "compress_ratios" not in d and types is not None:
        rate = {"sliding_attention": 0, "compressed_sparse_attention": rates.get("compressed_sparse_attention", 4),
                "heavily_compressed_attention": rates.get("heavily_compressed_attention", 128)}
        unknown = sorted(set(types) - set(rate))
        if unknown:
            raise ValueError(f"layer_types: {unknown} are not V4 layer types ({', '.join(rate)})")
        d["compress_ratios"] = [rate[t] for t in types] + [0] * int(d.get("num_nextn_predict_layers", 1) or 0)
    mlp = d.pop("mlp_layer_types", None)
    if mlp is not None and "num_hash_layers" not in d:
        n = next((i for i, t in enumerate(mlp) if t != "hash_moe"), len(mlp))
        if any(t == "hash_moe" for t in mlp[n:]):
            raise ValueError("mlp_layer_types: hash_moe layers must come first (num_hash_layers)")
        d["num_hash_layers"] = n
    factor = d.pop("partial_rotary_factor", None)
    if factor is not None and "qk_rope_head_dim" not in d:
        d["qk_rope_head_dim"] = int(d.get("head_dim", 512) * factor)
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("main"), dict):
        d["rope_theta"] = rope["main"].get("rope_theta", d.get("rope_theta", 10000.0))
        compress = {k: v for k, v in (rope.get("compress") or {}).items() if k != "partial_rotary_factor"}
        if "rope_theta" in compress:
            d["compress_rope_theta"] = compress.pop("rope_theta")
        d["rope_parameters"] = compress
    for block in ("rope_parameters", "rope_scaling"):  # V4's compressed rotary never rescales cos/sin
        if isinstance(d.get(block), dict) and d[block].get("attention_factor") in (1, 1.0):
            d[block] = {k: v for k, v in d[block].items() if k != "attention_factor"}
    return kw


def rope_fields(d: dict) -> dict:
    """Pop the RoPE/YaRN keys from a config dict, in either spelling (rope_theta + rope_scaling{type},
    or transformers' newer rope_parameters{rope_type}), as ModelConfig fields."""
    kw: dict[str, Any] = {}
    rope = dict(d.pop("rope_parameters", None) or {})
    rope.update(d.pop("rope_scaling", None) or {})
    theta = d.pop("rope_theta", None) or rope.get("rope_theta")
    if theta is not None:
        kw["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise ValueError(f"rope_type={rope_type!r} is not supported (default, linear, llama3, yarn)")
    if rope.get("attention_factor") is not None:
        raise ValueError("rope_scaling.attention_factor is not supported (YaRN's amplitude comes from its mscales)")
    kw["rope_type"] = rope_type
    if rope_type != "default":
        kw["rope_factor"] = float(rope.get("factor", 1.0))
    if rope_type in ("llama3", "yarn"):
        kw["original_max_position_embeddings"] = rope.get(
            "original_max_position_embeddings", d.get("original_max_position_embeddings"))
    for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor"):
        if rope_type in ("llama3", "yarn") and rope.get(key) is not None:
            kw[key] = float(rope[key])
    d.pop("original_max_position_embeddings", None)
    return kw
