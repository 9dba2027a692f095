"""EasyEdit hyperparameter files (``hparams/<ALG>/<model>.yaml``) for ROME, MEMIT, AlphaEdit and FT, read as ours.

``--hparams easyedit:path.yaml`` (``edits.hparams: easyedit:path.yaml`` in ``retention fit``) reads such a file
for the editor named by ``--editor``. :func:`map_easyedit` is the pure mapping: each EasyEdit field is

- **mapped** to our field (:data:`RENAMED`, e.g. ``v_num_grad_steps`` -> ``v_steps``, ``layers: [17]`` ->
  ``layer: 17`` for ROME, ``objective_optimization`` -> FT's ``variant``), or
- **ignored with a note** (:data:`IGNORED`): the model and device (``model_name``, ``device``, ...) come from the
  run; module templates (``rewrite_module_tmp``, ...) from the model's architecture; the statistics corpus
  ``mom2_dataset`` (EasyEdit: Wikipedia, downloaded) is replaced by our ``mom2_corpus`` (default ``builtin``), and
  so on. The notes are returned and logged, never dropped silently; or
- **refused** (a ValueError naming the file and the field): a value we cannot honour (a ROME file with several
  layers, ``fact_token`` other than ``subject_last``, FT with ``kl_factor`` or ``weight_decay`` other than 0, an
  ``alg_name`` of another editor, a field we do not know).

Fields of our own dataclasses may appear in the file too (``mom2_corpus``, ``early_stop_loss``, ...); they are
taken as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "easyedit:"

ALG_NAMES = {"rome": "ROME", "memit": "MEMIT", "alphaedit": "AlphaEdit", "ft-l": "FT", "ft-m": "FT"}
"""Our editor name -> EasyEdit's ``alg_name``."""

_TARGET = {"v_num_grad_steps": "v_steps", "v_lr": "v_lr", "v_weight_decay": "v_weight_decay",
           "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor",
           "context_template_length_params": "context_templates", "mom2_adjustment": "mom2_adjustment",
           "mom2_n_samples": "mom2_samples"}  # fmt: skip
RENAMED: dict[str, dict[str, str]] = {
    "rome": _TARGET,
    "memit": {**_TARGET, "layers": "layers", "mom2_update_weight": "mom2_update_weight"},
    "alphaedit": {**_TARGET, "layers": "layers", "nullspace_threshold": "nullspace_threshold", "L2": "l2"},
    "ft": {"layers": "layers", "num_steps": "steps", "lr": "lr", "norm_constraint": "norm_constraint"},
}
"""Per editor: EasyEdit field -> our field (ROME's ``layers`` and FT's ``objective_optimization`` are converted
by :func:`map_easyedit` itself)."""

_MODEL = "the model and its device come from the run (model.model_name, trainer)"
_MODULES = "modules are found from the model's architecture (the MLP output projection)"
_COMMON = {
    "alg_name": "checked against the editor",
    "model_name": _MODEL, "device": _MODEL, "model_parallel": _MODEL, "fp16": _MODEL, "bf16": _MODEL,
    "tokenizer_name": _MODEL, "tokenizer_class": _MODEL, "model_class": _MODEL, "use_chat_template": _MODEL,
    "max_length": "prompts are not truncated",
    "batch_size": "how many edits go into one editor call is edits.batch_size / --batch_size",
    "stats_dir": "key statistics are cached under $RETENTION_CACHE",
    "rewrite_module_tmp": _MODULES, "layer_module_tmp": _MODULES, "mlp_module_tmp": _MODULES,
    "attn_module_tmp": _MODULES, "ln_f_module": _MODULES, "lm_head_module": _MODULES,
}  # fmt: skip
_STATS = {
    "mom2_dataset": "EasyEdit's statistics corpus (Wikipedia, downloaded) is not read: the key statistics come from "
                    "mom2_corpus (default 'builtin'; set it in the file for another corpus)",
    "mom2_dtype": "key statistics are accumulated in float64",
    "v_loss_layer": "the v* loss is taken at the model's output, as EasyEdit's files set it (the last layer)",
    "fact_token": "checked: subject_last is what our editors use",
    "layer_selection": "checked: all",
}
IGNORED: dict[str, dict[str, str]] = {
    "rome": {**_COMMON, **_STATS},
    "memit": {**_COMMON, **_STATS},
    "alphaedit": {**_COMMON, **_STATS, "P_loc": "the null-space projector is computed (and cached) here"},
    "ft": {**_COMMON, "objective_optimization": "mapped to variant", "kl_factor": "checked: 0",
           "weight_decay": "checked: 0"},
}
"""Per editor: EasyEdit fields read but not used, with why (logged as a list)."""

EASYEDIT_FIELDS = frozenset({*(k for m in RENAMED.values() for k in m), *(k for m in IGNORED.values() for k in m)})
"""Every EasyEdit field we know (some share their name with one of ours)."""

