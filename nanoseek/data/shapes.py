"""A synthetic image task: shapes of one colour on a canvas, and a question about them.

    examples = shape_examples(200, seed=0)     # [ShapeExample(image, question, answer), ...]
    majority_baseline(examples)                 # accuracy of always giving each question's commonest answer

Each canvas holds 1-4 shapes of one kind (circle, square, triangle) and one colour (red, green,
blue, yellow), at random places and sizes on a grey background; the question asks for the colour,
the kind or the count, or — on canvases that also carry a short word in a white box — for the word,
each a one-word answer. Deterministic for a seed. A model answers above the majority baseline only
by looking at the image (the question alone says nothing about it). Words need the 64-pixel
canvases: at 32 pixels a tiny tower cannot read them.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
KINDS = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour are the shapes?", "kind": "What shape are they?", "count": "How many shapes?",
             "text": "What word is written?"}
COUNT_WORDS = ("one", "two", "three", "four")
WORDS = ("cat", "dog", "sun", "box")


@dataclass
class ShapeExample:
    image: object  # PIL RGB image
    question: str
    answer: str
    topic: str  # "colour" | "kind" | "count" | "text"


def draw(kind: str, colour: tuple, count: int, size: int, rng: random.Random):
    """A size x size canvas with `count` non-overlapping shapes (placed on a coarse grid of cells)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    cell = size // 2
    for c in rng.sample(range(4), count):  # one shape per quadrant
        r = rng.randint(cell // 4, cell // 2 - 2)
        cx = (c % 2) * cell + rng.randint(r + 1, cell - r - 1)
        cy = (c // 2) * cell + rng.randint(r + 1, cell - r - 1)
        box = (cx - r, cy - r, cx + r, cy + r)
        if kind == "circle":
            d.ellipse(box, fill=colour)
        elif kind == "square":
            d.rectangle(box, fill=colour)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def write(img, word: str, rng: random.Random):
    """`word` in black on a white box at a random place of the canvas (over whatever is there)."""
    from PIL import ImageDraw, ImageFont

    size = img.size[0]
    font = ImageFont.load_default(size=max(8, size // 4))
    d = ImageDraw.Draw(img)
    left, top, right, bottom = d.textbbox((0, 0), word, font=font)
    w, h = right - left + 2, bottom - top + 2
    x, y = rng.randint(0, max(size - w, 0)), rng.randint(0, max(size - h, 0))
    d.rectangle((x, y, x + w, y + h), fill=(255, 255, 255))
    d.text((x + 1 - left, y + 1 - top), word, fill=(0, 0, 0), font=font)
    return img


def shape_examples(n: int, seed: int = 0, size: int = 64) -> list[ShapeExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind, colour, count = rng.choice(KINDS), rng.choice(list(COLOURS)), rng.randint(1, 4)
        topic = rng.choice(list(QUESTIONS))
        word = rng.choice(WORDS)
        answer = {"colour": colour, "kind": kind, "count": COUNT_WORDS[count - 1], "text": word}[topic]
        img = draw(kind, COLOURS[colour], count, size, rng)
        if topic == "text":
            img = write(img, word, rng)
        out.append(ShapeExample(img, QUESTIONS[topic], answer, topic))
    return out


def majority_baseline(examples: list[ShapeExample], train: list[ShapeExample] | None = None) -> float:
    """Accuracy of answering each question with its commonest answer (counted on `train`, else on `examples`)."""
    ref = train or examples
    best = {t: Counter(e.answer for e in ref if e.topic == t).most_common(1)[0][0] for t in {e.topic for e in ref}}
    return sum(best.get(e.topic) == e.answer for e in examples) / len(examples)


def task_texts() -> list[str]:
    """Every question and answer, for training a tokenizer that covers the task."""
    return list(QUESTIONS.values()) + list(COLOURS) + list(KINDS) + list(COUNT_WORDS) + list(WORDS)
