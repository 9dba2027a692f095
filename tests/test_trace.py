import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from retention.arch import ArchAdapter
from retention.editing.trace import (
    add_at,
    capture,
    layer_input,
    patch_outputs,
    start_at_layer,
    stop_after,
    subject_last_token_index,
    subject_token_span,
)


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: Metaspace ('▁' marks a space), BPE, a BOS token added to every input."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = ["The capital of France is Paris.", "Danielle Darrieux speaks French.", "Toko Yasuda plays guitar."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("which", ["bpe", "sentencepiece"])
@pytest.mark.parametrize(
    "template, subject",
    [("The capital of {} is", "France"), ("{} speaks", "Danielle Darrieux"), ("Asked about it, {} plays", "Toko Yasuda")],
)
def test_subject_span_is_the_subjects_tokens(tiny_llama, which, template, subject):
    tokenizer = tiny_llama[1] if which == "bpe" else _sentencepiece_like()
    ids = tokenizer(template.format(subject))["input_ids"]
    first, last = subject_token_span(tokenizer, template, subject)
    assert tokenizer.decode(ids[first : last + 1]).strip() == subject
    assert last == subject_last_token_index(tokenizer, template, subject)
    if which == "sentencepiece":
        assert ids[0] == tokenizer.bos_token_id and first >= 1


def test_subject_span_rejects_bad_templates(tiny_llama):
    with pytest.raises(ValueError, match="exactly one"):
        subject_token_span(tiny_llama[1], "no placeholder", "x")


def _batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "right"
    return enc["input_ids"], enc["attention_mask"]


def _qwen2_sliding():
    cfg = Qwen2Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                      max_window_layers=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2", "qwen2_sliding"])
@pytest.mark.parametrize("layer", [0, 1])
def test_cached_prefix_forward_equals_full_forward(request, tiny_llama, which, layer):
    tokenizer = tiny_llama[1]
    model = _qwen2_sliding() if which == "qwen2_sliding" else request.getfixturevalue(which)[0]
    ids, mask = _batch(tokenizer, ["The capital of France is", "Toko Yasuda, who plays the guitar,", "Hi"])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        hidden = layer_input(model, layer, ids, mask)
        with start_at_layer(model, layer, hidden):
            cached = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits  # the context restored every layer
    valid = mask.bool()
    assert torch.equal(cached[valid], full[valid])
    assert torch.equal(again, full)


def test_start_at_layer_checks_shape(tiny_llama):
    model, tokenizer = tiny_llama
    ids, mask = _batch(tokenizer, ["a b c", "d"])
    hidden = layer_input(model, 1, ids, mask)
    with pytest.raises(ValueError, match="cached layer-1 input"), start_at_layer(model, 1, hidden[:1]):
        model(input_ids=ids, attention_mask=mask)


def test_capture_and_stop_after(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    a = ArchAdapter.for_model(model)
    ids, mask = _batch(tokenizer, ["The capital of France is"])
    calls = []
    handle = a.final_norm.register_forward_hook(lambda *args: calls.append(1))
    try:
        with capture({"k": a.mlp_out(0)}) as rec, stop_after(a.mlp_out(0)):
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    assert not calls  # stopped before the final norm
    assert rec["k"].input.shape == (1, ids.shape[1], 4 * 64) and rec["k"].output.shape == (1, ids.shape[1], 64)
    expected = a.mlp_out(0)(rec["k"].input)
    assert torch.allclose(rec["k"].output, expected)


def test_patch_outputs_adds_at_positions_differentiably(tiny_llama):
    model, tokenizer = tiny_llama
    a = ArchAdapter.for_model(model)
    ids, mask = _batch(tokenizer, ["The capital of France is", "Paris is"])
    delta = torch.zeros(2, 64, requires_grad=True)
    rows, cols = torch.tensor([0, 1]), torch.tensor([3, 1])
    with capture({"out": a.mlp_out(1)}) as clean:
        model(input_ids=ids, attention_mask=mask)
    with patch_outputs({a.mlp_out(1): add_at(rows, cols, delta + torch.ones(2, 64))}), \
            capture({"out": a.mlp_out(1)}, inputs=False, detach=False) as patched:
        logits = model(input_ids=ids, attention_mask=mask).logits
    diff = patched["out"].output.detach() - clean["out"].output
    assert torch.allclose(diff[0, 3], torch.ones(64)) and torch.allclose(diff[1, 1], torch.ones(64))
    assert diff[0, :3].abs().max() == 0
    logits[0, 3].sum().backward()  # the last layer: only the patched position itself is affected
    assert delta.grad is not None and delta.grad[0].abs().sum() > 0
