"""The LightningDataModule of a downstream task: filtered, split, tokenised train/val data and their loaders."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from typing_extensions import override

from retention.data.tasks import Task, TaskConfig, build_task, load_examples
from retention.data.tasks.sources import is_hub_source
from retention.diskcache import digest, file_digest
from retention.models import DEFAULT_MODEL, load_tokenizer, shared

log = logging.getLogger(__name__)


class SeededShuffle(Sampler[int]):
    """A new permutation each epoch, a function of ``(seed, epoch)`` only: epoch e is the (e+1)-th ``randperm``
    of a generator seeded with ``seed`` (the order a seeded ``RandomSampler`` gives), so a resumed run can
    rebuild the order of the epoch it stopped in."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):
            torch.randperm(self.n, generator=generator)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class ResumableSampler(Sampler[int]):
    """Wraps an epoch-seeded sampler; after :meth:`skip` the next pass leaves out the first indices (the batches
    a resumed run already trained on in that epoch)."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip(self, n: int) -> None:
        self._skip = n

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        for i, index in enumerate(self.sampler):
            if i >= skip:
                yield index


class ResumableLoader(DataLoader):
    """A training loader Lightning checkpoints (``state_dict``/``load_state_dict``): its state is the epoch and
    the number of batches the training loop has taken in it (``position``), so a run resumed mid-epoch trains
    on the batches it would have seen, not on the epoch's first ones again."""

    def __init__(self, *args, position: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.position()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict["batches"] < len(self):  # a checkpoint at an epoch's end resumes at the next one's start
            self.sampler.skip(state_dict["batches"] * self.batch_size)


def train_sampler(dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> ResumableSampler:
    """Shuffled, seeded, a function of the epoch; sharded across ranks (padding by repetition is harmless for
    training); resumable mid-epoch."""
    if num_replicas > 1:
        return ResumableSampler(DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                                                   seed=seed))
    return ResumableSampler(SeededShuffle(len(dataset), seed))


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


def tokenizer_identity(tokenizer) -> str:
    """A digest of everything tokenising depends on: vocabulary and rules (the serialised fast tokenizer; a slow
    one's vocabulary), special tokens, chat template, padding and truncation sides."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return digest([type(tokenizer).__name__, rules, getattr(tokenizer, "chat_template", None),
                   str(tokenizer.special_tokens_map), tokenizer.padding_side, tokenizer.truncation_side,
                   tokenizer.model_max_length])


def source_digest(source: str) -> str:
    """What identifies a task source's content: a local file's SHA-256; the built-in name or hub id itself."""
    if source == "builtin" or is_hub_source(source) or not Path(source).expanduser().is_file():
        return source
    return file_digest(Path(source).expanduser())


class TaskDataModule(LightningDataModule):
    """Train/val loaders of a downstream task (see :class:`~retention.data.tasks.TaskConfig`).

    ``exclude_terms`` (subjects and objects of the edit and control sets) may be set at any time before the
    loaders are built: examples that mention any of them are dropped (``task.n_dropped``). ``setup`` builds the
    task (so a bad task source fails before any model is loaded); the loaders rebuild it when the terms changed
    since (ApplyEdits sets them once it has selected its facts, after ``setup``). The samplers are chosen here
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

    @override
    def prepare_data(self) -> None:
        """Read the source once on the main process (downloads a hub dataset, builds the built-in prose cache)."""
        load_examples(self.task_config)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.task is not None and self._built_for == self.exclude_terms:
            return
        config, tokenizer, terms = self.task_config, self.tokenizer, list(self.exclude_terms)
        # A study's runs in one process tokenise a task once (retention.models.shared_loads).
        self.task = dataclasses.replace(shared(
            "task", lambda: {"task": dataclasses.asdict(config), "source": source_digest(config.source),
                             "tokenizer": tokenizer_identity(tokenizer), "exclude_terms": terms},
            lambda: build_task(config, tokenizer, terms)))
        self._built_for = terms

    def _replicas(self) -> tuple[int, int]:
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kwargs:
            return 1, 0
        return kwargs["num_replicas"], kwargs["rank"]

    def _built(self) -> Task:
        if self.task is None:
            raise RuntimeError("TaskDataModule.setup() has not run")
        self.setup()  # rebuilds only when exclude_terms changed since the last build
        return self.task

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int, cls: type = DataLoader,
                **kwargs) -> DataLoader:
        return cls(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=self._built().collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, **kwargs,
        )

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches the training loop has taken in it): the loop's count, not the loader's, which runs
        ahead by the batch Lightning prefetches."""
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    @override
    def train_dataloader(self) -> DataLoader:
        task = self._built()
        return self._loader(task.train, train_sampler(task.train, self.task_config.seed, *self._replicas()),
                            self.batch_size, ResumableLoader, position=self._train_position)

    @override
    def val_dataloader(self) -> DataLoader:
        task = self._built()
        return self._loader(task.val, val_sampler(task.val, *self._replicas()), self.eval_batch_size)
