"""FSDP2, expert parallelism and sharded checkpoints (train/parallelize.py, expert_parallel.py, state.py)
with 2 and 4 CPU processes (gloo, torch.multiprocessing): the same losses, gradient norms and expert
biases as one process, per-rank parameter + AdamW bytes ≈ 1/N, and a DCP checkpoint saved at world 4
(HSDP + EP) that resumes at world 2 (FSDP + EP), and in one process, as world 4 would have continued.

Tolerance: fp32 reductions in another order (FSDP's reduce-scatter, all-to-all then index_add):
losses and gradient norms agree within 1e-5 relative; weights after AdamW within 1e-4 (Adam divides
by sqrt(v), amplifying rounding on near-zero gradients)."""

import json
import os
import shutil
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanoseek import ModelConfig, Transformer, load_pretrained
from nanoseek.data import pack_documents
from nanoseek.train.distributed import DistEnv
from nanoseek.train.loop import TrainConfig, train
from nanoseek.train.parallelize import Layout

VOCAB, STEPS = 48, 5


def micro_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                          intermediate_size=128, moe_intermediate_size=32))


def micro_rows():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, VOCAB, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(24)]
    return pack_documents(docs, seq_len=32, eos_id=1, pad_id=0)


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": STEPS, "batch_size": 8, "micro_batch_size": 2, "warmup_steps": 1,
                          "bias_update_speed": 0.01, "progress": False, **kw})


def local_bytes(model, optimizer_state) -> int:
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    return sum(nbytes(p) for p in model.parameters()) + sum(
        nbytes(v) for s in optimizer_state.values() for v in s.values() if v.dim())


