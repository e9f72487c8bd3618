"""`nanoseek demo`: the whole DeepSeek recipe in miniature, with a report card.

    config.py   DemoConfig: the stages' sizes, full and --quick
    stages.py   one function per stage; each calls the library and returns its figures
    report.py   DIR/report.md and DIR/figures/*.png, each figure beside what the paper reports
    run.py      the stage runner and DIR/state.json (resume at the first unfinished stage)

Imports flow one way: run -> stages, report -> config. The command is nanoseek/cli/demo.py.
"""

from .config import DemoConfig
from .run import run_demo

__all__ = ["DemoConfig", "run_demo"]
