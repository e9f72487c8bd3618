"""A sharded run's Hugging Face export (train/export.py) from 2 CPU processes (gloo) under FSDP2 +
expert parallelism: each rank writes the parameters it owns, in buffers of at most max_shard_size;
transformers loads the folder with the logits of the unsharded model, nanoseek reads back every
weight exactly, and no rank ever held more than a buffer plus the parameter being gathered (the
exporter's own count, checked against the model's size)."""

import json
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import randomize_

from nanoseek import ModelConfig, Transformer, load_pretrained
from nanoseek.train.export import copy_full_weights, save_hf_sharded
from nanoseek.train.loop import TrainForward
from nanoseek.train.parallelize import Layout, parallelize

VOCAB, LIMIT = 48, 64 * 1024  # max_shard_size: about a tenth of the model


def micro_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                           intermediate_size=128, moe_intermediate_size=32))
    return randomize_(model, seed=3)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = micro_model()
        _, meshes = parallelize(TrainForward(model), Layout.resolve(world, ep=2))
        if rank == 0:
            os.makedirs(out)
        dist.barrier()
        stats = save_hf_sharded(model, out, meshes.experts, max_shard_size=LIMIT)
        plain = Transformer(model.config)  # the rollout copy GRPO keeps: refreshed from the shards
        copy_full_weights(model, plain, meshes.experts)
        same = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), micro_model().state_dict().values()))
        with open(os.path.join(out, f"stats{rank}.json"), "w") as f:
            json.dump({**stats, "copy_equal": same}, f)
    finally:
        dist.destroy_process_group()


def test_sharded_export_loads_into_transformers_with_bounded_memory(tmp_path):
    out = tmp_path / "hf"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    stats = [json.loads((out / f"stats{r}.json").read_text()) for r in range(2)]
    ref = micro_model().eval()
    total = sum(t.numel() * t.element_size() for t in ref.state_dict().values())
    largest = max(t.numel() * t.element_size() for t in ref.state_dict().values())
    for s in stats:
        assert s["total_bytes"] == total and s["files"] and s["copy_equal"]
        assert s["peak_bytes"] <= LIMIT + largest < total / 2, (s["peak_bytes"], LIMIT, largest, total)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(stats[0]["files"]) + len(stats[1]["files"]) > 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    loaded = load_pretrained(out, dtype=torch.float32)
    for name, t in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref(x), rtol=1e-4, atol=1e-4)
