"""Edits kept outside the base weights: a memory module hooked onto one MLP output projection, and the edit result
that installs and removes it.

GRACE (:mod:`retention.editing.grace`) and WISE (:mod:`retention.editing.wise`) store what they learn in a
:class:`Memory` — a codebook, a side copy of the projection — that replaces the projection's output at some
token positions and leaves it untouched at the others. A :class:`MemoryEditResult` holds the memory's whole state
after its editor call (a snapshot: in a sequential run each call's memory contains the earlier calls' edits).
``apply`` attaches the memory to the projection (a child module holding non-persistent buffers, and a forward
hook), replacing a memory an earlier result attached there; ``revert`` removes it and puts the earlier one
back. No weight changes, and the model's ``state_dict`` is the same with the memory attached or not, so freezing,
checkpoints and exports see the base model only; the buffers follow the model across ``.to()``.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from retention.arch import unwrap_model
from retention.editing.base import EditError, EditResult, RequestDiagnostics
from retention.io import atomic_path, atomic_write_json

ATTRIBUTE = "retention_memory"
"""The name under which an attached memory is a child of the projection it wraps."""
MEMORY_FILE = "memory.safetensors"


class Memory(nn.Module):
    """What a memory editor learned, attached to one module: ``route(x, y)`` gives the module's output."""

    kind: ClassVar[str]

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        super().__init__()
        for name, value in tensors.items():
            # Non-persistent: the model's state_dict (checkpoints, exports, freezing by name) never sees them.
            self.register_buffer(name, value, persistent=False)
        self.meta = dict(meta)
        self._handle = None

    @abstractmethod
    def route(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The output of ``module`` for input ``x`` given its own output ``y``: ``y`` itself (the very tensor)
        wherever the memory defers to the module."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: buf.detach().float().cpu().contiguous() for name, buf in self.named_buffers(recurse=False)}

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs["input"]
        y = output[0] if isinstance(output, tuple) else output
        new = self.route(module, x, y)
        if new is y:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def attach(self, module: nn.Module) -> None:
        device = next((p.device for p in module.parameters(recurse=False)), None)
        if device is not None:
            self.to(device)
        setattr(module, ATTRIBUTE, self)
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def detach_from(self, module: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if getattr(module, ATTRIBUTE, None) is self:
            delattr(module, ATTRIBUTE)


def attached(module: nn.Module) -> Memory | None:
    """The memory attached to ``module``, if any."""
    memory = getattr(module, ATTRIBUTE, None)
    return memory if isinstance(memory, Memory) else None


@dataclass
class MemoryState:
    """A memory's whole content: which module it wraps, its kind, its tensors and its JSON-able fields."""

    module: str
    """The wrapped module's name in the unwrapped model (an MLP output projection)."""
    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    """Includes ``case_ids``: every edit the memory holds, earlier calls' first."""

    @property
    def case_ids(self) -> list[str]:
        return list(self.meta.get("case_ids", []))


MEMORY_KINDS: dict[str, type[Memory]] = {}
"""Memory kind -> class, filled by the editors' modules (``register_memory``)."""


def register_memory(cls: type[Memory]) -> type[Memory]:
    MEMORY_KINDS[cls.kind] = cls
    return cls


def build_memory(state: MemoryState) -> Memory:
    if state.kind not in MEMORY_KINDS:
        raise EditError(f"unknown memory kind {state.kind!r} (known: {', '.join(sorted(MEMORY_KINDS))})")
    return MEMORY_KINDS[state.kind]({k: v.clone() for k, v in state.tensors.items()}, state.meta)


@dataclass
class MemoryEditResult(EditResult):
    """An editor call whose edits live in a memory attached to one module: ``deltas`` is empty, ``memory`` holds
    the memory after the call. ``apply``/``revert`` attach and detach it; ``save``/``load`` use safetensors and
    JSON."""

    memory: MemoryState | None = None
    _previous: Memory | None = field(default=None, init=False, repr=False)
    _installed: Memory | None = field(default=None, init=False, repr=False)

    @property
    def applied(self) -> bool:
        return self._installed is not None

    def _module(self, model: nn.Module) -> nn.Module:
        if self.memory is None:
            raise EditError(f"{self.editor} result holds no memory")
        try:
            return unwrap_model(model).get_submodule(self.memory.module)
        except AttributeError:
            raise EditError(f"{self.editor} result: the model has no module {self.memory.module!r}") from None

    def apply(self, model: nn.Module) -> None:
        """Attach the memory to its module, replacing (and keeping, for :meth:`revert`) the one there."""
        if self.applied:
            raise EditError(f"{self.editor} result for {len(self.case_ids)} request(s) is already applied")
        module = self._module(model)
        previous = attached(module)
        if previous is not None and previous.kind != self.memory.kind:
            raise EditError(f"{self.editor} result: {self.memory.module} holds a {previous.kind} memory already")
        if previous is not None:
            previous.detach_from(module)
        memory = build_memory(self.memory)
        memory.attach(module)
        self._previous, self._installed = previous, memory

    def revert(self, model: nn.Module) -> None:
        """Detach the memory and attach the one it replaced, if any: the model is as :meth:`apply` found it."""
        if not self.applied:
            raise EditError(f"{self.editor} result for {len(self.case_ids)} request(s) is not applied; nothing to revert")
        module = self._module(model)
        if attached(module) is not self._installed:
            raise EditError(f"{self.editor} result: {self.memory.module} holds another memory now; revert the later "
                            "results first")
        self._installed.detach_from(module)
        if self._previous is not None:
            self._previous.attach(module)
        self._previous = self._installed = None

    @classmethod
    def merge(cls, results: Sequence[EditResult]) -> MemoryEditResult:
        """The last result's memory with every result's requests: a sequential run's memory is its last call's."""
        if not results:
            raise ValueError("no edit results to merge")
        last = results[-1]
        case_ids = [c for r in results for c in r.case_ids]
        if not isinstance(last, MemoryEditResult) or not set(case_ids) <= set(last.memory.case_ids):
            raise EditError(f"{results[0].editor}: only the results of one sequential run merge into one memory (the "
                            "last call's memory holds every edit); independent results cannot")
        return cls(last.editor, {}, sorted({i for r in results for i in r.layers}), case_ids,
                   [d for r in results for d in r.diagnostics], last.hparams, sum(r.seconds for r in results),
                   memory=last.memory)

    def save(self, folder: str | Path) -> Path:
        """Write ``memory.safetensors`` (the memory's tensors) and ``edit.json`` (everything else)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / MEMORY_FILE) as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.memory.tensors.items()}, str(tmp))
        meta = {
            "editor": self.editor, "layers": self.layers, "case_ids": self.case_ids, "hparams": self.hparams,
            "seconds": self.seconds, "diagnostics": [asdict(d) for d in self.diagnostics],
            "memory": {"module": self.memory.module, "kind": self.memory.kind, "meta": self.memory.meta},
        }
        atomic_write_json(folder / "edit.json", meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> MemoryEditResult:
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in ("edit.json", MEMORY_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not a saved memory edit result: {name} is missing")
        meta = json.loads((folder / "edit.json").read_text(encoding="utf-8"))
        if "memory" not in meta:
            raise ValueError(f"{folder}/edit.json: no 'memory' field: a weight-delta edit (load it with EditResult.load)")
        memory = meta.pop("memory")
        state = MemoryState(memory["module"], memory["kind"], load_file(str(folder / MEMORY_FILE)), memory["meta"])
        diagnostics = [RequestDiagnostics(**d) for d in meta.pop("diagnostics")]
        return cls(deltas={}, diagnostics=diagnostics, memory=state, **meta)


def load_edit_result(folder: str | Path) -> EditResult:
    """A saved edit result of any editor: a memory result when the folder holds ``memory.safetensors``."""
    return MemoryEditResult.load(folder) if (Path(folder) / MEMORY_FILE).is_file() else EditResult.load(folder)
