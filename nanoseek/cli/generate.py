"""`nanoseek generate` and `nanoseek chat`: text in, text out from any checkpoint with a tokenizer.json.

    nanoseek generate --model runs/pretrain --prompt "12+30=" --max-new-tokens 16
    nanoseek generate --model runs/sft --prompt "What is 12+30?" --chat --temperature 0.6 --seed 0
    nanoseek generate --model runs/sft --prompt "a" --prompt "b" --speculative mtp --stats
    nanoseek chat --model runs/sft                  # /reset clears the history, /exit (or Ctrl-D) leaves

`generate` continues raw text (BOS + prompt), or with --chat renders the prompt as one user turn
through the chat template. Several --prompt flags form one batch. `chat` is a REPL: each turn goes
through the checkpoint's own chat_template when it has one, else the built-in DeepSeek-R1 format
(tokenizer.py), and the reply streams as it is made, its <think> reasoning shown apart (dimmed on a
terminal) from the answer. Earlier turns keep their answers; the template drops their reasoning.
"""

from __future__ import annotations

import sys
import time

from ..chat import TextStream, chat_prompt, held_suffix
from ..inference import Engine
from .flags import add_inference_flags, add_speculative_flag, load_engine, speculative_mode

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReplyPrinter:
    """Writes a streamed chat reply, the reasoning (before </think>) apart from the answer."""

    def __init__(self, out, think_end: str, color: bool):
        self.out, self.think_end, self.color = out, think_end, color
        self.thinking = True
        self.pending = ""  # text that might be the start of </think>

    def _write(self, text: str, dim: bool) -> None:
        if text:
            self.out.write(f"{DIM}{text}{RESET}" if dim and self.color else text)
            self.out.flush()

    def begin(self) -> None:
        self._write("<think>\n", dim=True)

    def feed(self, text: str) -> None:
        if not self.thinking:
            self._write(text, dim=False)
            return
        text = self.pending + text
        head, sep, tail = text.partition(self.think_end)
        if sep:
            self.thinking, self.pending = False, ""
            self._write(head + sep, dim=True)
            self._write(tail, dim=False)
            return
        keep = held_suffix(text, [self.think_end])
        self.pending = text[len(text) - keep:] if keep else ""
        self._write(text[:len(text) - keep], dim=True)

    def end(self) -> None:
        self._write(self.pending, dim=self.thinking)
        self.pending = ""
        self.out.write("\n")
        self.out.flush()


def sampling_args(args, engine: Engine) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                speculative=speculative_mode(args, engine))


def print_stats(engine: Engine, elapsed: float, out=None) -> None:
    s = engine.stats
    rate = s["new_tokens"] / s["decode_s"] if s["decode_s"] > 0 else float("nan")
    line = (f"[{s['new_tokens']} tokens in {elapsed:.2f}s: prefill {s['prefill_s'] * 1e3:.0f} ms, "
            f"decode {rate:.1f} tokens/s, {s['tokens_per_forward']:.2f} tokens/forward")
    if s["acceptance_rate"] is not None:
        line += f", MTP acceptance {s['acceptance_rate']:.0%}"
    print(line + "]", file=out or sys.stderr)


# ----------------------------------------------------------------------------- commands

def read_images(engine: Engine, paths: list[str] | None) -> list:
    """--image files as RGB images, refused (with the reason) if the model has no vision towers."""
    if not paths:
        return []
    if engine.vision is None:
        raise SystemExit(f"--image: {engine.config.model_type} has no vision towers (load a DeepSeek-VL checkpoint)")
    from ..vision.image import ImageError, open_image
    try:
        return [open_image(p) for p in paths]
    except (ImageError, OSError) as e:
        raise SystemExit(f"--image: {e}") from None


def with_images(engine: Engine, images: list, text: str) -> list:
    """A user message's content: each image's <image_placeholder> ids, then the text."""
    return [engine.image_slots() for _ in images] + [text]


