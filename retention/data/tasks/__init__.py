"""Downstream tasks for fine-tuning: four families (text, instruct, math, classify), each with real-format
readers and an offline built-in default, edit-irrelevant filtering and a held-out validation split."""

from retention.data.tasks.examples import Collator, SupervisedExample, TextExample, TokenizedDataset
from retention.data.tasks.filtering import filter_mentions, split_validation
from retention.data.tasks.math_problems import extract_final_number, gsm8k_accuracy
from retention.data.tasks.task import FAMILIES, Task, TaskConfig, build_task, load_examples, read_examples

__all__ = [
    "FAMILIES", "Collator", "SupervisedExample", "Task", "TaskConfig", "TextExample", "TokenizedDataset",
    "build_task", "extract_final_number", "filter_mentions", "gsm8k_accuracy", "load_examples", "read_examples",
    "split_validation",
]
