"""The HF key mapping (hf/keys.py): experts split and stacked, MTP layers, tied head, quantized keys;
and the import rules the hf/quant split relies on (no private names across modules, no cycles)."""

import ast
from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.hf.keys import (EXPERT_KEY, has_mtp_layers, hf_keys, hf_state_dict, is_mtp_shared_copy, mtp_prefixes,
                              natural_key, quantized_keys)


def tiny(**kw):
    return Transformer(ModelConfig.preset("tiny").replace(**kw))


def test_experts_split_per_expert_and_mtp_copies_added():
    model = tiny()
    cfg = model.config
    sd = hf_state_dict(model)
    E = cfg.n_routed_experts
    stacked = model.model.layers[1].mlp.experts.up_proj
    for e in range(E):
        assert torch.equal(sd[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], stacked[e])
    assert "model.layers.1.mlp.experts.up_proj" not in sd
    n = cfg.num_hidden_layers
    assert mtp_prefixes(cfg) == (f"model.layers.{n}.",)
    assert torch.equal(sd[f"model.layers.{n}.shared_head.head.weight"], model.lm_head.weight)
    assert is_mtp_shared_copy(cfg, f"model.layers.{n}.embed_tokens.weight")
    assert not is_mtp_shared_copy(cfg, "model.embed_tokens.weight")
    # every key but the MTP layers' shared copies is one a loader expects
    assert set(hf_keys(model)) == {k for k in sd if not is_mtp_shared_copy(cfg, k)}
    assert has_mtp_layers(cfg, sd) and not has_mtp_layers(cfg, [k for k in sd if not k.startswith(f"model.layers.{n}.")])
    m = EXPERT_KEY.match("model.layers.3.mlp.experts.12.down_proj.weight")
    assert (m[1], m[2], m[3]) == ("model.layers.3.mlp.experts", "12", "down_proj")


def test_tied_head_is_not_written():
    model = tiny(tie_word_embeddings=True, num_nextn_predict_layers=0)
    assert "lm_head.weight" not in hf_state_dict(model) and "lm_head.weight" not in hf_keys(model)


def test_quantized_keys_follow_keep_and_the_head():
    cfg = tiny().config
    keys = quantized_keys(cfg, ["embed_tokens", "gate", "kv_b_proj"])
    n = cfg.num_hidden_layers
    assert "lm_head.weight" in keys and f"model.layers.{n}.shared_head.head.weight" in keys
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys
    assert not [k for k in keys if "kv_b_proj" in k or ".mlp.gate." in k or "embed" in k or "norm" in k]
    kept_head = quantized_keys(cfg, ["lm_head"])
    assert "lm_head.weight" not in kept_head and f"model.layers.{n}.shared_head.head.weight" not in kept_head


def test_natural_key_orders_numbers_as_numbers():
    keys = ["model.layers.10.x", "model.layers.2.x", "model.layers.1.x"]
    assert sorted(keys, key=natural_key) == ["model.layers.1.x", "model.layers.2.x", "model.layers.10.x"]


# ----------------------------------------------------------------------------- import rules

ROOT = Path(__file__).resolve().parents[1] / "nanoseek"


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, name)} for every `from nanoseek... import name` in nanoseek/."""
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    out = {}
    for name, p in mods.items():
        package = name.split(".") if p.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                if base.startswith("nanoseek"):
                    found |= {(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base, a.name) for a in node.names}
        out[name] = found
    return out


def test_no_private_names_imported_across_modules():
    bad = [(m, target, n) for m, deps in _imports().items() for target, n in deps
           if n.startswith("_") and not target.endswith("." + n)]
    assert not bad


def test_no_import_cycle_through_hf_quant_or_kernels():
    graph = {m: {t for t, _ in deps if t != m} for m, deps in _imports().items()}
    mine = [m for m in graph if m.startswith(("nanoseek.hf", "nanoseek.quant", "nanoseek.kernels"))]

    def reaches(start, goal, seen):
        for d in graph.get(start, ()):
            if d == goal or (d not in seen and (seen.add(d) or reaches(d, goal, seen))):
                return True
        return False
    assert not [m for m in mine if reaches(m, m, set())]
