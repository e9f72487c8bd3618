"""The demo's runner: the whole DeepSeek recipe on the built-in corpus, one stage after another
(command: cli/demo.py).

    run_demo("runs/demo", DemoConfig.full())     # again after an interruption: finished stages are kept

Stages (stages.py): tokenizer -> pretrain -> sft -> grpo -> r1_zero_base -> r1_zero -> evaluate -> student -> distill ->
student_grpo -> quantize -> inference -> samples -> vision, then report.md (report.py). Each stage writes its
folder under --out and returns a small JSON result; the runner stores it in DIR/state.json
(atomically) the moment the stage ends, so an interrupted demo resumes at the first stage that did
not finish (and the training stages inside it from their last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..hf.fsutil import atomic_write_text
from . import report, stages as stage_list
from .config import DemoConfig

STATE_FILE = "state.json"
STATE_VERSION = 1


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
    """A resumed demo must use the sizes it started with (its checkpoints depend on them). A size the
    saved config lacks belongs to a stage added since that run started: no finished stage used it."""
    saved = state.get("config")
    if saved is None:
        return
    now = dataclasses.asdict(cfg)
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"{out / STATE_FILE}: this demo was started with {key}={saved.get(key)!r}, now "
                             f"{key}={value!r} (--quick?); use another --out or delete {out}")


# ----------------------------------------------------------------------------- the runner

def run_demo(out: str | Path, cfg: DemoConfig, stages=None) -> dict:
    """Run every stage not yet finished in `out`, then write the report; returns the state."""
    stages = stage_list.STAGES if stages is None else stages
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(out)
    check_config(out, state, cfg)
    state["config"] = dataclasses.asdict(cfg)
    ctx = stage_list.Context(out=out, cfg=cfg, results=state["stages"])
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
    model = stage_list.final_model(out, state["stages"])
    if model is None:
        return
    print("\nnext:")
    print(f"  nanoseek chat --model {model}")
    print(f"  nanoseek serve --model {model}")
