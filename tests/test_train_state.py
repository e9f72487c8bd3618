"""Training checkpoints: a run interrupted at step k and resumed equals the uninterrupted run bit for
bit on CPU (losses, weights, balancing biases); atomic saves; resume refuses a changed data order."""

import json

import pytest
import torch

from nanoseek import ModelConfig, Transformer, load_pretrained
from nanoseek.data import pack_documents
from nanoseek.train import state as state_mod
from nanoseek.train.loop import TrainConfig, train
from nanoseek.train.state import TRAIN_STATE, read_state, refuse_existing_run, start_fresh, truncate_metrics

VOCAB = 48


def micro_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny").replace(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                          intermediate_size=128, moe_intermediate_size=32))


def micro_rows(n_docs: int = 12, seq_len: int = 32):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, VOCAB, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_docs)]
    return pack_documents(docs, seq_len=seq_len, eos_id=1, pad_id=0)


def cfg(**kw) -> TrainConfig:
    # 4 rows per step over 5 rows of data: epochs wrap mid-run, so the data order is exercised too
    return TrainConfig(**{"steps": 6, "batch_size": 4, "micro_batch_size": 2, "warmup_steps": 2, "lr": 3e-3,
                          "progress": False, "bias_update_speed": 1e-2, **kw})


def losses(out):
    return [(r["step"], r["loss"], r["mtp_loss"], r["grad_norm"], r["lr"])
            for r in map(json.loads, open(out / "metrics.jsonl"))]


def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path):
    rows = micro_rows()
    assert len(rows) < 6 * 4  # several epochs
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(micro_model(), rows, cfg(), whole)
    train(micro_model(), rows, cfg(stop_at=3), split)
    assert read_state(split)["step"] == 3
    train(load_pretrained(split, dtype=torch.float32), rows, cfg(), split, resume=True)
    assert losses(whole) == losses(split)  # exact float equality, not approx
    a, b = load_pretrained(whole, dtype=torch.float32), load_pretrained(split, dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    bias = [k for k in sa if k.endswith("e_score_correction_bias")]
    assert bias and any(sa[k].abs().sum() > 0 for k in bias)  # the biases moved and were carried over


def test_checkpoint_folder_holds_model_optimizer_rng_and_state(tmp_path):
    train(micro_model(), micro_rows(), cfg(steps=2), tmp_path)
    for name in ("config.json", "model.safetensors", f"{TRAIN_STATE}/optimizer.safetensors",
                 f"{TRAIN_STATE}/rng.safetensors", f"{TRAIN_STATE}/state.json"):
        assert (tmp_path / name).exists(), name
    state = read_state(tmp_path)
    assert state["step"] == 2 and state["stage"] == "pretrain"
    assert state["data"]["rows_seen"] == 8 and state["train_config"]["batch_size"] == 4
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))  # safetensors only


def test_a_crash_mid_checkpoint_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    rows = micro_rows()
    train(micro_model(), rows, cfg(steps=4, stop_at=2), tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(model, path, **kw):
        (path / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(state_mod, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        train(load_pretrained(tmp_path, dtype=torch.float32), rows, cfg(steps=4), tmp_path, resume=True)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert read_state(tmp_path)["step"] == 2
    load_pretrained(tmp_path)  # still loads


def test_resume_refuses_a_different_batch_size_or_seed(tmp_path):
    rows = micro_rows()
    train(micro_model(), rows, cfg(stop_at=2), tmp_path)
    for change in ({"batch_size": 2}, {"seed": 7}):
        name = next(iter(change))
        with pytest.raises(ValueError, match=f"cannot resume with {name}="):
            train(load_pretrained(tmp_path, dtype=torch.float32), rows, cfg(**change), tmp_path, resume=True)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training state to resume from"):
        train(micro_model(), micro_rows(), cfg(), tmp_path / "never", resume=True)


def test_truncate_metrics_drops_rows_past_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_fresh_run_refuses_a_folder_holding_one_and_clears_stale_logs(tmp_path):
    refuse_existing_run(tmp_path)  # nothing there yet
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "samples.jsonl").write_text('{"step": 1}\n')
    start_fresh(tmp_path / "new", logs=("metrics.jsonl",))
    start_fresh(tmp_path, logs=("metrics.jsonl",))
    assert (tmp_path / "new").is_dir() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "samples.jsonl").exists()
    (tmp_path / TRAIN_STATE).mkdir()
    with pytest.raises(ValueError, match="already holds a training run; pass --resume"):
        refuse_existing_run(tmp_path)
    with pytest.raises(ValueError, match="already holds a training run; choose another --out"):
        refuse_existing_run(tmp_path, resumable=False)


def test_sharded_state_resumes_when_some_parameters_never_had_a_gradient(tmp_path):
    """GRPO never trains the MTP module, so AdamW saves no state for it: loading the DCP checkpoint
    (here in one process, as DCP allows) restores the rest and leaves those parameters alone."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from nanoseek.train.optim import build_adamw
    from nanoseek.train.state import DCP_DIR, load_sharded_train_state, rng_state, sharded_state
    model = micro_model()
    opt = build_adamw(model, 1e-2, 0.0)
    model(torch.randint(0, VOCAB, (2, 8))).sum().backward()  # the main model only: MTP gets no gradient
    assert any(p.grad is None for layer in model.mtp_layers for p in layer.parameters())
    opt.step()
    state_dir = tmp_path / TRAIN_STATE
    dcp.save(sharded_state(model, opt), checkpoint_id=str(state_dir / DCP_DIR))
    tensors, extra = rng_state()
    save_file(tensors, str(state_dir / "rng.safetensors"))
    (state_dir / "state.json").write_text(json.dumps({"format": state_mod.FORMAT_VERSION, "step": 1, "sharded": True,
                                                      "rng": extra}))
    fresh = micro_model(seed=1)
    fresh_opt = build_adamw(fresh, 1e-2, 0.0)
    assert load_sharded_train_state(tmp_path, fresh, fresh_opt)["step"] == 1
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        saved = opt.state.get(p)
        if saved:
            assert torch.equal(fresh_opt.state[q]["exp_avg"], saved["exp_avg"]), name
