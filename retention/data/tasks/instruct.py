"""Instruction tuning: Alpaca-style ``instruction``/``input``/``output`` records (any field names through the
field mapping; ``input`` may be absent), or built-in generated instructions whose answers are checkable."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from retention.data.tasks.examples import SupervisedExample
from retention.data.tasks.sources import convert_records, read_records, text_field

if TYPE_CHECKING:
    from retention.data.readers import ReadReport
    from retention.data.tasks.task import TaskConfig

FIELDS = {"instruction": "instruction", "input": "input", "output": "output"}
BUILTIN_SIZE = 2000


def instruction_prompt(instruction: str, context: str = "") -> str:
    """The user message: the instruction, then its input (if any) after a blank line."""
    return f"{instruction.strip()}\n\n{context.strip()}" if context.strip() else instruction.strip()


def load(config: TaskConfig, report: ReadReport) -> list[SupervisedExample]:
    """The examples of the configured source; malformed records go to ``report.reject``."""
    if config.source == "builtin":
        return builtin_examples(config.limit or BUILTIN_SIZE, config.seed)
    where, most = config.source, config.max_prompt_chars
    instr, inp, out = config.field("instruction"), config.field("input"), config.field("output")

    def example(loc: str, r: Any) -> SupervisedExample:
        context = text_field(r, inp, where, loc, True, most) if isinstance(r, dict) and r.get(inp) else ""
        return SupervisedExample(instruction_prompt(text_field(r, instr, where, loc, max_chars=most), context),
                                 text_field(r, out, where, loc).strip())

    return convert_records(read_records(where, config.hf_config, config.hf_split, report=report), example, report)


# Built-in generated instructions: each template draws its arguments from a seeded RNG and returns
# (instruction, input, answer); the answer is computed, so a model's output can be checked exactly.
_WORDS = (
    "apple river candle garden window silver planet mirror forest bridge lantern pencil ocean marble rocket "
    "violin pepper castle meadow thunder blanket harbor feather compass orchard basket mountain rabbit tunnel "
    "lemon cabinet whistle island engine butter carpet puzzle shadow ladder saddle kettle dragon"
).split()
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _reverse(r: random.Random):
    w = r.choice(_WORDS)
    return "Reverse the letters of the word below.", w, w[::-1]


def _add(r: random.Random):
    a, b = r.randint(2, 99), r.randint(2, 99)
    return f"What is {a} plus {b}?", "", str(a + b)


def _multiply(r: random.Random):
    a, b = r.randint(2, 12), r.randint(2, 12)
    return f"What is {a} times {b}?", "", str(a * b)


def _sort(r: random.Random):
    ws = r.sample(_WORDS, r.randint(3, 6))
    return "Sort these words alphabetically, separated by commas.", ", ".join(ws), ", ".join(sorted(ws))


def _count_letter(r: random.Random):
    w = r.choice(_WORDS)
    c = r.choice(sorted(set(w)))
    return f"How many times does the letter '{c}' appear in the word \"{w}\"?", "", str(w.count(c))


def _uppercase(r: random.Random):
    ws = " ".join(r.sample(_WORDS, r.randint(2, 4)))
    return "Rewrite the following text in capital letters.", ws, ws.upper()


def _last_word(r: random.Random):
    ws = r.sample(_WORDS, r.randint(3, 6))
    return "What is the last word in this list?", " ".join(ws), ws[-1]


def _spell_number(r: random.Random):
    n = r.randint(0, 12)
    return f"Write the number {n} in words.", "", _NUMBER_WORDS[n]


def _next_in_sequence(r: random.Random):
    start, step = r.randint(1, 20), r.randint(2, 9)
    seq = [start + step * i for i in range(4)]
    return "What number comes next in this sequence?", ", ".join(map(str, seq)), str(start + step * 4)


def _max(r: random.Random):
    xs = r.sample(range(1, 100), r.randint(3, 6))
    return "Which is the largest of these numbers?", ", ".join(map(str, xs)), str(max(xs))


TEMPLATES: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _reverse, _add, _multiply, _sort, _count_letter, _uppercase, _last_word, _spell_number, _next_in_sequence, _max,
)


def builtin_examples(n: int, seed: int = 0) -> list[SupervisedExample]:
    """``n`` generated instructions (cycling through the templates), the computed answer as the response."""
    r = random.Random(seed)
    examples = []
    for i in range(n):
        instruction, context, answer = TEMPLATES[i % len(TEMPLATES)](r)
        examples.append(SupervisedExample(instruction_prompt(instruction, context), answer, answer=answer))
    return examples

