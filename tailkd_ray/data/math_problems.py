"""Built-in supervised data for ``tailkd demo --task math``: seeded arithmetic word problems (DESIGN §6).

Each problem is a ``prompt`` ("Ann has 12 apples. She buys 7 more. How many apples does Ann have now?\\nAnswer:")
and a ``completion`` with a short worked answer ending in GSM8K's final-answer line (" 12 + 7 = 19.\\n#### 19"),
the form ``generation.answer_regex`` reads by default. Four kinds: addition, subtraction, multiplication and a
two-step add-then-give-away. The same seed gives the same problems; train and validation share no prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = (("Ann", "She"), ("Ben", "He"), ("Cleo", "She"), ("Dev", "He"), ("Eva", "She"), ("Finn", "He"),
         ("Gus", "He"), ("Hana", "She"), ("Ivo", "He"), ("Jade", "She"))
ITEMS = ("apples", "marbles", "books", "stickers", "pencils", "cookies", "shells", "coins")


def math_problem(rng: random.Random) -> dict:
    """One {prompt, completion} problem drawn from ``rng``."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    kind = rng.choice(("add", "subtract", "multiply", "two_step"))
    if kind == "add":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        question = f"{name} has {a} {item}. {pronoun} buys {b} more. How many {item} does {name} have now?"
        answer, work = a + b, f"{a} + {b} = {a + b}."
    elif kind == "subtract":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        question = f"{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} have left?"
        answer, work = a - b, f"{a} - {b} = {a - b}."
    elif kind == "multiply":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        answer, work = a * b, f"{a} * {b} = {a * b}."
    else:
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        question = (f"{name} has {a} {item}, finds {b} more and then gives away {c}. How many {item} does {name} "
                    f"have now?")
        answer, work = a + b - c, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}."
    return {"prompt": f"{question}\nAnswer:", "completion": f" {work}\n#### {answer}"}


def write_math_problems(out_dir: str | Path, train: int, val: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``val`` then ``train`` distinct problems (by prompt) of the stream seeded by ``seed`` as
    ``out_dir/val/math.jsonl`` and ``out_dir/train/math.jsonl``. Returns the two files."""
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < train + val:
        problem = math_problem(rng)
        if problem["prompt"] not in seen:  # a repeated prompt would leak validation into training
            seen.add(problem["prompt"])
            problems.append(problem)
    out = Path(out_dir)
    files = out / "train" / "math.jsonl", out / "val" / "math.jsonl"
    for path, part in zip(files, (problems[val:], problems[:val])):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(p) + "\n" for p in part))
    return files
