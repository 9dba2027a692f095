"""The output folder of ``retention edit`` (batch or sequential mode) as ``retention fit`` reads it back
(``edits.precomputed``): the facts as edited, the edited weights bit for bit, and the scores with the editor,
its hyperparameters and the unedited model's weight fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

from retention.data.readers import load_records
from retention.editing.memory import MEMORY_FILE

FACTS = "facts.jsonl"
EDITED_WEIGHTS = "edited_weights.safetensors"
SCORES = "scores.json"


def read_edit_folder(folder: str | Path) -> dict:
    """What ``retention fit`` needs from an output folder of ``retention edit`` (batch or sequential mode): the
    editor, mode, hyperparameters, edited layers, per-request diagnostics, the base model's fingerprint, the
    facts as edited (``records``) and the path of the edited weights; raises naming a missing file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if (folder / "edits").is_dir() and not (folder / "edit").is_dir():
        raise ValueError(f"{folder} holds a single-mode edit (one result per fact, never applied together)")
    written = json.loads((folder / SCORES).read_text(encoding="utf-8")) if (folder / SCORES).is_file() else {}
    if (folder / "edit" / MEMORY_FILE).is_file():
        editor = written.get("editor", "a memory editor")
        raise ValueError(f"{folder} holds edits kept in a memory module (edit/{MEMORY_FILE}, {editor}), not edited "
                         f"weights: edits.precomputed takes weight edits only; let the run edit (edits.editor: "
                         f"{editor})")
    if written.get("dtype", "float32") != "float32":
        raise ValueError(f"{folder} was edited in {written['dtype']}; `retention fit` loads float32: make its "
                         "edits.precomputed with `retention edit --dtype float32`")
    for name in (SCORES, "edit/edit.json", FACTS, EDITED_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: not the output of `retention edit` in batch or "
                                    "sequential mode (or written before it saved facts and edited weights)")
    edit = json.loads((folder / "edit" / "edit.json").read_text(encoding="utf-8"))
    records = load_records(folder / FACTS)
    if [str(r.case_id) for r in records] != [str(c) for c in edit["case_ids"]]:
        raise ValueError(f"{folder}: {FACTS} and edit/edit.json name different facts")
    return {"editor": written["editor"], "mode": written["mode"], "hparams": written["hparams"],
            "base_fingerprint": written["base_fingerprint"], "layers": edit["layers"],
            "diagnostics": edit["diagnostics"], "records": records, "weights": folder / EDITED_WEIGHTS}
