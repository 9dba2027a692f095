"""LastCheckpoint: one resumable checkpoint per run, rewritten every n optimizer steps, never half-written.

``retention fit`` adds it unless ``run.checkpoint_every`` is 0 or the config has its own ``ModelCheckpoint``. What
it holds (the light form): the trainable weights and the optimizer/scheduler state (``FineTuneModule``), the
training loader's position in its epoch (``ResumableLoader``), trained tokens, validation history and RNG
states (``FineTuneModule``), the monitor's curves (``RetentionMonitor``), and the edit and control sets with the
edited weights that are not trained (``ApplyEdits``). ``--ckpt_path last`` resumes from it.

:func:`load_checkpoint` reads a checkpoint without running code: a checkpoint is a pickle, and an unrestricted
unpickler calls whatever a planted file names. :func:`open_checkpoint` also gives the path to restore from: a
sharded folder is first copied into a private folder, each file read once, and that copy is what is checked and
what Lightning restores, so a file changed in the run folder after the check is never read.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
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
    except Exception as err:  # torch's unpickler and zip reader raise further types on damaged bytes
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


def _shard_entries(folder: Path, shown: Path) -> list[tuple[str, str, int, int, bool]]:
    """(name, shard file, offset, length, is a non-tensor value) of every entry of a sharded checkpoint, from its
    index, read with only torch.distributed.checkpoint's own records allowed (errors name the folder ``shown``)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    index = shown / SHARD_INDEX
    try:
        with open(folder / SHARD_INDEX, "rb") as f:
            metadata = _ShardIndexUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f"a {type(metadata).__name__}, not an index")
        entries = []
        for key, info in metadata.storage_data.items():
            if Path(str(info.relative_path)).name != info.relative_path or info.transform_descriptors:
                raise ValueError(f"{key.fqn} is stored as {info.relative_path!r} with transforms "
                                 f"{info.transform_descriptors}, not as a plain shard inside the folder")
            value = isinstance(metadata.state_dict_metadata.get(key.fqn), BytesStorageMetadata)
            entries.append((key.fqn, info.relative_path, int(info.offset), int(info.length), value))
        return entries
    except _Forbidden as err:
        raise CheckpointError(f"{index}: refused to load: it names {err}, which a shard index never holds; "
                              "this file was altered or is not one") from None
    except Exception as err:  # a well-formed pickle of allowed records can still hold anything in their fields
        raise CheckpointError(f"{index}: not a readable shard index ({type(err).__name__}: {err})") from None


def _check_shards(folder: Path, shown: Path) -> None:
    """Check that every entry of a sharded checkpoint lies inside its shard, and read every non-tensor value as
    :func:`load_checkpoint` reads a file: torch.distributed.checkpoint, which Lightning restores the folder with,
    unpickles them (and the index) unrestricted. Its tensors it reads with ``weights_only=True`` itself. Errors
    name the folder ``shown``."""
    for name, relative_path, offset, length, value in _shard_entries(folder, shown):
        shard = shown / relative_path
        try:
            size = (folder / relative_path).stat().st_size
            if offset < 0 or length < 0 or offset + length > size:
                raise OSError(f"it has {size} bytes, but the index places {name} at bytes {offset}..{offset + length}")
            if not value:
                continue
            with open(folder / relative_path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as err:
            raise CheckpointError(f"{shard}: not a readable shard ({err})") from None
        _torch_load(io.BytesIO(data), f"{shard} (value {name})")


def _private_copy(folder: Path) -> Path:
    """The regular files of ``folder`` copied into a new folder only this user can open (removed at exit), each
    file read once."""
    copy = Path(tempfile.mkdtemp(prefix="retention-checkpoint-"))
    atexit.register(shutil.rmtree, copy, True)
    try:
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                with open(entry.path, "rb") as src, open(copy / entry.name, "xb") as dst:
                    shutil.copyfileobj(src, dst)
    except OSError as err:
        shutil.rmtree(copy, ignore_errors=True)
        raise CheckpointError(f"{folder}: not a readable checkpoint folder ({err})") from None
    return copy


def _mapping(path: Path, shown: Path) -> dict[str, Any]:
    checkpoint = _torch_load(path, str(shown))
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{shown}: not a checkpoint (a {type(checkpoint).__name__}, not a mapping)")
    return checkpoint


def open_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(restore from, content)`` of a checkpoint file or a sharded checkpoint folder, read without running code
    (:func:`load_checkpoint`). A file is restored from itself (Lightning reads it with ``weights_only=True``
    too). A folder is copied first (:func:`_private_copy`); the copy's index and shard values are checked, its
    ``meta.pt`` is the content, and the copy is what to restore from. Errors name ``path``."""
    path = Path(path)
    if not path.is_dir():
        return path, _mapping(path, path)
    copy = _private_copy(path)
    try:
        _check_shards(copy, path)
        return copy, _mapping(copy / "meta.pt", path / "meta.pt")
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or a sharded checkpoint folder's ``meta.pt``, loaded without running code: tensors
    and plain values only (``torch.load(weights_only=True)``); a folder's index and shard values are checked
    first. Raises :class:`CheckpointError` naming the file."""
    restore, checkpoint = open_checkpoint(path)
    if restore != Path(path):
        shutil.rmtree(restore, ignore_errors=True)
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


class LastCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` optimizer steps (and at the end of a fit that saved
    none), written to a temporary name and renamed, so a kill while writing leaves the previous checkpoint intact.

    A strategy that saves a folder (FSDP2's sharded checkpoint: one file per rank and ``meta.pt``) writes
    ``last.ckpt.step<N>/``, and ``last.ckpt`` becomes a symbolic link to it, replaced in one rename; the folder
    it pointed to before is deleted afterwards.

    Lightning's ``Checkpoint`` base, not ``ModelCheckpoint``: the trainer counts it as the run's checkpointing,
    and it saves through public hooks and ``trainer.save_checkpoint`` (``ModelCheckpoint`` offers no public way
    to change how its file is written)."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int):
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps}: must be >= 1")
        self.dirpath, self.every_n_train_steps = str(dirpath), every_n_train_steps
        self.saved_step: int | None = None
        """The optimizer step of this fit's last save (None: none yet)."""

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / LAST

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # A batch of an accumulation ends without an optimizer step: the step it shares is saved once.
        if step > 0 and step % self.every_n_train_steps == 0 and step != self.saved_step:
            self.save(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.saved_step is None:
            self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        """Write ``last.ckpt`` of the trainer's state now (every rank calls it)."""
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        filepath = str(self.path)
        Path(self.dirpath).mkdir(parents=True, exist_ok=True)
        partial = Path(f"{filepath}.step{trainer.global_step}")
        if partial.is_dir():  # a sharded checkpoint left by a run killed while writing this step
            if trainer.is_global_zero:
                shutil.rmtree(partial)
            trainer.strategy.barrier("LastCheckpoint.clean")
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            if partial.is_dir():
                self._link(Path(filepath), partial)
            else:
                os.replace(partial, filepath)
        trainer.strategy.barrier("LastCheckpoint")
        self.saved_step = trainer.global_step

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
