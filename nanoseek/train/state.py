"""Training checkpoints that resume exactly.

A stage folder is a loadable Hugging Face checkpoint plus what training needs to continue:

    DIR/config.json, model.safetensors      the model (balancing biases included), fp32 as trained
    DIR/tokenizer.json, tokenizer_config.json
    DIR/train_state/optimizer.safetensors   AdamW moments and step counts, keyed by parameter name
    DIR/train_state/rng.safetensors         torch CPU (and CUDA) generator states
    DIR/train_state/state.json              step, stage, data position, python/numpy RNG, configs
    DIR/metrics.jsonl, DIR/*.png            logs (kept across checkpoints)

    save_checkpoint(out, model, optimizer, step=k, tokenizer=tok, meta={...})
    state = load_train_state(out, model, optimizer)      # restores optimizer + RNG, returns state.json
    refuse_existing_run(out); start_fresh(out)           # a fresh run: never over an earlier one

The whole folder is written beside DIR and swapped in with one rename (fsutil.atomic_directory):
a crash mid-write leaves the previous checkpoint whole. Only safetensors and JSON: no pickle.
The learning-rate schedule is a function of the step, and batches are a function of the step
and the seed, so step + optimizer + model + RNG is the complete state.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..hf import save_pretrained
from ..hf.fsutil import atomic_directory, atomic_write_text

TRAIN_STATE = "train_state"
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json")  # a save replaces all of these
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- optimizer

def optimizer_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[dict, list]:
    """({"<param name>/<state key>": tensor}, [param group hyper-parameters]) for safetensors + JSON."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        names = [name_of[id(p)] for p in group["params"]]
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({"params": names, **hyper})
        for name, p in zip(names, group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"optimizer state {name}/{key} is not a tensor; cannot save it")
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous()
    return tensors, groups


def load_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, tensors: dict, groups: list,
                   where: Path) -> None:
    """Inverse of optimizer_tensors: put the saved state back on the optimizer's parameters."""
    params = dict(model.named_parameters())
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{where}: {len(groups)} parameter groups saved, the optimizer has "
                         f"{len(optimizer.param_groups)}")
    state, new_groups, index = {}, [], 0
    for saved, group in zip(groups, optimizer.param_groups):
        names = saved["params"]
        if [id(params.get(n)) for n in names] != [id(p) for p in group["params"]]:
            raise ValueError(f"{where}: saved optimizer parameters do not match the model's")
        for name in names:
            entry = {key.split("/", 1)[1]: t for key, t in tensors.items() if key.split("/", 1)[0] == name}
            if entry:
                state[index] = entry
            index += 1
        new_groups.append({**saved, "params": list(range(index - len(names), index))})
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})


