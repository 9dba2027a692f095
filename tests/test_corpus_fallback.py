"""``mom2_corpus`` as an ordered fallback list: resolved to the first corpus readable here, with a warning naming
what was skipped, or an error naming the setting and the fix, when the hyperparameters are made (before any
model is loaded). No network: the hub check is faked."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types

import pytest

from retention import corpus as corpora
from retention.corpus import CorpusUnavailableError, resolve_corpus
from retention.editing.memit import MemitHParams
from retention.editing.registry import editor_hparams
from retention.editing.rome import RomeHParams

HUB = "hf:wikimedia/wikipedia:20231101.en"
LARGE = [(editor, model) for editor in ("rome", "memit", "alphaedit") for model in ("gpt2-xl", "gpt-j-6b", "llama-3-8b")]


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """``RETENTION_DATA`` names an empty folder: ``wikitext2`` is missing."""
    monkeypatch.setenv("RETENTION_DATA", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.fixture
def with_datasets(monkeypatch):
    """``datasets`` looks installed (the hub check then goes on to the offline variables and the network)."""
    real = corpora.importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("datasets", None)
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name, *a: spec if name == "datasets" else real(name, *a))
    for name in corpora.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    corpora._hub_problem.cache_clear()
    yield
    corpora._hub_problem.cache_clear()


def _fake_hub(monkeypatch, answer):
    """The hub answers HEAD requests with status ``answer`` (or raises it); the URLs asked are returned."""
    import huggingface_hub.utils

    asked = []

    class Session:
        def head(self, url, **kwargs):
            asked.append(url)
            if isinstance(answer, Exception):
                raise answer
            return types.SimpleNamespace(status_code=answer)

    monkeypatch.setattr(huggingface_hub.utils, "get_session", Session)
    return asked


def test_the_first_readable_spec_is_used_and_each_skipped_one_is_named(tmp_path, no_data, caplog):
    text = tmp_path / "corpus.txt"
    text.write_text("some text", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="retention.corpus"):
        assert resolve_corpus([str(text), "builtin"], "mom2_corpus") == str(text)
        assert resolve_corpus("builtin", "mom2_corpus") == "builtin"
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="retention.corpus"):
        assert resolve_corpus([str(tmp_path / "missing.txt"), "wikitext2", str(text), "builtin"],
                              "mom2_corpus") == str(text)
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"mom2_corpus: using {str(text)!r}; skipped ")
    assert "missing.txt' (no such file" in message
    assert f"'wikitext2' ({no_data / 'wikitext' / 'wiki.test.raw'} does not exist; fix: export RETENTION_DATA=" in message


def test_none_readable_names_the_setting_every_spec_and_the_fix(tmp_path, no_data, monkeypatch):
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name, *a: None)  # no 'datasets'
    with pytest.raises(CorpusUnavailableError) as err:
        resolve_corpus([HUB, "wikitext2", "$NO_SUCH_VAR/x.txt"], "mom2_corpus")
    message = str(err.value)
    assert message.startswith("mom2_corpus: no corpus it names can be read here")
    assert f"{HUB!r} (the 'datasets' package is not installed; fix: pip install 'retention[hf]')" in message
    assert "'wikitext2' (" in message and "fix: export RETENTION_DATA=<folder holding wikitext/wiki.test.raw>" in message
    assert "'$NO_SUCH_VAR/x.txt' (environment variable NO_SUCH_VAR is not set; fix: export NO_SUCH_VAR=" in message
    assert "set mom2_corpus to 'builtin'" in message
    with pytest.raises(ValueError, match=r"mom2_corpus=\[\]: give a corpus spec or a non-empty list"):
        resolve_corpus([], "mom2_corpus")


@pytest.mark.parametrize("variable", corpora.OFFLINE_ENV)
def test_an_offline_hub_makes_hub_corpora_unavailable_without_asking_it(with_datasets, monkeypatch, variable):
    asked = _fake_hub(monkeypatch, 200)
    monkeypatch.setenv(variable, "1")
    assert corpora.corpus_problem(HUB) == (f"{variable}=1 is set (a hub corpus is streamed from the network)",
                                           f"unset {variable}")
    assert resolve_corpus([HUB, "builtin"]) == "builtin"
    assert not asked


def test_the_hub_check_is_one_cached_head_request(with_datasets, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    asked = _fake_hub(monkeypatch, 200)
    assert resolve_corpus([HUB, "builtin"]) == HUB
    assert resolve_corpus(HUB) == HUB
    assert asked == ["https://hub.example/api/datasets/wikimedia/wikipedia"]
    corpora._hub_problem.cache_clear()
    _fake_hub(monkeypatch, 404)
    assert "no public dataset 'wikimedia/wikipedia' (HTTP 404)" in corpora.corpus_problem(HUB)[0]
    corpora._hub_problem.cache_clear()
    _fake_hub(monkeypatch, ConnectionError("down"))
    assert corpora.corpus_problem(HUB)[0] == ("the hub https://hub.example could not be reached "
                                              "(ConnectionError, timeout 3 s)")


def test_a_hub_corpus_is_streamed_and_read_only_to_min_chars(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming=False):
        calls.append((name, config, split, streaming))
        return ({"text": f"paragraph {i} " * 10} for i in range(10**9))  # never-ending, as Wikipedia nearly is

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    text, identity = corpora.corpus_text(HUB, min_chars=1000)
    assert 1000 <= len(text) < 1300 and identity == HUB
    assert calls == [("wikimedia/wikipedia", "20231101.en", "train", True)]


def test_hparams_record_the_corpus_used(tmp_path, no_data, caplog):
    with caplog.at_level(logging.WARNING, logger="retention.corpus"):
        hp = MemitHParams(layers=[0], mom2_corpus=[HUB, "wikitext2", "builtin"])
    assert hp.mom2_corpus == "builtin" and hp.to_dict()["mom2_corpus"] == "builtin"
    assert hp.covariance_spec().corpus == "builtin"
    assert "mom2_corpus: using 'builtin'; skipped" in caplog.text
    # off, the corpus is not read, so not checked
    assert RomeHParams(mom2_adjustment=False, mom2_corpus=["wikitext2"]).mom2_corpus == ["wikitext2"]
    with pytest.raises(CorpusUnavailableError, match="mom2_corpus: no corpus"):
        RomeHParams(mom2_corpus="wikitext2")


def test_a_fallback_list_in_a_yaml_file_is_anchored_to_the_file(tmp_path):
    (tmp_path / "corpus.txt").write_text("text", encoding="utf-8")
    (tmp_path / "rome.yaml").write_text("mom2_corpus: [missing.txt, corpus.txt, builtin]\n", encoding="utf-8")
    assert RomeHParams.from_yaml(tmp_path / "rome.yaml").mom2_corpus == str(tmp_path / "corpus.txt")
    with pytest.raises(ValueError, match="mom2_corpus"):
        RomeHParams.from_dict({"mom2_corpus": [1]})


@pytest.mark.parametrize("editor, model", LARGE)
def test_large_presets_try_wikipedia_then_wikitext2_then_builtin(no_data, monkeypatch, caplog, editor, model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="retention.corpus"):
        hp = editor_hparams(editor, None, model)
    assert hp.mom2_corpus == "builtin" and hp.mom2_samples == 100000
    assert f"using 'builtin'; skipped {HUB!r}" in caplog.text and "'wikitext2' (" in caplog.text


def test_a_preset_whose_corpus_is_missing_fails_before_any_model_is_loaded(tmp_path, no_data, monkeypatch):
    import retention.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the corpus was checked")

    monkeypatch.setattr(retention.models, "load_model", no_loading)
    monkeypatch.setattr("retention.commands.edit.load_model", no_loading)
    with pytest.raises(CorpusUnavailableError, match=r"mom2_corpus: .*'wikitext2' \(.*fix: export RETENTION_DATA="):
        editor_hparams("rome", None, "smollm2-135m")  # what `retention fit` checks (ApplyEdits.editor_layers)
    # overriding the corpus (or turning the statistics off) is the fix, so the preset's own is not checked first
    assert editor_hparams("rome", {"mom2_corpus": "builtin"}, "smollm2-135m").mom2_corpus == "builtin"
    assert editor_hparams("rome", None, "smollm2-135m", mom2_adjustment=False).mom2_corpus == "wikitext2"

    from retention.commands.edit import EditArgs, run
    from retention.commands.options import UsageError

    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"case_id": "1", "subject": "Paris", "prompt": "{} is the capital of",
                                  "relation": "P1376", "target_new": "Italy", "target_true": "France"}]))
    with pytest.raises(UsageError, match="--hparams/--set: mom2_corpus: no corpus it names can be read here"):
        run(EditArgs(model="tiny-llama", editor="rome", hparams="smollm2-135m", data=str(facts), n=1,
                     select_known="none", out=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "scores.json").exists()
