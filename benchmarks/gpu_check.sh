#!/usr/bin/env bash
# The CUDA checks, run once on a lent GPU machine (the device tool), in the repository root:
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.log (or ./gpu_check.log)
# It uses the machine's own torch (no network there); nanoseek runs from the working tree.
# What it shows, each step printing its figures (copy them into BENCHMARKS.md with the date):
#   1. the CUDA tests of the suite (generate on cuda == cpu greedy, ...), skipped on a CPU-only machine;
#   2. parity: the same random checkpoint on cuda (fp32) and cpu gives the same logits (1e-4);
#   3. generation and serving on cuda: a paged server with chunked prefill answers 8 concurrent streams;
#   4. decode: batch-1 tokens/s on bench_decode's config, fp32/bf16, eager and compiled.
#   5. training: bf16 + compiled blocks vs FP8 (torchao float8, rowwise) on a ~1B V3-shaped model,
#      200 steps each: tokens/s, MFU, the FP8-vs-bf16 loss gap (bench_train_fp8.py); then the
#      parallel tests of the suite (CPU processes, gloo) and, with 2+ GPUs, FSDP2 + EP under torchrun.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-.}/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
exec > >(tee "$LOG") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== 1. CUDA tests"
$PY -m pip install -q --no-index --no-deps safetensors tokenizers >/dev/null 2>&1 || true
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_cli_generate.py -k cuda || echo "CUDA tests FAILED"

echo "== 2. parity cuda vs cpu"
timeout 120 $PY - <<'PY'
import torch
from nanoseek import ModelConfig, Transformer
torch.manual_seed(0)
m = Transformer(ModelConfig.preset("tiny")).eval()
x = torch.randint(0, m.config.vocab_size, (2, 64))
with torch.no_grad():
    cpu = m(x)
    gpu = m.cuda()(x.cuda()).cpu()
print("max |cuda - cpu| logits:", float((gpu - cpu).abs().max()))
PY

echo "== 3. generation and a paged server on cuda"
timeout 240 $PY - <<'PY'
import threading, time, torch
from nanoseek import ModelConfig, Transformer
from nanoseek.inference import Engine, SamplingParams
from nanoseek.inference.scheduler import Scheduler
torch.manual_seed(0)
m = Transformer(ModelConfig.preset("tiny")).cuda().to(torch.bfloat16)
e = Engine(m)
prompts = [[1 + i, 2, 3, 4] for i in range(8)]
outs = e.generate(prompts, 32)
spec = e.generate(prompts, 32, speculative="mtp")
print("greedy == MTP speculative on cuda:", [o.tokens for o in outs] == [o.tokens for o in spec])
s = Scheduler(e, max_batch=8, kv_cache_bytes=64 << 20, block=16, max_batched_tokens=256).start()
done, got = threading.Semaphore(0), {}
t0 = time.perf_counter()
for i, p in enumerate(prompts):
    s.submit(p * 200, SamplingParams(max_tokens=64), lambda ev, i=i: ev.finish_reason and (got.setdefault(i, ev), done.release()))
for _ in prompts:
    done.acquire(timeout=120)
print(f"8 streams of 800-token prompts: {len(got)} finished in {time.perf_counter() - t0:.2f}s, stats {s.stats}")
s.stop()
PY

echo "== 4. decode speed on cuda"
timeout 300 $PY benchmarks/bench_decode.py --device cuda --batch 1 --contexts 128 2048 --no-transformers || echo "bench_decode on cuda FAILED"
echo "== 5. training: bf16 + compile vs FP8 (torchao float8), FSDP2 + EP"
$PY -c "import torchao; print('torchao', torchao.__version__)" 2>/dev/null \
  || $PY -m pip install -q --no-index --no-deps torchao >/dev/null 2>&1 || echo "torchao not installed: FP8 step will fail"
timeout 420 $PY benchmarks/bench_train_fp8.py --steps 200 || echo "bench_train_fp8 FAILED"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  timeout 300 $PY -m torch.distributed.run --standalone --nproc_per_node "$NGPU" benchmarks/bench_train_fp8.py \
    --steps 50 --ep "$NGPU" || echo "FSDP2 + EP on $NGPU GPUs FAILED"
fi
echo "== done"
