"""The one activation trace/patch helper of the editors: capture module inputs/outputs, patch outputs, stop a
forward early, run the decoder from a cached layer input, and find a subject's tokens in a prompt.

A decoder layer's or projection's output may be a tensor or a tuple whose first element is the hidden states;
patches and captures act on that tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from retention.arch import ArchAdapter

Patch = Callable[[torch.Tensor], torch.Tensor]


def _main(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_main(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    return new


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@dataclass
class Captured:
    """What :func:`capture` recorded of one module in the last forward."""

    input: torch.Tensor | None = None
    """The module's first positional input (for a projection: the key)."""
    output: torch.Tensor | None = None
    """The module's output tensor (first element of a tuple output)."""


@contextmanager
def capture(
    modules: Mapping[Hashable, nn.Module], inputs: bool = True, outputs: bool = True, detach: bool = True
) -> Iterator[dict[Hashable, Captured]]:
    """Record the inputs and/or outputs of ``modules`` (keyed like ``modules``) during the forwards inside."""
    records = {key: Captured() for key in modules}
    handles = []

    def hook_for(key):
        def hook(module, args, kwargs, output):
            rec = records[key]
            if inputs:
                x = _hidden_arg(args, kwargs)
                rec.input = x.detach() if detach else x
            if outputs:
                y = _main(output)
                rec.output = y.detach() if detach else y

        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(key), with_kwargs=True))
        yield records
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    pass


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End any forward inside as soon as ``module`` has run (the rest of the model is not computed)."""

    def hook(mod, args, output):
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def patch_outputs(patches: Mapping[nn.Module, Callable], with_input: bool = False) -> Iterator[None]:
    """Replace each module's output tensor ``y`` by ``patch(y)`` — or ``patch(x, y)`` with its input ``x`` when
    ``with_input`` — during the forwards inside."""
    handles = []

    def hook_for(patch: Callable):
        def hook(module, args, kwargs, output):
            y = _main(output)
            return _replace_main(output, patch(_hidden_arg(args, kwargs), y) if with_input else patch(y))

        return hook

    try:
        for module, patch in patches.items():
            handles.append(module.register_forward_hook(hook_for(patch), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def add_at(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> Patch:
    """A patch adding ``values[j]`` to the output at ``(rows[j], cols[j])`` (out of place, so it is differentiable)."""

    def patch(y: torch.Tensor) -> torch.Tensor:
        return y.index_put((rows.to(y.device), cols.to(y.device)), values.to(y.dtype), accumulate=True)

    return patch


@torch.no_grad()
def layer_input(
    model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    adapter: ArchAdapter | None = None,
) -> torch.Tensor:
    """The hidden states entering decoder layer ``layer`` (the forward stops there); ``adapter``: the model's, when
    the caller has it."""
    block = (adapter or ArchAdapter.for_model(model)).layer(layer)
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(_hidden_arg(args, kwargs).detach())
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


def _skip(*args, **kwargs):
    return _hidden_arg(args, kwargs)


@contextmanager
def start_at_layer(model: nn.Module, layer: int, hidden: torch.Tensor,
                   adapter: ArchAdapter | None = None) -> Iterator[None]:
    """Forwards inside skip decoder layers ``< layer`` and feed ``hidden`` (from :func:`layer_input` on the same
    ``input_ids``/``attention_mask``) into layer ``layer``; ``adapter``: the model's, when the caller has it.

    Everything that depends only on the input ids — position ids, rotary embeddings, attention masks — is still
    computed by the model itself, so the logits equal those of a full forward.
    """
    adapter = adapter or ArchAdapter.for_model(model)
    start = adapter.layer(layer)
    below = [adapter.layer(i) for i in range(layer % adapter.num_layers)]

    def feed(module, args, kwargs):
        x = _hidden_arg(args, kwargs)
        if x.shape != hidden.shape:
            raise ValueError(f"cached layer-{layer} input has shape {tuple(hidden.shape)}, the forward {tuple(x.shape)}")
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    with ExitStack() as stack:
        for block in below:
            previous = block.__dict__.get("forward")
            block.forward = _skip
            stack.callback(_restore_forward, block, previous)
        handle = start.register_forward_pre_hook(feed, with_kwargs=True)
        stack.callback(handle.remove)
        yield


def _restore_forward(block: nn.Module, previous) -> None:
    if previous is None:
        del block.forward
    else:
        block.forward = previous


def subject_token_span(tokenizer, template: str, subject: str) -> tuple[int, int]:
    """``(first, last)`` token indices (inclusive) of ``subject`` in ``tokenizer(template.format(subject))``.

    Found by tokenising the whole strings ``prefix`` and ``prefix + subject`` (never the subject alone), which is
    right for BPE and SentencePiece alike; a space before the subject belongs to the subject's first token.
    """
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    prefix = template[: template.index("{}")]
    end = len(tokenizer(prefix + subject)["input_ids"])
    start = len(tokenizer(prefix.rstrip(" "))["input_ids"]) if prefix.strip() else len(tokenizer("")["input_ids"])
    if end <= start:
        raise ValueError(f"subject {subject!r} has no tokens of its own in {template!r}")
    return start, end - 1


def subject_last_token_index(tokenizer, template: str, subject: str) -> int:
    """Index of the subject's last token in ``tokenizer(template.format(subject))`` (the editing position)."""
    return subject_token_span(tokenizer, template, subject)[1]