def run_generate(args) -> int:
    engine = load_engine(args, compile=args.compile)
    tok = engine.tokenizer
    images = read_images(engine, args.image)
    if args.chat:
        prompts = [chat_prompt(tok, [{"role": "user", "content": with_images(engine, images, p)}])[0]
                   for p in args.prompt]
    else:
        slots = [t for _ in images for t in engine.image_slots()]
        bos = [tok.bos_id] if tok.bos_id is not None else []
        prompts = [bos + slots + tok.encode(p) for p in args.prompt]
    if images:
        sampling = dict(sampling_args(args, engine), images=[images] * len(prompts))
    else:
        sampling = sampling_args(args, engine)
    t0 = time.perf_counter()
    if len(prompts) == 1:  # one prompt: print as it is made
        stream = TextStream(tok)
        if args.chat:
            printer = ReplyPrinter(sys.stdout, tok.think_end, sys.stdout.isatty())
            printer.begin()
            write = printer.feed
        else:
            sys.stdout.write(args.prompt[0])
            write = sys.stdout.write
        for new in engine.stream(prompts, args.max_new_tokens, **sampling):
            write(stream.push(new[0]))
            sys.stdout.flush()
        write(stream.flush())
        if args.chat:
            printer.end()
        else:
            sys.stdout.write("\n")
    else:
        outs = engine.generate(prompts, args.max_new_tokens, **sampling)
        for i, (p, out) in enumerate(zip(args.prompt, outs)):
            text = tok.decode(out.tokens)
            if args.chat:
                reasoning, answer = tok.split_reasoning(text)
                print(f"--- [{i}] <think>\n{reasoning}\n</think>\n{answer}")
            else:
                print(f"--- [{i}] {p}{text}")
    if args.stats:
        print_stats(engine, time.perf_counter() - t0)
    return 0


def run_chat(args) -> int:
    engine = load_engine(args, compile=args.compile)
    tok = engine.tokenizer
    context = engine.config.max_position_embeddings
    color = sys.stdout.isatty() and not args.no_color
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    images = read_images(engine, args.image)  # shown with the first message
    print(f"nanoseek chat: {args.model} ({engine.model.num_params():,} parameters). "
          "/reset clears the history, /exit leaves.")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(system)
            print("(history cleared)")
            continue
        if not text:
            continue
        first = images and len(messages) == len(system)
        messages.append({"role": "user", "content": with_images(engine, images, text) if first else text})
        ids = chat_prompt(tok, messages)[0]
        # Drop the oldest turns while the conversation leaves no room for a reply.
        while len(ids) + min(args.max_new_tokens, 16) > context and len(messages) > len(system) + 1:
            if isinstance(messages[len(system)]["content"], list):
                images = []  # the turn that showed them is gone
            del messages[len(system):len(system) + 2]
            ids = chat_prompt(tok, messages)[0]
        if len(ids) >= context:
            print(f"(this message alone is {len(ids)} tokens, over the model's {context}; not sent)")
            messages.pop()
            continue
        printer = ReplyPrinter(sys.stdout, tok.think_end, color)
        stream = TextStream(tok)
        printer.begin()
        t0 = time.perf_counter()
        shown = [images] if images else None
        for new in engine.stream([ids], min(args.max_new_tokens, context - len(ids)), **sampling_args(args, engine),
                                 images=shown):
            printer.feed(stream.push(new[0]))
        printer.feed(stream.flush())
        printer.end()
        if args.stats:
            print_stats(engine, time.perf_counter() - t0, out=sys.stdout)
        reasoning, answer = tok.split_reasoning(tok.decode(stream.ids))
        messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})


def _common_flags(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    add_speculative_flag(p)
    add_inference_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile (the first request pays the compilation)")
    p.add_argument("--stats", action="store_true", help="print tokens/s, tokens per forward and MTP acceptance")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image the model sees before the prompt (DeepSeek-VL checkpoints; repeat for more)")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue text prompts with a checkpoint")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user turn through the chat template")
    _common_flags(p)
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="talk to a checkpoint in the terminal (streamed, multi-turn)")
    c.add_argument("--system", default=None, help="system message placed before the conversation")
    c.add_argument("--no-color", action="store_true", help="show reasoning without dimming it")
    _common_flags(c)
    c.set_defaults(func=run_chat)
