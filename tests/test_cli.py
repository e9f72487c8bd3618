"""The `nanoseek` command layer: every subcommand registered in order, clear exits, `python -m
nanoseek`, the smoke command end to end, and a library that never parses flags itself."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek import cli

COMMANDS = ["estimate", "smoke", "generate", "chat", "pretrain", "sft", "vl-sft", "eval", "grpo", "distill", "demo",
            "quantize", "serve"]
LIBRARY = Path(cli.__file__).parents[1]
# Library code moved out of the command layer: none of it may parse flags or import nanoseek.cli.
FLAG_FREE = ["train", "rl", "demo", "estimate.py", "smoke.py", "data"]


def _subcommands(parser) -> list[str]:
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def test_every_command_is_registered_in_help_order():
    assert _subcommands(cli.build_parser()) == COMMANDS


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert cli.main(["eval", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek eval: error: ") and err.count("\n") == 1


def test_python_dash_m_nanoseek_runs_the_same_command():
    out = subprocess.run([sys.executable, "-m", "nanoseek", "estimate", "--preset", "tiny"], capture_output=True,
                         text=True, timeout=120, cwd=LIBRARY.parent)
    assert out.returncode == 0 and "parameters:" in out.stdout


def test_smoke_command_saves_loads_and_samples(tmp_path, capsys, one_thread):
    assert cli.main(["smoke", "--out", str(tmp_path / "ckpt"), "--tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "save -> load bit-exact: True" in printed and (tmp_path / "ckpt" / "config.json").exists()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against the file's package
                package = path.parent.relative_to(LIBRARY.parent).parts
                mod = ".".join(package[:len(package) - node.level + 1] + ((mod,) if mod else ()))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("part", FLAG_FREE)
def test_library_parses_no_flags_and_never_imports_the_command_layer(part):
    files = [LIBRARY / part] if part.endswith(".py") else sorted((LIBRARY / part).rglob("*.py"))
    for path in files:
        names = _imports(path)
        assert "argparse" not in names, f"{path} imports argparse"
        assert not any(n == "nanoseek.cli" or n.startswith("nanoseek.cli.") for n in names), \
            f"{path} imports the command layer"
