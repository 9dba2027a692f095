"""Downstream task data: readers on the real files, built-in defaults, tokenisation, filtering, evaluators,
the DataModule."""

from __future__ import annotations

import codecs
import json
import logging
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import DATA
from torch import nn

from retention.data.datamodule import TaskDataModule, val_sampler
from retention.data.tasks import (
    Collator,
    SupervisedExample,
    TaskConfig,
    TextExample,
    build_task,
    classify,
    extract_final_number,
    filter_mentions,
    gsm8k_accuracy,
    instruct,
    load_examples,
    math_problems,
    read_examples,
    split_validation,
)
from retention.data.tasks.examples import encode_supervised, format_prompt, pack_text
from retention.prose import builtin_prose, paragraphs
from retention.records import KnowledgeRecord, RecordError

WIKITEXT = DATA / "wikitext" / "wiki.test.raw"
ALPACA = DATA / "alpaca" / "alpaca_data_1k.json"
GSM8K = DATA / "gsm8k" / "test.jsonl"
SST2 = DATA / "sst2" / "dev.tsv"


def needs(path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} absent (the shared real datasets)")


@pytest.fixture(scope="module")
def tok():
    from retention.models import default_tokenizer

    return default_tokenizer()


def _config(**kwargs) -> TaskConfig:
    return TaskConfig(**{k: str(v) if k == "source" else v for k, v in kwargs.items()})


# -- readers on the real files ------------------------------------------------------------------------


@needs(WIKITEXT)
def test_wikitext_raw_crlf_paragraphs():
    passages = load_examples(_config(family="text", source=WIKITEXT))
    assert len(passages) == 2891  # one paragraph or heading per CRLF line
    assert passages[0] == TextExample("= Robert Boulter =")
    assert passages[1].text.startswith("Robert Boulter is an English film , television and theatre actor .")
    assert not any("\r" in p.text or p.text != p.text.strip() for p in passages)


@needs(ALPACA)
def test_alpaca_instruction_input_output():
    examples = load_examples(_config(family="instruct", source=ALPACA))
    assert len(examples) == 1000
    assert examples[1] == SupervisedExample(
        "Rewrite the following sentence to use a passive voice instead.\n\nThe president delivered a speech yesterday.",
        "A speech was delivered by the president yesterday.",
    )
    assert examples[0].prompt.startswith("Re-write the following sentence") and "\n\n" not in examples[0].prompt


@needs(GSM8K)
def test_gsm8k_question_answer():
    examples = load_examples(_config(family="math", source=GSM8K))
    assert len(examples) == 1319
    first = examples[0]
    assert first.prompt.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.response == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer\u2019s market.\n#### 18"
    )  # calculator annotations <<...>> removed
    assert extract_final_number(first.answer) == "18"
    assert all(extract_final_number(ex.answer) is not None and "<<" not in ex.response for ex in examples)


@needs(SST2)
def test_sst2_dev_label_first_with_header():
    examples = load_examples(_config(family="classify", source=SST2))
    assert len(examples) == 872
    assert examples[0].prompt.endswith("\n\none long string of cliches .")
    assert examples[0].response == examples[0].answer == "negative"
    counts = {label: sum(ex.answer == label for ex in examples) for label in ("negative", "positive")}
    assert counts == {"negative": 428, "positive": 444}


@pytest.mark.parametrize("layout", ["label_first_header", "text_first_header", "label_first", "text_first"])
def test_sst2_either_column_order(tmp_path, layout):
    rows = [("a gorgeous , witty , seductive movie .", "1"), ("the acting is dreadful .", "0"), ("it 's \"fine\"", "1")]
    label_first = layout.startswith("label_first")
    lines = [f"{lab}\t{text}" if label_first else f"{text}\t{lab}" for text, lab in rows]
    if layout.endswith("header"):
        lines.insert(0, "label\tsentence" if label_first else "sentence\tlabel")
    path = tmp_path / "data.tsv"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    examples = load_examples(_config(family="classify", source=path))
    assert [(ex.prompt.rsplit("\n\n", 1)[1], ex.answer) for ex in examples] == [
        ("a gorgeous , witty , seductive movie .", "positive"), ("the acting is dreadful .", "negative"),
        ("it 's \"fine\"", "positive"),
    ]


