"""LastCheckpoint: one resumable checkpoint per run, rewritten every n optimizer steps, never half-written.

``retention fit`` adds it unless ``run.checkpoint_every`` is 0 or the config has its own ``ModelCheckpoint``. What
it holds (the light form): the trainable weights and the optimizer/scheduler state (``FineTuneModule``), the
training loader's position in its epoch (``ResumableLoader``), trained tokens, validation history and RNG
states (``FineTuneModule``), the monitor's curves (``RetentionMonitor``), and the edit and control sets with the
edited weights that are not trained (``ApplyEdits``). ``--ckpt_path last`` resumes from it.

:func:`load_checkpoint` reads a checkpoint without running code: a checkpoint is a pickle, and an unrestricted
unpickler calls whatever a planted file names.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any
from weakref import proxy

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from retention.diskcache import digest, file_digest

LAST = "last.ckpt"
RUN_KEY = "retention_run"
"""The checkpoint entry where :class:`RunIdentity` records the run that wrote it."""
UNHASHED_FILES = ("config", "ckpt_path", "model.model_name", "data.tokenizer")
"""Keys naming files that are not hashed into a run's identity: the ``--config`` layers (their content is the
config itself), the checkpoint, and the model (large; ``summary.json``'s provenance fingerprints it)."""
SHARD_INDEX = ".metadata"
"""The index of a sharded checkpoint folder (torch.distributed.checkpoint), a plain pickle."""
_DCP = "torch.distributed.checkpoint"
SHARD_INDEX_TYPES = frozenset({
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
})
"""What a shard index may construct (besides torch dtypes): torch.distributed.checkpoint's own records."""
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
"""What torch's weights-only unpickler refused (its message also advises loading unrestricted: not repeated)."""


class CheckpointError(ValueError):
    """A checkpoint that is refused or cannot be read; names the file."""


def _torch_load(source: Path | io.BytesIO, name: str) -> Any:
    try:
        if isinstance(source, Path):
            return torch.load(source, map_location="cpu", mmap=True, weights_only=True)
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{name}: not a readable checkpoint ({err})") from None
        match = _GLOBAL.search(str(err))
        what = f" ({match[1]})" if match else ""
        raise CheckpointError(
            f"{name}: refused to load: it holds an object that only running code can rebuild{what}. A "
            "checkpoint of retention fit holds tensors and plain values only: this file was altered or is not "
            "one") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{name}: not a readable checkpoint ({type(err).__name__}: {err})") from None


class _Forbidden(pickle.UnpicklingError):
    pass


class _ShardIndexUnpickler(pickle.Unpickler):
    @override
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in SHARD_INDEX_TYPES or dtype:
            return super().find_class(module, name)
        raise _Forbidden(f"{module}.{name}")


def _shard_values(folder: Path) -> list[tuple[str, str, int, int]]:
    """(name, shard file, offset, length) of every non-tensor value of a sharded checkpoint, from its index,
    read with only torch.distributed.checkpoint's own records allowed."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    index = folder / SHARD_INDEX
    try:
        with open(index, "rb") as f:
            metadata = _ShardIndexUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f"a {type(metadata).__name__}, not an index")
        values = []
        for key, info in metadata.storage_data.items():
            if isinstance(metadata.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
                if Path(str(info.relative_path)).name != info.relative_path or info.transform_descriptors:
                    raise ValueError(f"{key.fqn} is stored as {info.relative_path!r} with transforms "
                                     f"{info.transform_descriptors}, not as a plain shard inside the folder")
                values.append((key.fqn, info.relative_path, int(info.offset), int(info.length)))
        return values
    except _Forbidden as err:
        raise CheckpointError(f"{index}: refused to load: it names {err}, which a shard index never holds; "
                              "this file was altered or is not one") from None
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError,
            KeyError) as err:
        raise CheckpointError(f"{index}: not a readable shard index ({type(err).__name__}: {err})") from None


def _check_shards(folder: Path) -> None:
    """Read every non-tensor value of a sharded checkpoint as :func:`load_checkpoint` reads a file:
    torch.distributed.checkpoint, which Lightning restores the folder with, unpickles them (and the index)
    unrestricted. Its tensors it reads with ``weights_only=True`` itself."""
    for name, relative_path, offset, length in _shard_values(folder):
        shard = folder / relative_path
        try:
            with open(shard, "rb") as f:
                f.seek(offset)
                value = f.read(length)
        except OSError as err:
            raise CheckpointError(f"{shard}: not a readable shard ({err})") from None
        _torch_load(io.BytesIO(value), f"{shard} (value {name})")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or a sharded checkpoint folder's ``meta.pt``, loaded without running code: tensors
    and plain values only (``torch.load(weights_only=True)``); a folder's index and shard values are checked
    first. Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        _check_shards(path)
        path = path / "meta.pt"
    checkpoint = _torch_load(path, str(path))
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(checkpoint).__name__}, not a mapping)")
    return checkpoint


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_files(config: dict[str, Any]) -> dict[str, str]:
    """The SHA-256 of every file a flattened config names (its data: task source, knowledge, hyperparameter
    files), by key; see :data:`UNHASHED_FILES` for the keys left out."""
    return {key: file_digest(value) for key, value in config.items()
            if key not in UNHASHED_FILES and isinstance(value, str) and value and Path(value).is_file()}


class RunIdentity(Callback):
    """Records in every checkpoint what run wrote it: the resolved config (dotted keys), the SHA-256 of the
    files it names, and the changes that earlier resumes were allowed (``run.resume_changes``)."""

    def __init__(self, config: dict[str, Any], free_keys: tuple[str, ...] = ()):
        self.config = {k: v for k, v in config.items() if k not in free_keys}
        self.files = config_files(self.config)
        self.changes: list[dict[str, Any]] = []

    @property
    def record(self) -> dict[str, Any]:
        return {"config_digest": digest({"config": self.config, "files": self.files}), "config": self.config,
                "files": self.files, "changes": self.changes}

    def differences(self, stored: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Key -> (value in ``stored``, value now) of every key whose value, or named file's content,
        differs."""
        if stored.get("config_digest") == self.record["config_digest"]:
            return {}
        before, files = stored.get("config", {}), stored.get("files", {})
        out = {}
        for key in sorted(set(before) | set(self.config)):
            old, new = before.get(key, "<absent>"), self.config.get(key, "<absent>")
            if old != new:
                out[key] = (old, new)
        for key in sorted(set(files) | set(self.files)):
            if key not in out and files.get(key) != self.files.get(key):
                out[key] = (f"{before.get(key)} with sha256 {files.get(key)}",
                            f"{self.config.get(key)} with sha256 {self.files.get(key)}")
        return out

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = self.record


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimizer steps, written to a temporary name and
    renamed, so a kill while writing leaves the previous checkpoint intact.

    A strategy that saves a folder (FSDP2's sharded checkpoint: one file per rank and ``meta.pt``) writes
    ``last.ckpt.step<N>/``, and ``last.ckpt`` becomes a symbolic link to it, replaced in one rename; the folder
    it pointed to before is deleted afterwards."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int):
        super().__init__(dirpath=str(dirpath), save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / LAST

    @override
    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        partial = Path(f"{filepath}.step{trainer.global_step}")
        if partial.is_dir():  # a sharded checkpoint left by a run killed while writing this step
            if trainer.is_global_zero:
                shutil.rmtree(partial)
            trainer.strategy.barrier("LastCheckpoint.clean")
        trainer.save_checkpoint(partial, self.save_weights_only)
        if trainer.is_global_zero:
            if partial.is_dir():
                self._link(Path(filepath), partial)
            else:
                os.replace(partial, filepath)
        trainer.strategy.barrier("LastCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _link(last: Path, folder: Path) -> None:
        """Point ``last`` at ``folder`` atomically, then delete the folder it pointed to before."""
        previous = last.resolve() if last.is_symlink() else None
        tmp = last.with_name(f".{last.name}.link{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder.name)
        os.replace(tmp, last)
        if previous is not None and previous != folder.resolve():
            shutil.rmtree(previous, ignore_errors=True)
