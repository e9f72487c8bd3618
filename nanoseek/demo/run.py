"""`nanoseek demo`: the whole DeepSeek recipe on the built-in corpus, one stage after another.

    nanoseek demo                      # about 20 minutes on 2 CPU cores
    nanoseek demo --quick --out /tmp/d # about 2 minutes: the same stages, far fewer steps
    nanoseek demo --out runs/demo      # run again after an interruption: finished stages are kept

Stages (stages.py): tokenizer -> pretrain -> sft -> grpo -> evaluate -> student -> distill ->
student_grpo -> quantize -> inference -> samples, then report.md (report.py). Each stage writes its
folder under --out and returns a small JSON result; the runner stores it in DIR/state.json
(atomically) the moment the stage ends, so an interrupted demo resumes at the first stage that did
not finish (and the training stages inside it from their last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..hf.fsutil import atomic_write_text

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run. `quick()` shrinks every stage; `full()` is the 20-minute run."""

    task: str = "arithmetic"  # built-in task (nanoseek.data.tasks): corpus, prompts and checker
    seed: int = 0
    # pretraining the tiny DeepSeek-V3-style teacher
    pretrain_examples: int = 20000
    pretrain_steps: int = 700
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    # SFT with <think> reasoning
    sft_examples: int = 4000
    sft_steps: int = 150
    # GRPO
    grpo_steps: int = 40
    grpo_lr: float = 3e-5  # bench_rl: 1e-4 and above stay flat or collapse on the tiny model
    grpo_prompts: int = 8  # prompts per step
    grpo_group: int = 8  # samples per prompt (G)
    max_new_tokens: int = 160
    # evaluation on the held-out split (greedy pass@1)
    eval_examples: int = 200
    # the smaller student: distilled from the teacher vs trained by GRPO alone
    student_pretrain_steps: int = 400
    distill_prompts: int = 1000
    distill_steps: int = 150
    student_grpo_steps: int = 40
    # inference benchmarks
    bench_prompts: int = 8
    bench_tokens: int = 128
    bench_repeats: int = 3  # timed rounds (medians), the variants compared interleaved
    samples: int = 4

    @classmethod
    def full(cls, **changes) -> "DemoConfig":
        return cls(**changes)

    @classmethod
    def quick(cls, **changes) -> "DemoConfig":
        return dataclasses.replace(cls(
            pretrain_examples=2000, pretrain_steps=30, batch_size=8, sft_examples=200, sft_steps=6, grpo_steps=2,
            grpo_prompts=2, grpo_group=4, max_new_tokens=96, eval_examples=8, student_pretrain_steps=10,
            distill_prompts=8, distill_steps=4, bench_prompts=1, bench_tokens=24, bench_repeats=2, samples=2),
            **changes)

    def __post_init__(self):
        from ..data.tasks import TASKS
        if self.task not in TASKS:
            raise ValueError(f"DemoConfig.task={self.task!r}: expected one of {', '.join(TASKS)}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and f.name != "seed" and v <= 0:
                raise ValueError(f"DemoConfig.{f.name}={v}: must be positive")


# ----------------------------------------------------------------------------- state.json

def read_state(out: Path) -> dict:
    """DIR/state.json, or a fresh state when the demo has not started there."""
    path = out / STATE_FILE
    if not path.exists():
        return {"version": STATE_VERSION, "config": None, "stages": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete it to start the demo over") from None
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: version={state.get('version')!r}, expected {STATE_VERSION}")
    return state


def write_state(out: Path, state: dict) -> None:
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=1) + "\n")


def check_config(out: Path, state: dict, cfg: DemoConfig) -> None:
    """A resumed demo must use the sizes it started with (its checkpoints depend on them)."""
    saved = state.get("config")
    if saved is None:
        return
    now = dataclasses.asdict(cfg)
    for key, value in now.items():
        if saved.get(key) != value:
            raise ValueError(f"{out / STATE_FILE}: this demo was started with {key}={saved.get(key)!r}, now "
                             f"{key}={value!r} (--quick?); use another --out or delete {out}")


# ----------------------------------------------------------------------------- the runner

def run_demo(out: str | Path, cfg: DemoConfig, stages=None) -> dict:
    """Run every stage not yet finished in `out`, then write the report; returns the state."""
    from . import report
    from .stages import STAGES, Context

    stages = STAGES if stages is None else stages
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out)
    check_config(out, state, cfg)
    state["config"] = dataclasses.asdict(cfg)
    ctx = Context(out=out, cfg=cfg, results=state["stages"])
    t_demo = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        done = state["stages"].get(stage.name, {})
        head = f"[{i}/{len(stages)}] {stage.name}: {stage.title}"
        if done.get("status") == "done":
            print(f"{head} -- finished earlier ({done['seconds']:.0f}s), kept")
            continue
        print(f"\n{head}", flush=True)
        t0 = time.perf_counter()
        result = stage.fn(ctx)
        seconds = time.perf_counter() - t0
        state["stages"][stage.name] = {"status": "done", "seconds": round(seconds, 2), "result": result}
        write_state(out, state)
        print(f"{stage.name}: done in {seconds:.1f}s", flush=True)
    path = report.write_report(out, state)
    total = sum(s["seconds"] for s in state["stages"].values())
    print(f"\ndemo: {total:.0f}s of stage time ({time.perf_counter() - t_demo:.0f}s this run); report: {path}")
    print_next_steps(out, state)
    return state


def print_next_steps(out: Path, state: dict) -> None:
    from .stages import final_model
    model = final_model(out, state["stages"])
    if model is None:
        return
    print("\nnext:")
    print(f"  nanoseek chat --model {model}")
    print(f"  nanoseek serve --model {model}")


def run(args) -> int:
    make = DemoConfig.quick if args.quick else DemoConfig.full
    cfg = make(task=args.task, seed=args.seed)
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    run_demo(out, cfg)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in corpus, with a report card",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny stage sizes (about 2 minutes; used by the tests)")
    p.add_argument("--out", default=None, help="demo folder (default: runs/demo, or runs/demo-quick)")
    p.add_argument("--task", default="arithmetic", help="built-in task: arithmetic, countdown or mixed")
    p.add_argument("--seed", type=int, default=0, help="seed for data, weights and sampling")
    p.set_defaults(func=run)
