"""`nanoseek demo`: the whole DeepSeek recipe in miniature, with a report card.

    run.py      the command, DemoConfig (full and --quick sizes), the stage runner and DIR/state.json
    stages.py   one function per stage; each calls the library and returns its figures
    report.py   DIR/report.md and DIR/figures/*.png, each figure beside what the paper reports
"""

from .run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
