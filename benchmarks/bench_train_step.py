"""Forward and forward+backward tokens/s: nanoseek vs transformers, same weights, one process.

    .venv/bin/python benchmarks/bench_train_step.py            # batch 8 x 256, fp32 and bf16 autocast
    .venv/bin/python benchmarks/bench_train_step.py --iters 5
    .venv/bin/python benchmarks/bench_train_step.py --compile            # each nanoseek block torch.compiled
    .venv/bin/python benchmarks/bench_train_step.py --experts grouped    # torch._grouped_mm for the experts

Config (the model-core issue's): hidden 256, 4 layers (first dense), 8 heads, kv_lora_rank 64,
16 routed experts top-4, 1 shared expert. fwd is the inference forward to logits; fwd+bwd is a
training step's forward and backward through each library's own loss path on the same random
batch (nanoseek: fused lm_head + cross-entropy from train/losses.py; transformers: logits then
fp32 cross-entropy, as its causal-LM loss does). Times are medians over --iters after warm-up, and both models alternate each
iteration so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer, save_pretrained
from nanoseek.train.losses import linear_cross_entropy

CONFIG = dict(model_type="deepseek_v3", vocab_size=4096, hidden_size=256, intermediate_size=768,
              num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=128,
              kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
              moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
              n_group=1, topk_group=1, num_nextn_predict_layers=0, max_position_embeddings=1024)


def step_fn(model, logits_of, loss_of, x, y, backward: bool, autocast: bool):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()

    def run():
        if backward:
            model.zero_grad(set_to_none=True)
            with ctx:
                loss = loss_of(x, y)
            loss.backward()
        else:
            with torch.no_grad(), ctx:
                logits_of(x)
    return run


def nanoseek_loss(model):
    """nanoseek's training objective: final hidden -> fused lm_head + cross-entropy (train/losses.py)."""
    def loss_of(x, y):
        hidden, _ = model.forward_train(x)
        return linear_cross_entropy(hidden, model.lm_head.weight, y)
    return loss_of


def transformers_loss(model):
    """transformers' causal-LM loss path: full logits, upcast to fp32, cross-entropy."""
    def loss_of(x, y):
        return F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
    return loss_of


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The flags both training benchmarks take (besides --iters)."""
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def same_weights(config: dict):
    """A seeded nanoseek Transformer and transformers' model loaded from its save_pretrained folder."""
    import transformers
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**config))
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pretrained(ours, d)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return ours, ref


def time_pair(fns, iters: int) -> list[float]:
    for fn in fns:  # warm-up
        fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def _with_experts(module, grouped: bool, fn):
    def run():
        module._has_grouped_mm = lambda x: grouped
        fn()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p)
    p.add_argument("--iters", type=int, default=7, help="timed iterations (median reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile each nanoseek block (as --compile trains)")
    p.add_argument("--experts", choices=("auto", "grouped", "loop"), default="auto",
                   help="routed-expert products: the library's choice (auto: grouped on CUDA sm90 bf16, else the "
                        "loop), torch._grouped_mm, or the per-expert loop")
    p.add_argument("--baseline", choices=("transformers", "eager", "loop"), default="transformers",
                   help="what nanoseek is timed against: transformers, nanoseek uncompiled (with --compile), or "
                        "nanoseek with the per-expert loop (with --experts grouped); same weights, alternating")
    p.add_argument("--modes", default="fwd-fp32,fwdbwd-fp32,fwd-bf16,fwdbwd-bf16", help="comma-separated modes to time")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    import nanoseek.model
    if args.experts != "auto":  # benchmark-only switch over the library's own choice
        nanoseek.model._has_grouped_mm = lambda x: args.experts == "grouped"
    ours, ref = same_weights(CONFIG)
    switch = None
    if args.baseline == "eager":
        import copy
        ref = copy.deepcopy(ours)
    elif args.baseline == "loop":
        ref, switch = ours, nanoseek.model
    if args.compile:
        for layer in ours.model.layers:
            layer.compile()
    cfg = ours.config
    ours.train()
    ref.train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = args.batch * args.seq
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.seq}, {ours.num_params() / 1e6:.1f}M params, experts {args.experts}"
          f"{', compiled blocks' if args.compile else ''}")
    modes = args.modes.split(",")
    print(f"{'mode':<28}{'nanoseek tok/s':>16}{args.baseline + ' tok/s':>20}{'ratio':>8}")
    for autocast in (False, True):
        for backward in (False, True):
            if f"{'fwdbwd' if backward else 'fwd'}-{'bf16' if autocast else 'fp32'}" not in modes:
                continue
            fns = [step_fn(ours, ours, nanoseek_loss(ours), x, y, backward, autocast),
                   step_fn(ref, lambda t: ref(t).logits, transformers_loss(ref), x, y, backward, autocast)
                   if args.baseline == "transformers" else step_fn(ref, ref, nanoseek_loss(ref), x, y, backward, autocast)]
            if switch is not None:  # one model, the expert products switched before each call
                fns = [_with_experts(switch, True, fns[0]), _with_experts(switch, False, fns[1])]
            t_ours, t_ref = time_pair(fns, args.iters)
            name = f"{'fwd+bwd' if backward else 'fwd'} {'bf16 autocast' if autocast else 'fp32'}"
            print(f"{name:<28}{tokens / t_ours:>16,.0f}{tokens / t_ref:>20,.0f}{t_ref / t_ours:>7.2f}x")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