FT_VARIANTS = {"prompt_last": "ft-l", "target_new": "ft-m"}
"""FT's ``objective_optimization`` -> our FT variant (FT-L: last-token loss; FT-M: masked loss on the target)."""


def _family(editor: str) -> str:
    if editor in ("ft-l", "ft-m", "ft"):
        return "ft"
    if editor not in RENAMED:
        raise ValueError(f"easyedit hyperparameters: editor {editor!r} has no EasyEdit mapping "
                         f"(mapped: {', '.join(ALG_NAMES)})")
    return editor


def map_easyedit(data: dict[str, Any], editor: str, own_fields: set[str] | frozenset[str] = frozenset(),
                 source: str = "EasyEdit hyperparameters") -> tuple[dict[str, Any], dict[str, str]]:
    """``(our fields, ignored)`` of an EasyEdit hyperparameter mapping for ``editor`` (``rome``, ``memit``,
    ``alphaedit``, ``ft-l``, ``ft-m``): ``ignored`` maps each EasyEdit field that is not used to why. A value we
    cannot honour, or a field that is neither EasyEdit's (:data:`RENAMED`, :data:`IGNORED`) nor one of
    ``own_fields`` (our dataclass's), raises a ValueError naming ``source`` and the field."""
    family = _family(editor)
    renamed, ignorable = RENAMED[family], IGNORED[family]

    def refuse(name: str, why: str) -> ValueError:
        return ValueError(f"{source}: field '{name}': {why}")

    alg, expected = data.get("alg_name"), ALG_NAMES.get(editor, "FT")
    if alg is not None and str(alg).lower() != expected.lower():
        raise refuse("alg_name", f"{alg!r} is not {expected!r}: give --editor the editor of the file")
    out: dict[str, Any] = {}
    ignored: dict[str, str] = {}
    for name, value in data.items():
        if name in renamed:
            out[renamed[name]] = value
        elif family == "rome" and name == "layers":
            if not isinstance(value, list) or len(value) != 1:
                raise refuse("layers", f"{value!r}: ROME edits exactly one layer (give a list of one)")
            out["layer"] = value[0]
        elif name in ignorable:
            ignored[name] = ignorable[name]
        elif name in own_fields:
            out[name] = value
        else:
            raise refuse(name, "not an EasyEdit field we know for this editor, nor one of ours "
                               f"(ours: {', '.join(sorted(own_fields)) or 'none'})")
    if data.get("fact_token", "subject_last") != "subject_last":
        raise refuse("fact_token", f"{data['fact_token']!r}: our editors take the key at the subject's last token "
                                   "(subject_last)")
    if data.get("layer_selection", "all") != "all":
        raise refuse("layer_selection", f"{data['layer_selection']!r}: only 'all' (every listed layer) is supported")
    if family == "ft":
        for name in ("kl_factor", "weight_decay"):
            if data.get(name, 0) not in (0, 0.0, None):
                raise refuse(name, f"{data[name]!r}: our FT editor has no {name.replace('_', ' ')} (only 0)")
        if "objective_optimization" in data:
            objective = data["objective_optimization"]
            if objective not in FT_VARIANTS:
                raise refuse("objective_optimization", f"{objective!r}: choose from {', '.join(FT_VARIANTS)}")
            variant = FT_VARIANTS[objective]
            if editor in ("ft-l", "ft-m") and variant != editor:
                raise refuse("objective_optimization", f"{objective!r} is {variant}, but the editor is {editor}")
            out["variant"] = variant
        if out.get("norm_constraint") is False:
            out["norm_constraint"] = None
    return out, ignored


def easyedit_hint(path: str | Path, own_fields: set[str] | frozenset[str]) -> str | None:
    """For a hyperparameter file given without :data:`PREFIX`: the hint to give it with the prefix when it holds
    EasyEdit fields that are not among ``own_fields`` (the editor's dataclass's), else None."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    foreign = sorted(k for k in data if isinstance(k, str) and k in EASYEDIT_FIELDS and k not in own_fields)
    if not foreign:
        return None
    shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
    return (f"{path} holds EasyEdit fields ({shown}): give it as {PREFIX}{path} to map them "
            f"(--hparams {PREFIX}{path}; edits.hparams: {PREFIX}{path} in retention fit)")


def load_easyedit(cls: type, editor: str, path: str | Path):
    """Hyperparameters of class ``cls`` (the editor's dataclass) from an EasyEdit YAML file; the ignored fields
    are logged as one list."""
    from dataclasses import fields

    path = Path(path)
    data = cls.read_yaml(path, "EasyEdit hyperparameter file")
    ours, ignored = map_easyedit(data, editor, {f.name for f in fields(cls)}, source=str(path))
    cls.anchor_paths(ours, path)  # relative to the file, as in our own hparams files
    if ignored:
        log.warning("%s: EasyEdit fields not used: %s", path,
                    "; ".join(f"{name} ({why})" for name, why in ignored.items()))
    return cls.from_dict(ours, source=f"{path} (mapped from EasyEdit)")

