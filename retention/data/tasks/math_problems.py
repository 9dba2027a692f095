"""Math word problems: GSM8K ``question``/``answer`` records (the answer's last line is ``#### N``) or built-in
generated arithmetic problems with worked answers. Accuracy: greedy generation, final-number match."""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from retention.data.tasks.examples import SupervisedExample, format_prompt
from retention.data.tasks.sources import convert_records, read_records, text_field
from retention.records import RecordError
from retention.scoring import greedy_generate

if TYPE_CHECKING:
    from torch import nn

    from retention.data.readers import ReadReport
    from retention.data.tasks.task import TaskConfig

log = logging.getLogger(__name__)

FIELDS = {"question": "question", "answer": "answer"}
BUILTIN_SIZE = 2000
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _normalise(number: str) -> str | None:
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    return format(value.normalize(), "f") if value != value.to_integral_value() else str(int(value))


def extract_final_number(text: str) -> str | None:
    """The answer a solution commits to: the first number after the last ``####``, else the last number in the
    text; normalised (no thousands separators, no trailing zeros: ``"1,000.50"`` -> ``"1000.5"``)."""
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
        if match:
            return _normalise(match.group())
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def gsm8k_accuracy(generations: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of generations whose final number equals the gold answer's (both through
    :func:`extract_final_number`)."""
    if len(generations) != len(answers):
        raise ValueError(f"{len(generations)} generations for {len(answers)} answers")
    if not answers:
        raise ValueError("no examples to score")
    hits = 0
    for gen, gold in zip(generations, answers):
        g = extract_final_number(gold)
        hits += g is not None and extract_final_number(gen) == g
    return hits / len(answers)


def evaluate(
    model: nn.Module, tokenizer, examples: Sequence[SupervisedExample], batch_size: int = 8,
    max_new_tokens: int = 256, chat_template: bool = True,
) -> dict[str, float]:
    """GSM8K-style accuracy of greedy generations: ``{"accuracy": ...}``."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    prompts = [format_prompt(tokenizer, ex.prompt, chat_template) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    generations = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, g in zip(batch, greedy_generate(model, tokenizer, [prompts[i] for i in batch], max_new_tokens)):
                generations[i] = g
    finally:
        model.train(was_training)
    accuracy = gsm8k_accuracy(generations, [ex.answer or "" for ex in examples])
    log.info("math accuracy %.3f on %d examples (%.1f s)", accuracy, len(examples), time.perf_counter() - t0)
    return {"accuracy": accuracy}


def load(config: TaskConfig, report: ReadReport) -> list[SupervisedExample]:
    """The examples of the configured source; malformed records go to ``report.reject``."""
    if config.source == "builtin":
        return builtin_examples(config.limit or BUILTIN_SIZE, config.seed)
    where = config.source
    q_name, a_name = config.field("question"), config.field("answer")

    def example(loc: str, r: Any) -> SupervisedExample:
        answer = text_field(r, a_name, where, loc)
        final = answer.rsplit("####", 1)[1] if "####" in answer else ""
        if not _NUMBER.search(final):
            raise RecordError(where, loc, a_name, "expected a final line '#### <number>'")
        # The <<a+b=c>> calculator annotations are GSM8K tooling, not part of the worked solution.
        response = _CALCULATOR.sub("", answer).strip()
        question = text_field(r, q_name, where, loc, max_chars=config.max_prompt_chars)
        return SupervisedExample(question.strip(), response, answer=answer)

    return convert_records(read_records(where, config.hf_config, config.hf_split, report=report), example, report)


# Built-in problems: each template returns (question, worked steps, final answer) from a seeded RNG.
_NAMES = "Maya Tom Lena Omar Ravi Sofia Ben Aisha Jonas Mei Carlos Nora Felix Priya Hugo Zara".split()
_ITEMS = "apples marbles stickers pencils cookies stamps shells books cards balloons".split()


def _buy_and_give(r: random.Random):
    name, friend = r.sample(_NAMES, 2)
    item = r.choice(_ITEMS)
    a, b = r.randint(5, 40), r.randint(2, 30)
    c = r.randint(1, a + b - 2)
    q = (f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {friend}. "
         f"How many {item} does {name} have now?")
    steps = [f"After buying, {name} has {a} + {b} = {a + b} {item}.",
             f"After giving {c} away, {name} has {a + b} - {c} = {a + b - c} {item}."]
    return q, steps, a + b - c


def _boxes(r: random.Random):
    item = r.choice(_ITEMS)
    per, boxes, extra = r.randint(3, 15), r.randint(2, 12), r.randint(0, 9)
    q = f"A box holds {per} {item}. How many {item} are there in {boxes} full boxes and {extra} loose {item}?"
    steps = [f"The boxes hold {boxes} * {per} = {boxes * per} {item}.",
             f"With the loose ones there are {boxes * per} + {extra} = {boxes * per + extra} {item}."]
    return q, steps, boxes * per + extra


def _wages(r: random.Random):
    name = r.choice(_NAMES)
    rate, hours, days = r.randint(8, 25), r.randint(2, 8), r.randint(2, 6)
    q = f"{name} earns ${rate} per hour and works {hours} hours a day for {days} days. How much does {name} earn?"
    steps = [f"Each day {name} earns {rate} * {hours} = ${rate * hours}.",
             f"Over {days} days that is {rate * hours} * {days} = ${rate * hours * days}."]
    return q, steps, rate * hours * days


def _share(r: random.Random):
    name = r.choice(_NAMES)
    item = r.choice(_ITEMS)
    friends, each, kept = r.randint(2, 8), r.randint(2, 12), r.randint(1, 9)
    total = friends * each + kept
    q = (f"{name} has {total} {item}, keeps {kept} and shares the rest equally among {friends} friends. "
         f"How many {item} does each friend get?")
    steps = [f"{name} shares {total} - {kept} = {total - kept} {item}.",
             f"Each friend gets {total - kept} / {friends} = {each} {item}."]
    return q, steps, each


def _pages(r: random.Random):
    name = r.choice(_NAMES)
    a, k = r.randint(5, 30), r.randint(2, 4)
    q = (f"{name} reads {a} pages on Monday and {k} times as many pages on Tuesday. "
         f"How many pages does {name} read on the two days together?")
    steps = [f"On Tuesday {name} reads {k} * {a} = {k * a} pages.",
             f"Together that is {a} + {k * a} = {a + k * a} pages."]
    return q, steps, a + k * a


def _change(r: random.Random):
    name = r.choice(_NAMES)
    item = r.choice(_ITEMS)
    price, count = r.randint(1, 9), r.randint(2, 9)
    bill = next(b for b in (10, 20, 50, 100) if b >= price * count)
    q = (f"A shop sells {item} at ${price} each. {name} buys {count} of them and pays with a ${bill} bill. "
         f"How much change does {name} get?")
    steps = [f"The {item} cost {count} * {price} = ${count * price}.",
             f"The change is {bill} - {count * price} = ${bill - count * price}."]
    return q, steps, bill - count * price


TEMPLATES = (_buy_and_give, _boxes, _wages, _share, _pages, _change)


def builtin_examples(n: int, seed: int = 0) -> list[SupervisedExample]:
    """``n`` generated word problems; each answer shows its steps and ends with ``#### N``."""
    r = random.Random(seed)
    examples = []
    for i in range(n):
        question, steps, result = TEMPLATES[i % len(TEMPLATES)](r)
        answer = "\n".join(steps) + f"\n#### {result}"
        examples.append(SupervisedExample(question, answer, answer=answer))
    return examples