# ----------------------------------------------------------------------------- RNG

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator training may draw from: torch CPU/CUDA as tensors, python/numpy as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    extra = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        extra["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, extra


def set_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = extra["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in extra and "numpy_keys" in tensors:
        import numpy as np
        kind, pos, has_gauss, cached = extra["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- checkpoint

def save_checkpoint(out_dir: str | os.PathLike, model, optimizer, step: int, tokenizer=None,
                    meta: dict | None = None) -> Path:
    """Write model + tokenizer + train_state into out_dir, atomically (logs already there are kept)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, drop=WEIGHT_FILES) as tmp:  # an earlier save's shards would shadow the new weights
        save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state_dir = tmp / TRAIN_STATE
        state_dir.mkdir()
        opt_tensors, groups = optimizer_tensors(optimizer, model)
        save_file(opt_tensors, str(state_dir / "optimizer.safetensors"))
        rng_tensors, rng_extra = rng_state()
        save_file(rng_tensors, str(state_dir / "rng.safetensors"))
        state = {"format": FORMAT_VERSION, "step": step, "param_groups": groups, "rng": rng_extra, **(meta or {})}
        (state_dir / "state.json").write_text(json.dumps(state, indent=1))
    return out_dir


def read_state(out_dir: str | os.PathLike) -> dict:
    """DIR/train_state/state.json, or a clear error when DIR holds no training state."""
    path = Path(out_dir) / TRAIN_STATE / "state.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training state to resume from (was the run ever checkpointed?)")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format={state.get('format')!r}, expected {FORMAT_VERSION}")
    return state


def load_train_state(out_dir: str | os.PathLike, model, optimizer) -> dict:
    """Restore optimizer and RNG from DIR/train_state (the model is loaded from DIR by the caller)."""
    state = read_state(out_dir)
    state_dir = Path(out_dir) / TRAIN_STATE
    load_optimizer(optimizer, model, load_file(str(state_dir / "optimizer.safetensors")), state["param_groups"],
                   state_dir)
    set_rng_state(load_file(str(state_dir / "rng.safetensors")), state["rng"])
    return state


def truncate_metrics(path: str | os.PathLike, after_step: int) -> None:
    """Drop metrics rows logged after `after_step` (a run that died past its last checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- a run's folder

def refuse_existing_run(out_dir: str | os.PathLike, resumable: bool = True) -> None:
    """A fresh run never overwrites an earlier one: raise when out_dir already holds training state."""
    out_dir = Path(out_dir)
    if (out_dir / TRAIN_STATE).exists():
        how = "pass --resume to continue it or choose another --out" if resumable else "choose another --out"
        raise ValueError(f"{out_dir} already holds a training run; {how}")


def start_fresh(out_dir: str | os.PathLike, logs: tuple[str, ...] = ("metrics.jsonl",)) -> None:
    """Create out_dir for a fresh run, deleting the logs of a run that died before its first checkpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in logs:
        (out_dir / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- sharded (FSDP2 / EP) runs
#
# A sharded run's stage folder is the same, except that train_state/ holds a torch.distributed.checkpoint
# (DCP) folder instead of optimizer.safetensors: model and AdamW state as global tensors, each rank
# writing its shards, so a run saved on 4 ranks resumes on 2 (DCP reshards on load). Routed experts
# under expert parallelism are local slices; they are presented to DCP as the global [E, ...] tensor
# sharded over the ("ep", "dp_mod_ep") mesh, so the saved layout does not depend on --ep either.

DCP_DIR = "dcp"


def _global_experts(t, expert_mesh):
    """An FSDP-sharded local-experts tensor (DTensor over dp_mod_ep) as a view of the global [E, ...]
    tensor over (ep, dp_mod_ep), sharing storage, so DCP loads in place."""
    from torch.distributed.tensor import DTensor, Shard
    local = t.to_local()
    ep, dpm = expert_mesh.shape
    per_rank = t.shape[0] // dpm
    if per_rank * dpm != t.shape[0]:
        raise ValueError(f"{t.shape[0]} local experts must divide evenly over dp_mod_ep={dpm} to checkpoint")
    shape = (t.shape[0] * ep, *t.shape[1:])
    return DTensor.from_local(local, expert_mesh, [Shard(0), Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _init_optimizer_state(optimizer) -> None:
    """Create AdamW's state (zeros) before a load: DCP loads into existing tensors. A zero-lr step on
    zero gradients; the loaded state replaces what it wrote."""
    if optimizer.state:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def sharded_state(model, optimizer, expert_mesh=None) -> dict:
    """{"model/<name>": tensor, "optim/<name>/<key>": tensor} with experts as global DTensors."""
    def present(name, t):
        expert = expert_mesh is not None and ".experts." in name and t.dim() == 3
        return _global_experts(t, expert_mesh) if expert else t

    state = {f"model/{n}": present(n, t) for n, t in model.state_dict().items()}
    for n, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            state[f"optim/{n}/{key}"] = present(n, value) if value.dim() else value
    return state


def save_sharded_checkpoint(out_dir, model, optimizer, step: int, rank: int, tokenizer=None, meta=None,
                            expert_mesh=None) -> Path:
    """Every rank: DCP-save model + AdamW beside out_dir and write its share of the HF checkpoint
    (export.save_hf_sharded: no rank gathers the whole model); rank 0 then adds the tokenizer, RNG and
    state.json and swaps the folder in atomically."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from .export import save_hf_sharded
    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.dcp-{step}"
    dcp.save(sharded_state(model, optimizer, expert_mesh), checkpoint_id=str(staging))
    hf_dir = out_dir.parent / f".{out_dir.name}.hf-{step}"
    if rank == 0:
        hf_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    save_hf_sharded(model, hf_dir, expert_mesh)
    if rank == 0:
        with atomic_directory(out_dir, drop=WEIGHT_FILES) as tmp:
            for f in hf_dir.iterdir():
                os.rename(f, tmp / f.name)
            hf_dir.rmdir()
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            state_dir = tmp / TRAIN_STATE
            state_dir.mkdir()
            os.rename(staging, state_dir / DCP_DIR)
            rng_tensors, rng_extra = rng_state()
            save_file(rng_tensors, str(state_dir / "rng.safetensors"))
            groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                      for g in optimizer.param_groups]
            state = {"format": FORMAT_VERSION, "step": step, "sharded": True, "param_groups": groups,
                     "rng": rng_extra, **(meta or {})}
            (state_dir / "state.json").write_text(json.dumps(state, indent=1))
    dist.barrier()
    return out_dir


def save_run_checkpoint(out_dir, model, optimizer, step: int, env, meshes=None, tokenizer=None,
                        meta: dict | None = None) -> Path:
    """A loop's checkpoint at any layout: sharded (every rank) when the run has meshes, else the
    one-process format written by rank 0."""
    from .distributed import barrier
    if meshes is not None:
        return save_sharded_checkpoint(out_dir, model, optimizer, step, env.rank, tokenizer, meta, meshes.experts)
    if env.is_main:
        save_checkpoint(out_dir, model, optimizer, step, tokenizer, meta)
    barrier(env)
    return Path(out_dir)


def load_run_state(out_dir, model, optimizer, meshes=None) -> dict:
    """Resume a loop at this run's layout: a sharded (DCP) checkpoint at any layout or in one process,
    a one-process checkpoint in one process only."""
    if read_state(out_dir).get("sharded"):
        return load_sharded_train_state(out_dir, model, optimizer, meshes.experts if meshes else None)
    if meshes is not None:
        raise ValueError(f"{out_dir}: a one-process checkpoint; resume it in one process, or start the "
                         "sharded run from it with --model")
    return load_train_state(out_dir, model, optimizer)


def load_sharded_train_state(out_dir, model, optimizer, expert_mesh=None) -> dict:
    """Restore model + AdamW from DIR/train_state/dcp at this run's layout (any world size, one process
    without a process group included: DCP then reads whole tensors), and RNG."""
    import torch.distributed.checkpoint as dcp
    state = read_state(out_dir)
    state_dir = Path(out_dir) / TRAIN_STATE
    if not state.get("sharded"):
        raise ValueError(f"{state_dir}: saved by a one-process run, not a sharded one")
    _init_optimizer_state(optimizer)
    saved = dcp.FileSystemReader(str(state_dir / DCP_DIR)).read_metadata().state_dict_metadata
    # A parameter that never had a gradient (GRPO leaves the MTP module alone) saved no AdamW state.
    wanted = {k: v for k, v in sharded_state(model, optimizer, expert_mesh).items()
              if k in saved or not k.startswith("optim/")}
    dcp.load(wanted, checkpoint_id=str(state_dir / DCP_DIR))
    set_rng_state(load_file(str(state_dir / "rng.safetensors")), state["rng"])
    return state