def test_classify_generic_mapping_and_string_labels(tmp_path):
    path = tmp_path / "spam.jsonl"
    path.write_text("\n".join(json.dumps({"body": b, "kind": k}) for b, k in [("win money now", "spam"), ("lunch?", "ham")]))
    cfg = _config(family="classify", source=path, fields={"text": "body", "label": "kind"},
                  prompt_template="Is this message spam or ham?\n{text}")
    examples = load_examples(cfg)
    assert [(ex.prompt, ex.answer) for ex in examples] == [
        ("Is this message spam or ham?\nwin money now", "spam"), ("Is this message spam or ham?\nlunch?", "ham")
    ]


def test_text_jsonl_records_are_documents(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"content": "First document."}\n\n{"content": ""}\n{"content": "Second document."}\n')
    passages = load_examples(_config(family="text", source=path, fields={"text": "content"}))
    assert [p.text for p in passages] == ["First document.", "Second document."]
    assert passages[0].document != passages[1].document


# -- malformed input ----------------------------------------------------------------------------------


def test_errors_name_file_record_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q?", "answer": "42\\n#### 42"}\n{"question": "q2?"}\n')
    with pytest.raises(RecordError, match=r"bad\.jsonl: record line 2: field 'answer': missing"):
        load_examples(_config(family="math", source=path))
    path.write_text('{"question": "q?", "answer": "no final line"}\n')
    with pytest.raises(RecordError, match=r"line 1: field 'answer': expected a final line '#### <number>'"):
        load_examples(_config(family="math", source=path))
    path.write_text('{"question": "q?",\n')
    with pytest.raises(RecordError, match=r"line 1: field '<json>': invalid JSON"):
        load_examples(_config(family="math", source=path))
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("label\tsentence\n7\tsome text\n")
    with pytest.raises(RecordError, match=r"labels\.tsv: record line 2: field 'label': label '7' has no verbaliser"):
        load_examples(_config(family="classify", source=tsv))
    tsv.write_text("one\ttwo\nthree\tfour\n")
    with pytest.raises(ValueError, match="cannot tell the label column"):
        load_examples(_config(family="classify", source=tsv))
    with pytest.raises(FileNotFoundError, match="nope.json does not exist.*builtin.*hf:"):
        load_examples(_config(family="instruct", source=tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=r"task\.fields: unknown field\(s\) sentence for the math family"):
        TaskConfig(family="math", fields={"sentence": "x"})


def test_classify_tsv_wrong_columns_and_label_kind_are_errors(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("sentence\tlabel\na good film\t1\na bad film\t0\na film\twith a tab\t1\nfine acting\tpos\n")
    with pytest.raises(RecordError, match=r"bad\.tsv: record line 4: field '<row>': expected 2 tab-separated columns"):
        load_examples(_config(family="classify", source=path))
    examples, report = read_examples(_config(family="classify", source=path, on_error="skip"))
    assert [ex.answer for ex in examples] == ["positive", "negative"]  # no 'with a tab' or 'pos' class
    assert [(e.record, e.field_name) for e in report.errors] == [("line 4", "<row>"), ("line 5", "label")]
    assert "label 'pos' is a word, but the labels of this source are integers (2 of 3)" in str(report.errors[1])


@pytest.mark.parametrize(
    "name,content,location,field,message",
    [
        ("h.tsv", "label\tsentence\n0\tbad\n1\tgood\n1.0\tfine\n", "line 4", "label", "'1.0' is a number"),
        ("n.tsv", "bad film\t0\ngood film\t1\nfine\tfilm\t1\n", "line 3", "<row>", "columns (text and label), got 3"),
        ("n.tsv", "bad film\t0\ngood film\t1\nfine film\tpos\n", "line 3", "label", "'pos' is a word"),
        ("i.jsonl", [("a", 0), ("b", 1), ("c", "pos")], "line 3", "label", "'pos' is a word, but the labels of this "
         "source are integers"),
        ("i.jsonl", [("a", 0), ("b", 1), ("c", True)], "line 3", "label", "True is a bool"),
        ("w.jsonl", [("a", "spam"), ("b", "ham"), ("c", "spam"), ("d", "1")], "line 4", "label", "'1' is an integer, "
         "but the labels of this source are words"),
    ],
)
def test_classify_label_of_another_kind_is_an_error(tmp_path, name, content, location, field, message):
    path = tmp_path / name
    if isinstance(content, list):
        content = "\n".join(json.dumps({"text": text, "label": label}) for text, label in content)
    path.write_text(content)
    with pytest.raises(RecordError) as info:
        load_examples(_config(family="classify", source=path))
    assert (info.value.path, info.value.record, info.value.field_name) == (str(path), location, field)
    assert message in str(info.value)
    examples, report = read_examples(_config(family="classify", source=path, on_error="skip"))
    rows = [line for line in content.splitlines() if not line.startswith("label\t")]
    assert report.skipped == 1 and len(examples) == len(rows) - 1


@pytest.mark.parametrize(
    "family,name,good",
    [
        ("math", "d.jsonl", '{"question": "q?", "answer": "#### 1"}'),
        ("instruct", "d.json", '[{"instruction": "i", "output": "o"}]'),
        ("classify", "d.tsv", "label\tsentence\n1\tok"),
        ("text", "d.txt", "A passage."),
    ],
)
def test_task_files_accept_a_bom_and_name_the_file_of_bad_utf8(tmp_path, family, name, good):
    path = tmp_path / name
    path.write_bytes(good.encode())
    expected = load_examples(_config(family=family, source=path))
    path.write_bytes(codecs.BOM_UTF8 + good.encode())
    assert load_examples(_config(family=family, source=path)) == expected
    path.write_bytes(good.encode() + "\nlatin-1 caf\xe9".encode("latin-1"))
    at = len(good) + len("\nlatin-1 caf")
    match = rf"{name}: record line {good.count(chr(10)) + 2}: field '<file>': not UTF-8 text: byte {at} \(0xe9\)"
    with pytest.raises(RecordError, match=match):
        load_examples(_config(family=family, source=path, on_error="skip"))


def test_task_on_error_skip_counts_reports_and_logs(tmp_path, tok, caplog):
    lines = [json.dumps({"question": f"q{i}?", "answer": f"{i}\n#### {i}"}) for i in range(6)]
    lines.insert(0, "{not json")  # a bad first line is one bad record
    lines.insert(3, json.dumps({"question": "q?"}))
    lines.append(json.dumps({"question": "q?", "answer": "no number"}))
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(RecordError, match=r"gsm\.jsonl: record line 1: field '<json>': invalid JSON") as info:
        load_examples(_config(family="math", source=path))
    assert "task.on_error: skip" in "".join(info.value.__notes__)
    with caplog.at_level(logging.WARNING, logger="retention.data.tasks.task"):
        task = build_task(_config(family="math", source=path, on_error="skip"), tok)
    report = task.read_report
    assert (report.read, report.skipped, [e.record for e in report.errors]) == (6, 3, ["line 1", "line 4", "line 9"])
    assert len(task.train_examples) + len(task.val_examples) == 6
    assert "skipped 3 malformed" in caplog.text and "line 1: field '<json>'" in caplog.text
    with pytest.raises(ValueError, match="task.on_error: 'ignore'"):
        TaskConfig(on_error="ignore")


@pytest.mark.parametrize(
    "family,name,record,field",
    [
        ("instruct", "a.json", {"instruction": "Summarise.", "input": "word " * 112_000, "output": "ok"}, "input"),
        ("math", "g.jsonl", {"question": "word " * 112_000, "answer": "#### 1"}, "question"),
        ("classify", "s.jsonl", {"text": "word " * 112_000, "label": 1}, "text"),
    ],
)
def test_task_max_prompt_chars(tmp_path, family, name, record, field):
    path = tmp_path / name
    short = {k: "hi" if k == field else v for k, v in record.items()}
    records = [record, short]
    path.write_text(json.dumps(records) if name.endswith(".json") else "\n".join(map(json.dumps, records)))
    location = "record 0" if name.endswith(".json") else "record line 1"
    match = rf"{name}: {location}: field '{field}': 560,000 characters, more than max_prompt_chars=20,000"
    with pytest.raises(RecordError, match=match):
        load_examples(_config(family=family, source=path))
    examples, report = read_examples(_config(family=family, source=path, on_error="skip"))
    assert len(examples) == 1 and report.skipped == 1
    assert len(load_examples(_config(family=family, source=path, max_prompt_chars=600_000))) == 2


def test_hub_source_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError, installed or not
    with pytest.raises(ImportError, match="hf:wikitext needs the 'datasets' package"):
        load_examples(_config(family="text", source="hf:wikitext"))


# -- built-in defaults --------------------------------------------------------------------------------


def test_builtin_prose_is_real_deduplicated_prose():
    corpus = builtin_prose()
    assert len(corpus.encode()) >= 900_000
    paras = corpus.split("\n\n")
    assert len(paras) == len({p.lower() for p in paras})
    assert not any(p.lstrip().startswith(">>>") or "``" in p or ":func:" in p for p in paras)
    assert builtin_prose() == corpus  # cached, identical


def test_prose_cleaning_strips_code_doctests_and_markup():
    doc = (
        "Return the :func:`sorted` items of ``seq`` as a *new* list, keeping equal items in order.\n"
        "\n"
        "    for x in seq:\n        print(x)\n"
        "\n"
        "Example usage for the curious reader follows here:\n"
        ">>> sorted([3, 1])\n[1, 3]\n"
    )
    assert list(paragraphs(doc)) == [
        "Return the sorted items of seq as a new list, keeping equal items in order.",
    ]


def test_builtin_instructions_have_checkable_answers():
    examples = instruct.builtin_examples(200, seed=3)
    assert examples == instruct.builtin_examples(200, seed=3)
    assert len({ex.prompt.split("\n")[0].split()[0] for ex in examples}) >= 5  # several templates
    for ex in examples:
        if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", ex.prompt):
            assert int(ex.response) == int(m[1]) + int(m[2])
        elif ex.prompt.startswith("Reverse the letters"):
            assert ex.response == ex.prompt.rsplit("\n", 1)[1][::-1]
        elif ex.prompt.startswith("Sort these words"):
            assert ex.response.split(", ") == sorted(ex.prompt.rsplit("\n", 1)[1].split(", "))
        assert ex.response == ex.answer


def test_builtin_math_worked_answers_are_correct():
    examples = math_problems.builtin_examples(120, seed=1)
    for ex in examples:
        *steps, final = ex.response.split("\n")
        results = []
        for step in steps:
            expr, value = re.search(r"(\d+(?: [-+*/] \d+)+) = \$?(\d+)", step).groups()
            assert eval(expr) == int(value)  # noqa: S307 -- digits and operators only
            results.append(value)
        assert final == f"#### {results[-1]}" and extract_final_number(ex.answer) == results[-1]


def test_builtin_classify_is_seeded_and_balanced():
    pairs = classify.builtin_pairs(400, seed=0)
    assert pairs == classify.builtin_pairs(400, seed=0) and pairs != classify.builtin_pairs(400, seed=1)
    n_pos = sum(label == "positive" for _, label in pairs)
    assert 150 < n_pos < 250
    for text, label in pairs:
        positive_word = any(re.search(rf"\b{a}\b", text) for a in classify._POSITIVE)
        assert label == ("positive" if positive_word != (" not " in text) else "negative")


@pytest.mark.parametrize("family", ["text", "instruct", "math", "classify"])
def test_builtin_task_builds(family, tok):
    task = build_task(TaskConfig(family=family, limit=300 if family != "text" else 2000), tok)
    assert len(task.train) > 0 and len(task.val) > 0 and task.n_dropped == 0
    batch = task.collate([task.train[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


# -- tokenisation -------------------------------------------------------------------------------------


def test_packing_blocks_labels_and_separators(tok):
    examples = [TextExample("Alpha beta gamma.", 0), TextExample("Delta epsilon.", 0), TextExample("Zeta eta.", 1)]
    stream = (tok("Alpha beta gamma.", add_special_tokens=False)["input_ids"] + tok("\n\n", add_special_tokens=False)["input_ids"]
              + tok("Delta epsilon.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
              + tok("Zeta eta.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    blocks = pack_text(tok, examples, block_size=4)
    assert len(blocks) == len(stream) // 4
    assert torch.cat([b["input_ids"] for b in blocks]).tolist() == stream[: 4 * len(blocks)]
    assert all(torch.equal(b["input_ids"], b["labels"]) and len(b["input_ids"]) == 4 for b in blocks)


@needs(WIKITEXT)
def test_wikitext_packs_into_100_token_blocks(tok):
    task = build_task(_config(family="text", source=WIKITEXT, limit=400), tok)
    assert {len(item["input_ids"]) for item in task.train.items} == {100}
    assert task.train.num_tokens == 100 * len(task.train)


@pytest.mark.parametrize("chat", [True, False])
def test_response_masking_and_eos(tok, chat):
    ex = SupervisedExample("What is 2 plus 3?", "5")
    [item] = encode_supervised(tok, [ex], max_length=512, chat_template=chat)
    ids, labels = item["input_ids"], item["labels"]
    n_prompt = len(tok(format_prompt(tok, ex.prompt, chat))["input_ids"])
    assert (labels[:n_prompt] == -100).all()
    assert labels[n_prompt:].tolist() == ids[n_prompt:].tolist() == tok("5")["input_ids"] + [tok.eos_token_id]
    text = tok.decode(ids)
    assert ("<|im_start|>user" in text) == chat and ("### Instruction:" in text) != chat


def test_truncation_keeps_response_tokens(tok):
    ex = SupervisedExample("word " * 300, "the answer is here")
    [item] = encode_supervised(tok, [ex], max_length=32)
    assert len(item["input_ids"]) == 32
    n_resp = len(tok("the answer is here")["input_ids"]) + 1
    assert (item["labels"] != -100).sum() == n_resp


def test_collator_right_pads_with_masked_labels():
    batch = Collator(pad_id=0)([
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# -- edit-irrelevant filtering ------------------------------------------------------------------------


def _records() -> list[KnowledgeRecord]:
    return [
        KnowledgeRecord("1", "Eiffel Tower", "{} is located in", "P131", "Rome", "Paris"),
        KnowledgeRecord("2", "Danielle Darrieux", "The mother tongue of {} is", "P103", "English", "French"),
        KnowledgeRecord("3", "U.S. Route 66", "{} is in", "P17", "C++", "America"),
    ]


def _terms(records):
    return [t for r in records for t in (r.subject, r.target_new, r.target_true)]


def test_filter_mentions_whole_words_case_and_punctuation():
    texts = {
        "We lived in Paris.": True,
        "A Parisian cafe on the corner.": False,
        "the eiffel\n  tower at night": True,
        "Eiffel towers are not a thing": False,
        "She spoke french at home.": True,
        "Frenchman is one word.": False,
        "Driving along u.s. route 66 today": True,
        "Routes 66 and 67": False,
        "Written in C++, fast.": True,
        "Written in C, fast.": False,
        "Romeo and Juliet": False,
    }
    examples = [SupervisedExample(t, "ok") for t in texts] + [TextExample("The road to Rome.")]
    kept, n_dropped = filter_mentions(examples, _terms(_records()))
    assert n_dropped == sum(texts.values()) + 1
    assert [ex.prompt for ex in kept] == [t for t, drop in texts.items() if not drop]
    assert filter_mentions(examples, []) == (examples, 0)


def test_response_mentions_are_filtered_too():
    kept, n = filter_mentions([SupervisedExample("Where is it?", "It is in Paris.")], ["paris"])
    assert (kept, n) == ([], 1)


@needs(WIKITEXT)
def test_build_task_drops_wikitext_passages_that_mention_subjects(tok):
    records = [KnowledgeRecord("1", "Robert Boulter", "{} is a", "P106", "singer", "actor")]
    terms = [records[0].subject, records[0].target_new]
    cfg = _config(family="text", source=WIKITEXT, limit=300)
    passages = load_examples(cfg)
    mentions = re.compile(r"\bRobert Boulter\b|\bsinger\b", re.IGNORECASE)
    expected = sum(bool(mentions.search(p.text)) for p in passages)
    task = build_task(cfg, tok, exclude_terms=terms)
    assert task.n_dropped == expected >= 3
    assert not any(mentions.search(p.text) for p in task.train_examples + task.val_examples)
    decoded = tok.decode(torch.cat([item["input_ids"] for item in task.train.items]))
    assert "Robert Boulter" not in decoded


def test_split_validation_is_seeded_and_disjoint():
    items = list(range(50))
    train, val = split_validation(items, 0.2, seed=7)
    assert (train, val) == split_validation(items, 0.2, seed=7) and val != split_validation(items, 0.2, seed=8)[1]
    assert len(val) == 10 and sorted(train + val) == items and train == sorted(train)
    assert len(split_validation(items[:3], 0.1, seed=0)[1]) == 1
    assert split_validation(items, 0.0, seed=0) == (items, [])


# -- evaluators ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, number", [
    ("so she has 5 + 3 = 8 apples.\n#### 8", "8"),
    ("#### 1,000", "1000"),
    ("The total is $18.00.", "18"),
    ("It costs 3.50 dollars, then 2.25 more", "2.25"),
    ("A change of -7 degrees", "-7"),
    ("5-3=2", "2"),
    ("#### 12 because 4 * 3 = 12 ... and 99", "12"),
    ("no numbers here", None),
    ("Answer: 42.", "42"),
])
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


def test_gsm8k_accuracy_is_final_number_match():
    golds = ["... #### 18", "... #### 3", "... #### 1,200"]
    assert gsm8k_accuracy(["so the answer is 18", "#### 4", "She pays $1200 in total."], golds) == pytest.approx(2 / 3)


class _CannedGenerator(nn.Module):
    """Answers each question with a canned solution (looked up in the decoded prompt), like ``generate``."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            answer = next(a for q, a in self.answers.items() if q in prompt)
            rows.append(ids.tolist() + self.tokenizer(answer)["input_ids"][:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_math_evaluator_on_known_answers(tok):
    examples = math_problems.builtin_examples(6, seed=0)
    canned = {ex.prompt: ex.response if i % 3 else "I think it is 12345." for i, ex in enumerate(examples)}
    task_acc = math_problems.evaluate(_CannedGenerator(tok, canned), tok, examples, batch_size=4)
    assert task_acc == {"accuracy": pytest.approx(4 / 6)}


def test_math_evaluator_batched_equals_single(tiny_llama):
    model, tok = tiny_llama
    examples = math_problems.builtin_examples(5, seed=2)
    a = math_problems.evaluate(model, tok, examples, batch_size=5, max_new_tokens=6)
    b = math_problems.evaluate(model, tok, examples, batch_size=1, max_new_tokens=6)
    assert a == b and 0 <= a["accuracy"] <= 1


class _KeywordLM(nn.Module):
    """A causal LM whose label log-likelihoods we control: once the token " zebra" has been read, the tokens of
    "positive" get logit +10, else the tokens of "negative" do. Exposes the transformers interface the batched
    scorer uses (``base_model(...).last_hidden_state``, ``get_output_embeddings()``)."""

    def __init__(self, tok):
        super().__init__()
        self.trigger = tok(" zebra", add_special_tokens=False)["input_ids"][0]
        self.head = nn.Linear(2, len(tok), bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[tok("positive", add_special_tokens=False)["input_ids"], 1] = 10.0
            self.head.weight[tok("negative", add_special_tokens=False)["input_ids"], 0] = 10.0

    @property
    def base_model(self):
        return self._hidden

    def _hidden(self, input_ids, attention_mask=None):
        seen = (input_ids == self.trigger).long().cummax(dim=1).values.float()
        return SimpleNamespace(last_hidden_state=torch.stack([1 - seen, seen], dim=-1))

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self._hidden(input_ids).last_hidden_state))


def test_classify_evaluator_on_known_answers(tok):
    texts = ["I saw a zebra today.", "Nothing to see here.", "A zebra again!", "Just a horse.", "zebra zebra"]
    truth = ["positive", "negative", "positive", "negative", "positive"]
    labels = ["negative", "positive"]
    examples = [classify.classification_example(t, lab, labels, classify.DEFAULT_PROMPT) for t, lab in zip(texts, truth)]
    model = _KeywordLM(tok)
    assert classify.evaluate(model, tok, examples, batch_size=2) == {"accuracy": 1.0}
    flipped = [classify.classification_example(t, lab, labels, classify.DEFAULT_PROMPT)
               for t, lab in zip(texts, ["negative"] * 5)]
    assert classify.evaluate(model, tok, flipped, batch_size=3, labels=labels) == {"accuracy": pytest.approx(2 / 5)}


@torch.no_grad()
def test_classify_evaluator_matches_unpadded_reference(tiny_llama):
    from retention.data.tasks.examples import encode_prompt, encode_response

    model, tok = tiny_llama
    labels = ["negative", "positive"]
    texts = [t for t, _ in classify.builtin_pairs(5, seed=4)]

    def loglik(ex, label):  # one unpadded forward per (example, label)
        p, r = encode_prompt(tok, format_prompt(tok, ex.prompt)), encode_response(tok, label)
        logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(r)[:, None]).sum().item()

    probe = [classify.classification_example(t, "negative", labels, classify.DEFAULT_PROMPT) for t in texts]
    preferred = [max(labels, key=lambda lab, ex=ex: loglik(ex, lab)) for ex in probe]
    agree = [classify.classification_example(t, lab, labels, classify.DEFAULT_PROMPT) for t, lab in zip(texts, preferred)]
    assert classify.evaluate(model, tok, agree, batch_size=2, labels=labels) == {"accuracy": 1.0}


@needs(SST2)
def test_task_evaluate_uses_validation_examples(tiny_llama):
    model, tok = tiny_llama
    task = build_task(_config(family="classify", source=SST2, limit=60), tok)
    result = task.evaluate(model, tok, n=4, batch_size=2)
    assert set(result) == {"accuracy"} and result["accuracy"] in (0, 0.25, 0.5, 0.75, 1)
    assert build_task(TaskConfig(family="instruct", limit=20), tok).evaluate(model, tok) == {}


# -- DataModule ---------------------------------------------------------------------------------------


def test_datamodule_loaders_and_late_exclude_terms(tok):
    dm = TaskDataModule(TaskConfig(family="classify", limit=200), tokenizer=tok, batch_size=4, eval_batch_size=8)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.task.n_dropped == 0
    dm.exclude_terms = ["film", "hotel"]  # set after setup, as ApplyEdits does: the loaders apply them
    batch = next(iter(dm.train_dataloader()))
    assert dm.task.n_dropped > 0
    assert batch["input_ids"].shape[0] == 4 and set(batch) == {"input_ids", "attention_mask", "labels"}
    assert sum(b["input_ids"].shape[0] for b in dm.val_dataloader()) == len(dm.task.val)
    first = [b["input_ids"].tolist() for b in dm.train_dataloader()][:3]
    assert first == [b["input_ids"].tolist() for b in dm.train_dataloader()][:3]  # seeded shuffle
    assert not any(re.search(r"\b(film|hotel)\b", ex.prompt, re.IGNORECASE) for ex in dm.task.train_examples)


@pytest.mark.parametrize("n, world", [(5, 2), (7, 3), (4, 4)])
def test_val_sampler_never_repeats_across_ranks(n, world):
    dataset = list(range(n))
    seen = [i for rank in range(world) for i in val_sampler(dataset, world, rank)]
    assert sorted(seen) == dataset
    with pytest.raises(ValueError, match="validation split has 1 items for 2 ranks"):
        val_sampler([0], 2, 0)


def test_datamodule_val_loaders_shard_without_repeats_under_ddp(tok):
    dm = TaskDataModule(TaskConfig(family="instruct", limit=55, val_fraction=0.2), tokenizer=tok, eval_batch_size=4)
    dm.setup("fit")
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        seen += [tuple(row[mask.bool()].tolist()) for batch in dm.val_dataloader()
                 for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        assert len(dm.train_dataloader().sampler) == 22  # 44 training items over 2 ranks
    assert sorted(seen) == sorted(tuple(item["input_ids"].tolist()) for item in dm.task.val.items)
    assert len(seen) == 11
