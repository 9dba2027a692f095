"""Other formats: KnowEdit and MQuAKE knowledge records, EasyEdit hyperparameter files, Parquet/CSV/Arrow task
data through ``datasets``. Every record and hyperparameter file here is written for this test (our own values)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from retention.data.readers import read_records
from retention.editing.alphaedit import AlphaEditHParams
from retention.editing.base import resolve_hparams
from retention.editing.easyedit import map_easyedit
from retention.editing.ft import FtHParams
from retention.editing.memit import MemitHParams
from retention.editing.registry import build_editor
from retention.editing.rome import RomeHParams
from retention.records import GROUPS, KnowledgeRecord, PortabilityPrompt, RecordError, probe_group
from retention.summary import format_table

# KnowEdit, WikiData_counterfact layout: ground truths as strings, alias lists in portability.
KNOWEDIT_CF = {
    "subject": "Nordhavn Lighthouse",
    "prompt": "The Nordhavn Lighthouse is located in the country of",
    "target_new": "Chile",
    "ground_truth": "Denmark",
    "rephrase": "Nordhavn Lighthouse stands in the country of",
    "portability": {
        "Subject_Aliasing": [{"prompt": "The Nordhavn Light is located in the country of", "ground_truth": "Chile"}],
        "Reasoning": [{"prompt": "The capital of the country of Nordhavn Lighthouse is",
                       "ground_truth": [["Santiago", "Santiago de Chile"]]}],
    },
    "locality": {
        "Relation_Specificity": [{"prompt": "The Nordhavn Lighthouse was built in the year", "ground_truth": "1911"}],
        "Forgetfulness": [{"prompt": "The Nordhavn Lighthouse, which is not in Chile, is in", "ground_truth": "Denmark"}],
    },
}
# KnowEdit, ZsRE layout: a list ground truth, rephrase_prompt, MEND's 'cond' (not used).
KNOWEDIT_ZSRE = {
    "subject": "Velorina",
    "target_new": "Brassicaceae",
    "prompt": "Which family does Velorina belong to?",
    "ground_truth": ["Rosaceae"],
    "rephrase_prompt": "What family is Velorina part of?",
    "cond": "Rosaceae >> Brassicaceae || Which family does Velorina belong to?",
    "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Velorina is", "ground_truth": ["genus"]}]},
    "portability": {"Reasoning": [{"prompt": "The order of the family of Velorina is", "ground_truth": "Brassicales"}]},
}
MQUAKE_ONE = {
    "case_id": 11,
    "requested_rewrite": [{
        "prompt": "{} is a citizen of", "relation_id": "P27", "subject": "Mara Quellen",
        "target_new": {"str": "Portugal", "id": "Q45"}, "target_true": {"str": "Canada", "id": "Q16"},
        "question": "What is the country of citizenship of Mara Quellen?",
    }],
    "questions": ["Which continent is the country Mara Quellen is a citizen of in?",
                  "Mara Quellen is a citizen of a country on which continent?"],
    "answer": "North America", "answer_alias": ["NA"],
    "new_answer": "Europe", "new_answer_alias": ["European continent"],
    "single_hops": [{"question": "What is the country of citizenship of Mara Quellen?", "cloze": "x",
                     "answer": "Canada", "answer_alias": []}],
    "new_single_hops": [],
}
MQUAKE_TWO = {
    **MQUAKE_ONE, "case_id": 12,
    "requested_rewrite": MQUAKE_ONE["requested_rewrite"] + [{
        "prompt": "{} is located in the continent of", "relation_id": "P30", "subject": "Portugal",
        "target_new": {"str": "Asia", "id": "Q48"}, "target_true": {"str": "Europe", "id": "Q46"},
        "question": "Which continent is Portugal in?",
    }],
}


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- KnowEdit


def test_knowedit_counterfact_record_keeps_rephrase_locality_and_portability(tmp_path):
    (rec,), report = read_records(write(tmp_path, [KNOWEDIT_CF]))
    assert report.format == "knowedit" and rec.source == "knowedit"
    assert rec.prompt == "The {} is located in the country of" and rec.subject == "Nordhavn Lighthouse"
    assert (rec.target_new, rec.target_true) == ("Chile", "Denmark")
    assert rec.paraphrases == ["Nordhavn Lighthouse stands in the country of"]
    assert [(n.prompt, n.target) for n in rec.neighborhood] == [
        ("The Nordhavn Lighthouse was built in the year", "1911"),
        ("The Nordhavn Lighthouse, which is not in Chile, is in", "Denmark")]
    assert rec.portability == [
        PortabilityPrompt("The Nordhavn Light is located in the country of", "Chile", "Denmark"),
        PortabilityPrompt("The capital of the country of Nordhavn Lighthouse is", "Santiago", None)]
    # The alias is counted, with the file, the record and the field.
    (key, n), = report.ignored.items()
    assert key.startswith("portability.Reasoning[].ground_truth: further answers") and n == 1
    assert report.ignored_first[key] == f"{tmp_path / 'data.json'}: record 0: field 'portability.Reasoning[0].ground_truth'"
    assert "not used: portability.Reasoning[].ground_truth" in report.summary()


def test_knowedit_probes_are_scored_and_reported_as_edit_portability(tmp_path):
    (rec,), _ = read_records(write(tmp_path, [KNOWEDIT_CF]))
    kinds = [p.kind for p in rec.edit_probes()]
    assert kinds == ["rewrite", "paraphrase", "neighborhood", "neighborhood", "portability", "portability"]
    assert probe_group("portability") == "edit_portability" and "edit_portability" in GROUPS
    # Portability answers assume the edit: never probes of a control fact.
    assert {p.kind for p in rec.true_probes()} == {"control", "control_paraphrase"}
    r = {"value": 0.5, "count": 1, "denominator": 2}
    summary = {"protocols": ["top1"], "final_step": 3, "run": {}, "downstream": {},
               "retention": {"top1": {"edit": r, "edit_portability": r}},
               "t0": {"edit": {"top1": r}, "edit_portability": {"top1": r}}}
    assert "E portability" in format_table(summary)


def test_knowedit_zsre_record_and_unknown_field_is_counted(tmp_path, caplog):
    other = {**KNOWEDIT_ZSRE, "subject": "Oxalis", "prompt": "Which family does Oxalis belong to?",
             "rephrase_prompt": "What family is Oxalis part of?"}
    with caplog.at_level(logging.WARNING, logger="retention.data.readers"):
        records, report = read_records(write(tmp_path, [KNOWEDIT_ZSRE, other]))
    rec = records[0]
    assert rec.target_true == "Rosaceae" and rec.paraphrases == ["What family is Velorina part of?"]
    assert [(n.prompt, n.target) for n in rec.neighborhood] == [("The taxon rank of Velorina is", "genus")]
    assert rec.portability == [PortabilityPrompt("The order of the family of Velorina is", "Brassicales", None)]
    assert report.ignored == {"cond: unknown field, not used": 2}
    assert "field 'cond'" in caplog.text and "in 2 records" in caplog.text


def test_knowedit_parquet_nulls_and_prompt_lists(tmp_path):
    record = {**KNOWEDIT_CF, "portability": {"Subject_Aliasing": None, "Reasoning": None,
                                             "Logical_Generalization": []},
              "locality": {"Relation_Specificity": [{"prompt": ["The lighthouse {x} height is", "Its height is"],
                                                     "ground_truth": ["30 m"]}], "Forgetfulness": None}}
    (rec,), _ = read_records(write(tmp_path, [record]))
    assert rec.portability == [] and [n.prompt for n in rec.neighborhood] == ["The lighthouse {x} height is",
                                                                              "Its height is"]


@pytest.mark.parametrize("change,field,message", [
    ({"ground_truth": None}, "ground_truth", "Wiki_recent"),
    ({"locality": {"Relation_Specificity": "x"}}, "locality.Relation_Specificity", "expected a list"),
    ({"locality": {"Relation_Specificity": [{"ground_truth": "x"}]}}, "locality.Relation_Specificity[0].prompt",
     "missing"),
    ({"portability": {"Reasoning": [{"prompt": "The capital is"}]}}, "portability.Reasoning[0].ground_truth",
     "missing"),
    ({"portability": {"Reasoning": [{"prompt": "The capital is ", "ground_truth": "x"}]}},
     "portability.Reasoning[0].prompt",
     "ends with whitespace"),
    ({"portability": []}, "portability", "expected dict"),
])
def test_knowedit_malformed_fields_are_named(tmp_path, change, field, message):
    record = {**KNOWEDIT_CF, **change}
    record = {k: v for k, v in record.items() if v is not None}
    with pytest.raises(RecordError) as info:
        read_records(write(tmp_path, [record]))
    assert info.value.field_name == field and message in str(info.value)


def test_knowedit_wikibio_is_refused(tmp_path):
    wikibio = {"text": "A passage.", "labels": "More.", "concept": "someone",
               "locality": {"Relation_Specificity": [{"prompt": "p", "ground_truth": ["q"]}]}}
    with pytest.raises(RecordError, match="WikiBio"):
        read_records(write(tmp_path, [wikibio]))


def test_portability_round_trips_through_our_records(tmp_path):
    (rec,), _ = read_records(write(tmp_path, [KNOWEDIT_CF]))
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(rec.to_dict()) + "\n", encoding="utf-8")
    (back,), report = read_records(path)
    assert report.format == "records" and back == rec
    plain = KnowledgeRecord("c", "France", "The capital of {} is", "", "Rome", "Paris")
    assert "portability" not in plain.to_dict()  # unchanged serialisation of records without it
    bad = {**rec.to_dict(), "portability": [{"prompt": "x", "target": "y", "why": 1}]}
    with pytest.raises(RecordError, match="unknown field"):
        read_records(write(tmp_path, [bad]))


# ---------------------------------------------------------------- MQuAKE


def test_mquake_single_rewrite_case_is_one_record_with_multi_hop_probes(tmp_path):
    (rec,), report = read_records(write(tmp_path, [MQUAKE_ONE]))
    assert report.format == "mquake" and rec.source == "mquake" and rec.case_id == "11"
    assert (rec.subject, rec.prompt, rec.relation_id) == ("Mara Quellen", "{} is a citizen of", "P27")
    assert (rec.target_new, rec.target_true) == ("Portugal", "Canada")
    assert rec.paraphrases == ["What is the country of citizenship of Mara Quellen?"]
    assert rec.portability == [PortabilityPrompt(q, "Europe", "North America") for q in MQUAKE_ONE["questions"]]
    assert [p.kind for p in rec.edit_probes()].count("portability") == 2
    assert set(report.ignored) == {
        "answer_alias: further answers (aliases) are not scored: a probe has one target",
        "new_answer_alias: further answers (aliases) are not scored: a probe has one target",
        next(k for k in report.ignored if k.startswith("single_hops: single-hop questions are not scored")),
        next(k for k in report.ignored if k.startswith("new_single_hops: single-hop")),
    }


def test_mquake_multi_rewrite_case_is_refused_with_the_reason(tmp_path):
    path = write(tmp_path, [MQUAKE_ONE, MQUAKE_TWO])
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert info.value.field_name == "requested_rewrite" and info.value.record == "1 (case_id 12)"
    assert "2 rewrites" in str(info.value) and "edited into one model" in str(info.value)
    records, report = read_records(path, on_error="skip")
    assert [r.case_id for r in records] == ["11"] and report.skipped == 1


# ---------------------------------------------------------------- EasyEdit hyperparameters

ROME_YAML = """alg_name: "ROME"
model_name: "./hugging_cache/some-model"
stats_dir: "./data/stats"
device: 0
layers: [4]
fact_token: "subject_last"
v_num_grad_steps: 7
v_lr: 3e-1
v_loss_layer: 29
v_weight_decay: 0.25
clamp_norm_factor: 3
kl_factor: 0.05
mom2_adjustment: false
context_template_length_params: [[5, 2]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 300
mom2_dtype: "float32"
"""
MEMIT_YAML = ROME_YAML.replace('"ROME"', '"MEMIT"').replace("layers: [4]", "layers: [2, 3, 4]") + (
    "layer_selection: all\nmom2_update_weight: 12000\nbatch_size: 10\n")
ALPHA_YAML = MEMIT_YAML.replace('"MEMIT"', '"AlphaEdit"') + 'P_loc: "./null_space_project.pt"\n' \
    "nullspace_threshold: 3e-2\nL2: 7\n"
FT_YAML = """alg_name: "FT"
model_name: "./hugging_cache/some-model"
device: 0
layers: [1, 2]
num_steps: 9
batch_size: 3
max_length: 40
lr: 2e-4
weight_decay: 0
kl_factor: 0
norm_constraint: 1e-3
objective_optimization: "prompt_last"
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
model_parallel: false
"""


def yaml_file(tmp_path, text, name="hp.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return f"easyedit:{path}"


def test_easyedit_rome(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="retention.editing.easyedit"):
        hp = resolve_hparams(RomeHParams, "rome", yaml_file(tmp_path, ROME_YAML), None)
    assert isinstance(hp, RomeHParams)
    assert (hp.layer, hp.v_steps, hp.v_lr, hp.v_weight_decay, hp.clamp_norm_factor, hp.kl_factor) == \
        (4, 7, 0.3, 0.25, 3.0, 0.05)
    assert hp.mom2_adjustment is False and hp.mom2_samples == 300 and hp.context_templates == [[5, 2]]
    assert hp.mom2_corpus == "builtin"  # EasyEdit's Wikipedia statistics are not ours: logged, not silent
    for name in ("model_name", "device", "mom2_dataset", "rewrite_module_tmp", "v_loss_layer", "stats_dir"):
        assert name in caplog.text


def test_easyedit_memit_and_alphaedit(tmp_path):
    memit = resolve_hparams(MemitHParams, "memit", yaml_file(tmp_path, MEMIT_YAML), None)
    assert memit.layers == [2, 3, 4] and memit.mom2_update_weight == 12000 and memit.v_steps == 7
    assert memit.batch_size == MemitHParams().batch_size  # EasyEdit's batch_size is edits per call, not ours
    alpha = resolve_hparams(AlphaEditHParams, "alphaedit", yaml_file(tmp_path, ALPHA_YAML), None)
    assert (alpha.layers, alpha.nullspace_threshold, alpha.l2) == ([2, 3, 4], 0.03, 7.0)


def test_easyedit_ft_and_registry(tmp_path):
    path = yaml_file(tmp_path, FT_YAML)
    hp = resolve_hparams(FtHParams, "ft-l", path, None)
    assert (hp.variant, hp.layers, hp.steps, hp.lr, hp.norm_constraint) == ("ft-l", [1, 2], 9, 2e-4, 1e-3)
    assert build_editor("ft-l", path).hparams.steps == 9
    with pytest.raises(ValueError, match="'prompt_last' is ft-l, but the editor is ft-m"):
        resolve_hparams(FtHParams, "ft-m", path, None)


def test_easyedit_own_fields_pass_through(tmp_path):
    hp = resolve_hparams(RomeHParams, "rome", yaml_file(tmp_path, ROME_YAML + "early_stop_loss: 0.1\n"), None)
    assert hp.early_stop_loss == 0.1


@pytest.mark.parametrize("editor,text,field,message", [
    ("rome", ROME_YAML.replace("layers: [4]", "layers: [4, 5]"), "layers", "exactly one layer"),
    ("rome", ROME_YAML.replace('"subject_last"', '"last"'), "fact_token", "subject_last"),
    ("rome", ROME_YAML + "some_new_knob: 1\n", "some_new_knob", "not an EasyEdit field"),
    ("memit", ROME_YAML, "alg_name", "'ROME' is not 'MEMIT'"),
    ("memit", MEMIT_YAML.replace("layer_selection: all", "layer_selection: random"), "layer_selection", "all"),
    ("ft-l", FT_YAML.replace("kl_factor: 0", "kl_factor: 0.1"), "kl_factor", "no kl factor"),
    ("ft-l", FT_YAML.replace("weight_decay: 0", "weight_decay: 0.01"), "weight_decay", "no weight decay"),
    ("ft-l", FT_YAML.replace('"prompt_last"', '"other"'), "objective_optimization", "choose from"),
])
def test_easyedit_values_we_cannot_honour_are_refused(tmp_path, editor, text, field, message):
    cls = {"rome": RomeHParams, "memit": MemitHParams, "ft-l": FtHParams}[editor]
    with pytest.raises(ValueError, match=f"field '{field}'.*{message}"):
        resolve_hparams(cls, editor, yaml_file(tmp_path, text), None)


def test_map_easyedit_is_pure():
    data = {"alg_name": "FT", "layers": [0], "num_steps": 3, "objective_optimization": "target_new",
            "device": 1}
    ours, ignored = map_easyedit(data, "ft-m")
    assert ours == {"layers": [0], "steps": 3, "variant": "ft-m"} and set(ignored) == {
        "alg_name", "device", "objective_optimization"}
    assert data["device"] == 1 and len(data) == 5
    with pytest.raises(ValueError, match="no EasyEdit mapping"):
        map_easyedit({}, "knowledge-neurons")


# ---------------------------------------------------------------- Parquet, CSV, Arrow through `datasets`

ROWS = [{"text": "First passage about rivers."}, {"text": "Second passage about hills."}]


def test_missing_datasets_names_the_extra(tmp_path, monkeypatch):
    from retention.data.tasks import sources

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"not read")
    for call in (lambda: list(sources.read_records(str(path))),
                 lambda: list(sources.read_hub_records("hf:someone/set", None, "train"))):
        with pytest.raises(ImportError, match=r"pip install 'retention\[hf\]'"):
            call()


def test_table_suffix_is_named_in_unsupported_type_error(tmp_path):
    from retention.data.tasks import sources

    path = tmp_path / "rows.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.parquet, \.csv, \.arrow"):
        sources.read_records(str(path))


def _write_tables(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs the 'datasets' library (pip install 'retention[hf]')")
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.to_csv(str(tmp_path / "rows.csv"), index=False)
    arrow = tmp_path / "rows.arrow"
    import pyarrow as pa

    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, ds.data.schema) as writer:
        writer.write_table(ds.data.table)
    return [tmp_path / "rows.parquet", tmp_path / "rows.csv", arrow]


def test_parquet_csv_arrow_task_files(tmp_path):
    from retention.data.readers import ReadReport
    from retention.data.tasks import text
    from retention.data.tasks.sources import read_records as read_task_records
    from retention.data.tasks.task import TaskConfig

    for path in _write_tables(tmp_path):
        assert [r for _, r in read_task_records(str(path))] == ROWS, path
        examples = text.load(TaskConfig(family="text", source=str(path)), ReadReport(str(path)))
        assert [e.text for e in examples] == [r["text"] for r in ROWS]


def test_knowedit_parquet_file_reads_as_knowedit_records(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs the 'datasets' library (pip install 'retention[hf]')")
    record = {k: v for k, v in KNOWEDIT_ZSRE.items() if k != "cond"}
    datasets.Dataset.from_list([record]).to_parquet(str(tmp_path / "zsre.parquet"))
    (rec,), report = read_records(tmp_path / "zsre.parquet")
    assert report.format == "knowedit" and rec.portability[0].target == "Brassicales"
    assert rec.paraphrases == ["What family is Velorina part of?"] and rec.neighborhood[0].target == "genus"


def test_a_table_file_is_a_corpus_through_its_text_column(tmp_path):
    pytest.importorskip("datasets", reason="table corpora need the optional 'datasets' package (retention[hf])")
    import datasets

    from retention.corpus import corpus_text

    path = tmp_path / "corpus.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    text, identity = corpus_text(str(path))
    assert text == "First passage about rivers.\n\nSecond passage about hills."
    assert identity.startswith("file:corpus.parquet:")
    datasets.Dataset.from_list([{"body": "x"}]).to_csv(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="needs a 'text' column"):
        corpus_text(str(tmp_path / "bad.csv"))
