import math

import pytest

from retention.records import Probe
from retention.scoring import score_probes, score_probes_unbatched, target_ids

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
