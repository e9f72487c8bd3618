"""FP8 vs bf16 training of a DeepSeek-V3-shaped model: tokens/s, MFU and the loss gap (GPU; gpu_check.sh step 5).

    python benchmarks/bench_train_fp8.py                                   # ~0.9B params, 200 steps each, one GPU
    torchrun --nproc_per_node 8 benchmarks/bench_train_fp8.py --ep 8       # FSDP2 + EP across GPUs
    python benchmarks/bench_train_fp8.py --small --steps 3 --no-compile --emulate   # CPU smoke of the path

Both runs see the same data in the same order from the same initial weights: bf16 autocast +
torch.compile'd blocks, then the same with the blocks' linears in FP8 (torchao float8, rowwise
scaling). DeepSeek-V3 reports its FP8 loss within 0.25% of BF16's; the figure printed is the
relative gap of the mean loss over the last 10% of steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.data import load_data, tokenize_documents, pack_chat  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train import parallelize  # noqa: E402
from nanoseek.train.distributed import init_distributed, shutdown  # noqa: E402
from nanoseek.train.loop import TrainConfig, train  # noqa: E402

# DeepSeek-V3's shape scaled to ~0.9B parameters (~0.2B active): MLA with the published head sizes,
# 32 fine-grained routed experts top-6 + 1 shared, sigmoid routing with the balancing bias, MTP.
V3_1B = dict(model_type="deepseek_v3", hidden_size=1536, intermediate_size=4096, num_hidden_layers=8,
             first_k_dense_replace=1, num_attention_heads=12, q_lora_rank=768, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=768,
             n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=6, n_group=4, topk_group=2,
             scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
             num_nextn_predict_layers=1, max_position_embeddings=4096)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--small", action="store_true", help="the tiny preset instead of the ~1B shape (smoke test)")
    p.add_argument("--emulate", action="store_true", help="FP8 casts without FP8 matmuls (runs on a CPU)")
    args = p.parse_args(argv)
    env = init_distributed()
    docs = load_data("arithmetic", n=20000, split="train", seed=0)
    tok = Tokenizer.train(docs[:2000], vocab_size=512)
    rows = pack_chat(tokenize_documents(docs, tok), args.seq_len, drop_long=False, pad_id=tok.pad_id or 0)
    shape = ModelConfig.preset("tiny") if args.small else ModelConfig(**V3_1B)
    cfg = shape.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    results = {}
    if args.emulate:  # --fp8 in the loop means real FP8 matmuls; emulation is for a CPU smoke run only
        real = parallelize.apply_fp8
        parallelize.apply_fp8 = lambda m: real(m, emulate=True)
    for name, fp8 in (("bf16", False), ("fp8", True)):
        torch.manual_seed(0)
        model = Transformer(cfg)
        tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                         lr=1e-3, warmup_steps=max(1, args.steps // 20), bf16=True, compile=args.compile, fp8=fp8,
                         ep=args.ep, progress=False)
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / name
            if env.is_main and name == "bf16":
                print(f"{model.num_params() / 1e9:.2f}B parameters ({model.num_params(active=True) / 1e9:.2f}B active), "
                      f"{len(rows)} rows of {args.seq_len}, {env.world_size} process(es) on {env.device}")
            train(model, rows, tc, out, env=env)
            if env.is_main:
                m = [json.loads(line) for line in open(out / "metrics.jsonl")]
                tail = m[-max(1, len(m) // 10):]
                steady = m[len(m) // 2:] or m
                results[name] = {"loss": sum(r["loss"] for r in tail) / len(tail),
                                 "tokens_per_s": sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2],
                                 "mfu": sorted(r["mfu"] for r in steady)[len(steady) // 2]}
                print(f"{name}: final loss {results[name]['loss']:.4f}, {results[name]['tokens_per_s']:,.0f} tokens/s "
                      f"(median, second half), MFU {results[name]['mfu']:.1%}", flush=True)
    if env.is_main:
        gap = results["fp8"]["loss"] / results["bf16"]["loss"] - 1
        speed = results["fp8"]["tokens_per_s"] / results["bf16"]["tokens_per_s"]
        print(f"FP8 vs bf16: loss gap {gap:+.3%} (DeepSeek-V3: < 0.25%), speed {speed:.2f}x")
    shutdown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
