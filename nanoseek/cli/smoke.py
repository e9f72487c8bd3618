"""`nanoseek smoke`: a short real end-to-end check — build a tiny model, save it, load it back,
and generate a few tokens greedily from the loaded copy.

    nanoseek smoke --out /tmp/nanoseek-smoke

The work: nanoseek.smoke.smoke. Exit status 1 when save -> load is not bit-exact.
"""

from __future__ import annotations

from ..smoke import smoke


def add_parser(sub) -> None:
    p = sub.add_parser("smoke", help="build, save, load and sample a tiny model (a quick end-to-end check)")
    p.add_argument("--out", default=None, help="checkpoint folder to write (default: a temp folder)")
    p.add_argument("--tokens", type=int, default=8, help="tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    p.set_defaults(func=run)


def run(args) -> int:
    res = smoke(args.out, args.tokens, args.seed)
    print(f"tiny DeepSeek-V3-style model: {res.params:,} parameters ({res.active_params:,} active), "
          f"saved to {res.out}")
    print(f"save -> load bit-exact: {res.same}")
    print(f"greedy tokens from the loaded copy: {res.tokens}  ({res.seconds:.2f}s)")
    return 0 if res.same else 1
