"""`nanoseek demo`: the whole DeepSeek recipe on the built-in corpus, one stage after another.

    nanoseek demo                      # about 14 minutes on 2 idle CPU cores
    nanoseek demo --quick --out /tmp/d # about 2 minutes: the same stages, far fewer steps
    nanoseek demo --out runs/demo      # run again after an interruption: finished stages are kept

The work: nanoseek.demo.run.run_demo with DemoConfig.full() or .quick().
"""

from __future__ import annotations

from ..demo.config import DemoConfig
from ..demo.run import run_demo


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in corpus, with a report card",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny stage sizes (about 2 minutes; used by the tests)")
    p.add_argument("--out", default=None, help="demo folder (default: runs/demo, or runs/demo-quick)")
    p.add_argument("--task", default="arithmetic", help="built-in task: arithmetic, countdown or mixed")
    p.add_argument("--seed", type=int, default=0, help="seed for data, weights and sampling")
    p.set_defaults(func=run)


def run(args) -> int:
    make = DemoConfig.quick if args.quick else DemoConfig.full
    cfg = make(task=args.task, seed=args.seed)
    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    run_demo(out, cfg)
    return 0
