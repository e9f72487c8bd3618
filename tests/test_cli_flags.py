"""Flags generated from run-config dataclasses: help and defaults from the field, booleans as
--x/--no-x, optional and list types, another instance's defaults, and the config built back."""

import argparse
from dataclasses import dataclass, field

import pytest

from nanoseek.cli.flags import add_config_args, config_from_args
from nanoseek.train.loop import TrainConfig, opt


@dataclass
class Run:
    out: str = opt(None, "folder to write", required=True)
    steps: int = opt(10, "how many steps")
    top_p: float | None = opt(None, "nucleus sampling")
    bf16: bool = opt(False, "bf16 autocast")
    reward: list[str] = opt(None, "rewards", nargs="+")
    kind: str = opt("a", "which kind", choices=("a", "b"))
    hidden: int = 3  # no help: not a flag


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_args(p, Run, **kw)
    return p


def test_one_flag_per_documented_field_with_its_help_and_default():
    p = parser()
    helps = {a.dest: a.help for a in p._actions if a.dest != "help"}
    assert set(helps) == {"out", "steps", "top_p", "bf16", "reward", "kind"}
    assert helps["steps"] == "how many steps (default: 10)" and helps["out"] == "folder to write"
    args = p.parse_args(["--out", "o", "--top-p", "0.9", "--bf16", "--reward", "x", "y=2"])
    assert (args.steps, args.top_p, args.bf16, args.reward, args.kind) == (10, 0.9, True, ["x", "y=2"], "a")
    assert p.parse_args(["--out", "o", "--no-bf16"]).bf16 is False


def test_required_fields_and_choices_are_enforced():
    with pytest.raises(SystemExit):
        parser().parse_args([])
    with pytest.raises(SystemExit):
        parser().parse_args(["--out", "o", "--kind", "c"])


def test_defaults_from_an_instance():
    p = argparse.ArgumentParser()
    add_config_args(p, TrainConfig, defaults=TrainConfig(steps=7, lr=1e-3))
    args = p.parse_args([])
    assert (args.steps, args.lr) == (7, 1e-3)


@dataclass
class Stage:
    out: str = opt(None, "folder to write", required=True)
    seq_len: int = opt(8, "tokens per row")
    train: TrainConfig = field(default_factory=TrainConfig)


def test_config_built_back_from_parsed_args():
    p = argparse.ArgumentParser()
    add_config_args(p, Stage, skip=("train",))
    add_config_args(p, TrainConfig)
    args = p.parse_args(["--out", "o", "--steps", "4", "--lr", "0.01", "--bf16"])
    stage = config_from_args(Stage, args, train=config_from_args(TrainConfig, args))
    assert (stage.out, stage.seq_len, stage.train.steps, stage.train.lr, stage.train.bf16) == ("o", 8, 4, 0.01, True)
