import math

import pytest

from bench.reference import score_probes_unbatched
from retention.records import Probe
from retention.scoring import score_probes, target_ids

PROTOCOLS = ("top1", "prob", "token_acc", "gen")
PROBES = [
    Probe("The capital of France is", "Paris", "London"),
    Probe("The Eiffel Tower is located in the city of", "Paris", "Rome"),
    Probe("Danielle Darrieux's mother tongue is", "French", "English"),
    Probe("Toko Yasuda plays the", "guitar", "piano"),
    Probe("The official language of the United States of America is", "English", "Spanish Creole"),
    Probe("Apple A5 was created by", "Apple", "Google"),
    Probe("No alternative here:", "yes"),
]


def _check_equal(batched, reference):
    for b, r in zip(batched, reference):
        assert b.passed == r.passed
        assert b.target_logprob == pytest.approx(r.target_logprob, abs=1e-4)
        if not math.isnan(r.alt_logprob):
            assert b.alt_logprob == pytest.approx(r.alt_logprob, abs=1e-4)
        assert b.generation == r.generation and b.top1_token == r.top1_token


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_equals_unbatched(request, fixture, batch_size):
    model, tok = request.getfixturevalue(fixture)
    batched = score_probes(model, tok, PROBES, PROTOCOLS, batch_size=batch_size, max_new_tokens=4)
    _check_equal(batched, score_probes_unbatched(model, tok, PROBES, PROTOCOLS, max_new_tokens=4))
    assert "prob" not in batched[-1].passed  # no alternative, no prob outcome


def test_target_ids_have_leading_space_and_no_bos(tiny_llama):
    _, tok = tiny_llama
    ids = target_ids(tok, "Paris")
    assert ids == target_ids(tok, " Paris")
    assert tok.decode(ids) == " Paris"
    assert tok.bos_token_id not in ids


def test_unknown_protocol_is_named(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="unknown protocol.*bleu"):
        score_probes(model, tok, PROBES[:1], ("top1", "bleu"))


@pytest.mark.slow
def test_real_model_batched_equals_unbatched(real_model):
    model, tok = real_model
    batched = score_probes(model, tok, PROBES, PROTOCOLS, batch_size=4, max_new_tokens=6)
    _check_equal(batched, score_probes_unbatched(model, tok, PROBES, PROTOCOLS, max_new_tokens=6))
    assert batched[0].passed["top1"] and batched[0].passed["gen"] and batched[0].top1_token == " Paris"


LONG = Probe("Some words go on and on. " * 120 + "The capital of France is", "Paris", "London", "paraphrase", "7")
"""About 840 tokens: longer than the tiny models' 512 positions."""


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_a_prompt_longer_than_the_models_positions_is_cut_from_the_left_and_counted(request, fixture, caplog):
    """tiny-gpt2 used to fail with an IndexError (no position 512), tiny-llama to score past its 512 positions."""
    model, tok = request.getfixturevalue(fixture)
    n = len(tok(LONG.prompt)["input_ids"])
    assert n > 512
    with caplog.at_level("WARNING", logger="retention.scoring"):
        long, short = score_probes(model, tok, [LONG, PROBES[0]], PROTOCOLS, max_new_tokens=4)
    assert "1 of 2 probes are longer than the model's 512 positions" in caplog.text and "case 7" in caplog.text
    room = 512 - 4  # gen leaves room for max_new_tokens; prob needs the target's and the alternative's tokens
    assert long.prompt_cut == n - room and short.prompt_cut == 0
    assert long.to_dict()["prompt_cut"] == n - room and "prompt_cut" not in short.to_dict()
    kept = tok.decode(tok(LONG.prompt)["input_ids"][-room:])  # the tokenizer adds no BOS here
    assert tok(kept)["input_ids"] == tok(LONG.prompt)["input_ids"][-room:]
    (alone,) = score_probes(model, tok, [Probe(kept, "Paris", "London")], PROTOCOLS, max_new_tokens=4)
    assert alone.prompt_cut == 0
    assert long.target_logprob == pytest.approx(alone.target_logprob, abs=1e-4)
    assert long.passed == alone.passed and long.generation == alone.generation


def test_fit_prompt_keeps_bos_and_the_end():
    from retention.scoring import fit_prompt

    assert fit_prompt([1, 5, 6, 7, 8], 3, bos=1) == [1, 7, 8]
    assert fit_prompt([5, 6, 7, 8], 3, bos=1) == [6, 7, 8]
    assert fit_prompt([1, 5], 3, bos=1) == [1, 5]