def _worker(rank: int, world: int, port: int, jobs: list[dict]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    env = DistEnv(rank, world)
    try:
        for job in jobs:
            model = load_pretrained(job["out"], dtype=torch.float32) if job.get("resume") else micro_model()
            seen = {}
            import nanoseek.train.loop as loop
            build = loop.build_adamw

            def spy(m, *a, **k):  # keep the optimizer to measure its per-rank bytes
                seen["opt"] = build(m, *a, **k)
                return seen["opt"]
            loop.build_adamw = spy
            try:
                train(model, micro_rows(), config(**job["cfg"]), job["out"], resume=job.get("resume", False), env=env)
            finally:
                loop.build_adamw = build
            with open(os.path.join(job["out"], f"bytes{rank}.json"), "w") as f:
                json.dump(local_bytes(model, seen["opt"].state), f)
            for copy in job.get("copy_to", []) if rank == 0 else []:
                shutil.copytree(job["out"], copy)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(world: int, jobs: list[dict]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, jobs), nprocs=world, join=True)


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def assert_same_run(a, b, steps):
    ra, rb = [r for r in metrics(a) if r["step"] in steps], [r for r in metrics(b) if r["step"] in steps]
    assert [r["step"] for r in rb] == list(steps)
    for x, y in zip(ra, rb):
        for key in ("loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
        assert y["expert_load"] == x["expert_load"]
    ma, mb = (load_pretrained(p, dtype=torch.float32).state_dict() for p in (a, b))
    assert ma.keys() == mb.keys()
    for k in ma:
        if k.endswith("e_score_correction_bias"):
            torch.testing.assert_close(mb[k], ma[k], rtol=0, atol=1e-6, msg=k)  # the same ±γ moves
        torch.testing.assert_close(mb[k], ma[k], rtol=1e-4, atol=1e-4, msg=k)


# fsdp_ep2 also recomputes its blocks in backward (activation checkpointing under FSDP2 and EP).
LAYOUTS = {"fsdp": {}, "ep2": {"fsdp": False, "ep": 2}, "fsdp_ep2": {"ep": 2, "activation_checkpointing": True}}


def test_fsdp_and_expert_parallel_match_one_process(tmp_path):
    one = tmp_path / "one"
    model = micro_model()
    train(model, micro_rows(), config(), one, env=DistEnv())
    ref_bytes = sum(p.numel() * 4 for p in model.parameters()) * 3  # weights + two AdamW moments
    launch(2, [{"out": str(tmp_path / name), "cfg": cfg} for name, cfg in LAYOUTS.items()])
    for name in LAYOUTS:
        assert_same_run(one, tmp_path / name, range(1, STEPS + 1))
    per_rank = {name: [json.load(open(tmp_path / name / f"bytes{r}.json")) for r in range(2)] for name in LAYOUTS}
    for name in ("fsdp", "fsdp_ep2"):  # everything sharded: half each (plus FSDP's row padding)
        assert all(0.49 < b / ref_bytes < 0.52 for b in per_rank[name]), (name, per_rank[name], ref_bytes)
    experts = sum(p.numel() * 4 * 3 for n, p in model.named_parameters() if ".experts." in n)
    for b in per_rank["ep2"]:  # replicated, but each rank holds half the routed experts
        assert b == pytest.approx(ref_bytes - experts / 2, rel=1e-3)
    # The sharded run's HF export (gathered one parameter at a time) is a checkpoint transformers runs.
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "fsdp_ep2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, load_pretrained(path, dtype=torch.float32).eval()(x),
                                   rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_saved_at_world_4_resumes_at_world_2(tmp_path):
    four, two, solo, one = tmp_path / "four", tmp_path / "two", tmp_path / "solo", tmp_path / "one"
    # World 4 runs HSDP (2 replicas × 2 shards) + EP 2; world 2 resumes its checkpoint as FSDP 2 + EP 2.
    cfg = {"ep": 2, "checkpoint_every": 3}
    hsdp = {**cfg, "dp_replicate": 2}
    launch(4, [{"out": str(four), "cfg": {**hsdp, "stop_at": 3}, "copy_to": [str(two), str(solo)]},
               {"out": str(four), "cfg": hsdp, "resume": True}])
    launch(2, [{"out": str(two), "cfg": cfg, "resume": True}])
    assert_same_run(four, two, range(1, STEPS + 1))
    # ... and in one process, without a process group (DCP reads whole tensors).
    train(load_pretrained(solo, dtype=torch.float32), micro_rows(), config(), solo, resume=True, env=DistEnv())
    assert_same_run(four, solo, range(1, STEPS + 1))
    train(micro_model(), micro_rows(), config(), one, env=DistEnv())
    assert_same_run(one, four, range(1, STEPS + 1))


def test_layout_names_the_flag():
    assert Layout.resolve(4, ep=2) == Layout(4, 1, 4, 2)
    assert Layout.resolve(4, dp_replicate=2).dp_shard == 2
    with pytest.raises(ValueError, match="--dp-shard=3"):
        Layout.resolve(4, dp_shard=3)
    with pytest.raises(ValueError, match="--ep=3"):
        Layout.resolve(4, ep=3)


def test_fp8_linears_train_in_emulation():
    """--fp8's conversion (torchao float8, rowwise) on a CPU in emulation: the blocks' linears become
    Float8Linear, embedding/head/router stay, and a bf16 step's loss stays near fp32's."""
    pytest.importorskip("torchao.float8")
    from nanoseek.train.losses import linear_cross_entropy
    from nanoseek.train.parallelize import apply_fp8
    model = micro_model()
    x = torch.randint(0, VOCAB, (2, 32))

    def loss():
        hidden, _ = model.forward_train(x)
        return linear_cross_entropy(hidden, model.lm_head.weight, x)
    ref = float(loss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_fp8(model, emulate=True)
    kinds = {type(m).__name__ for m in model.model.layers.modules()}
    assert "Float8Linear" in kinds and type(model.lm_head).__name__ != "Float8Linear"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss()
    value.backward()
    assert abs(float(value) - ref) / ref < 0.02
    fp8 = [m for layer in model.main_layers for m in layer.modules() if type(m).__name__ == "Float8Linear"]
    assert fp8 and all(m.weight.grad is not None and m.weight.grad.isfinite().all() for m in fp8)


def four_experts():
    from nanoseek.model import Experts
    torch.manual_seed(0)
    experts = Experts(4, 8, 16)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.1)
    return experts


def _idle_expert_worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    from nanoseek.train.expert_parallel import ExpertParallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        experts = four_experts()
        x = torch.randn(world, 3, 8, generator=torch.Generator().manual_seed(1))[rank].requires_grad_()
        indices = torch.tensor([[0, 1]] * 3)  # every token of every rank to rank 0's experts: rank 1's get none
        weights = torch.full((3, 2), 0.5, requires_grad=True)
        ep = ExpertParallel(experts, dist.group.WORLD)
        ep(x, weights, indices).sum().backward()  # rank 1 must still join both all-to-alls of backward
        torch.save({"x": x.grad, "up": ep.up_proj.grad}, os.path.join(out, f"grad{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_expert_parallel_backward_when_a_rank_gets_no_tokens(tmp_path):
    """A rank whose experts receive no rows still runs backward's collectives (it used to skip them and
    hang its peers); gradients equal the one-process module's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_idle_expert_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    experts = four_experts()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    experts(x.view(6, 8), torch.full((6, 2), 0.5), torch.tensor([[0, 1]] * 6)).sum().backward()
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in range(2)]
    for r in range(2):
        torch.testing.assert_close(grads[r]["x"], x.grad[r])
    torch.testing.assert_close(grads[0]["up"], experts.up_proj.grad[:2])
    assert grads[1]["up"].abs().sum() == 0  # its experts saw no token
