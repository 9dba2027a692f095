"""The LightningDataModule of a downstream task: filtered, split, tokenised train/val data and their loaders."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from retention.data.tasks import Task, TaskConfig, build_task, load_examples
from retention.models import DEFAULT_MODEL, load_tokenizer

log = logging.getLogger(__name__)


def train_sampler(dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> Sampler:
    """Shuffled, seeded; sharded across ranks (padding by repetition is harmless for training)."""
    if num_replicas > 1:
        return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    return torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))


def val_sampler(dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> Sampler:
    """In order; sharded across ranks without repeating a sample, so metrics count each once (docs/design.md,
    distributed measurement)."""
    if num_replicas > 1:
        if len(dataset) < num_replicas:
            raise ValueError(
                f"the validation split has {len(dataset)} items for {num_replicas} ranks; every rank needs at least "
                "one (raise task.val_fraction or task.limit)"
            )
        return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
    return torch.utils.data.SequentialSampler(dataset)


class TaskDataModule(LightningDataModule):
    """Train/val loaders of a downstream task (see :class:`~retention.data.tasks.TaskConfig`).

    ``exclude_terms`` (subjects and objects of the edit and control sets) may be set after construction, before
    ``setup``: examples that mention any of them are dropped (``task.n_dropped``). The samplers are chosen here
    (sharded when the trainer is distributed), so the data is right whether or not the Trainer runs with
    ``use_distributed_sampler``.
    """

    def __init__(
        self,
        task: TaskConfig | None = None,
        tokenizer: str | Any = DEFAULT_MODEL,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        exclude_terms: Sequence[str] = (),
    ):
        """
        Args:
            task: Which task, from which source, tokenised how.
            tokenizer: A tokenizer, or the name of the model whose tokenizer to use.
            batch_size: Training batch size (per rank).
            eval_batch_size: Validation batch size (per rank); defaults to ``batch_size``.
            num_workers: DataLoader worker processes.
            exclude_terms: Drop task examples that mention any of these (whole words, case-insensitive).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.task_config = task or TaskConfig()
        self._tokenizer = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.exclude_terms: list[str] = list(exclude_terms)
        self.task: Task | None = None
        self._built_for: list[str] | None = None

    @property
    def tokenizer(self):
        if isinstance(self._tokenizer, str):
            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def prepare_data(self) -> None:
        """Read the source once on the main process (downloads a hub dataset, builds the built-in prose cache)."""
        load_examples(self.task_config)

    def setup(self, stage: str | None = None) -> None:
        if self.task is not None and self._built_for == self.exclude_terms:
            return
        self.task = build_task(self.task_config, self.tokenizer, self.exclude_terms)
        self._built_for = list(self.exclude_terms)

    def _replicas(self) -> tuple[int, int]:
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:
            return 1, 0
        return kwargs["num_replicas"], kwargs["rank"]

    def _built(self) -> Task:
        if self.task is None:
            raise RuntimeError("TaskDataModule.setup() has not run")
        return self.task

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=self._built().collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        task = self._built()
        return self._loader(task.train, train_sampler(task.train, self.task_config.seed, *self._replicas()),
                            self.batch_size)

    def val_dataloader(self) -> DataLoader:
        task = self._built()
        return self._loader(task.val, val_sampler(task.val, *self._replicas()), self.eval_batch_size)
