"""The architectures users edit, on CPU: GPT-2 XL, GPT-J-6B, Llama-3-8B, Llama-3.2-1B, Qwen2.5-7B, Mistral-7B.

Each is its published configuration, written out below as a transformers config (the facts of the models'
config.json files; the parameter counts are the published ones), with random weights, built two ways:

- **published**: every layer and the published vocabulary, on the meta device (no memory, no compute): the
  adapter's modules and their shapes, the LoRA/DoRA targets, and the shipped presets (their layers exist and
  name existing modules).
- **narrow**: 2 layers, run for real. Exact: the model class and block layout (GPT-J's parallel
  attention and MLP), the head size, the ratio of query to key/value heads, the rotary settings (theta, Llama
  3.2's ``llama3`` scaling, GPT-J's 64 rotary dimensions of 256), the biases (Qwen2's q/k/v, GPT-J's head),
  norms, activation, tying and Mistral's sliding window. Cut: the number of heads (so the hidden size) by a
  per-architecture factor, the MLP width to 768 and the vocabulary to 1,024 (a byte-level BPE trained here;
  the published tokenizers are not on this machine). At the published widths the key covariance that
  ROME, MEMIT and AlphaEdit factor is MLP width² float64 (1.6 GB at 14,336), and AlphaEdit's
  eigendecomposition of it grows with the cube of the width (58 s at 4,736 on this 2-core CPU; 30 times that
  at 14,336), for each architecture and editor.

Llama-3-8B is also built at its published widths (2 layers, the vocabulary cut; 1.75 GB): one ROME edit with
C = I and scoring.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from editing_models import same_state, state
from lightning.pytorch import Trainer
from memit_cases import REQUESTS, WORDS, write_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from bench.reference import score_probes_unbatched
from retention.arch import ArchAdapter, out_of_range
from retention.editing.alphaedit import AlphaEditEditor, AlphaEditHParams
from retention.editing.base import PRESETS, EditRequest
from retention.editing.covariance import CovarianceSpec, _windows, corpus_text
from retention.editing.ft import FtEditor, FtHParams
from retention.editing.memit import MemitEditor, MemitHParams
from retention.editing.registry import EDITORS, editor_hparams
from retention.editing.rome import RomeEditor, RomeHParams
from retention.editing.trace import capture
from retention.modules.finetune import AdapterArgs, FineTuneModule, OptimizerArgs
from retention.records import Probe
from retention.scoring import PROTOCOLS, score_probes

LLAMA_BLOCK = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MLP_WIDTH = 768
VOCAB = 1024


@dataclass(frozen=True)
class Arch:
    name: str
    """The preset name (``retention/resources/editors/<editor>/<name>.yaml``)."""
    config: Callable[[], PretrainedConfig]
    parameters: int
    """The published parameter count (tied embeddings counted once)."""
    linears: frozenset[str]
    """The projections of a decoder layer: LoRA/DoRA's default targets."""
    narrow_heads: int
    """Query heads of the narrow build; key/value heads are cut by the same factor."""
    bos: bool
    """Whether the model's tokenizer starts a prompt with BOS."""

    def __str__(self) -> str:
        return self.name


ARCHS = [
    Arch("gpt2-xl", lambda: GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=50256,
        eos_token_id=50256),
        1_557_611_200, frozenset({"c_attn", "c_proj", "c_fc"}), 5, False),
    Arch("gpt-j-6b", lambda: GPTJConfig(
        vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        bos_token_id=50256, eos_token_id=50256),
        6_050_882_784, frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}), 2, False),
    Arch("llama-3-8b", lambda: LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001),
        8_030_261_248, frozenset(LLAMA_BLOCK), 4, True),
    Arch("llama-3.2-1b", lambda: LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
        1_235_814_400, frozenset(LLAMA_BLOCK), 4, True),
    Arch("qwen2.5-7b", lambda: Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
        max_window_layers=28, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
        7_615_616_512, frozenset(LLAMA_BLOCK), 7, False),
    Arch("mistral-7b-v0.1", lambda: MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        7_241_732_096, frozenset(LLAMA_BLOCK), 4, True),
]
SMALL_PRESETS = {"smollm2-135m", "tiny-llama", "tiny-gpt2"}


def _mlp_key(config: PretrainedConfig) -> str:
    return "n_inner" if config.model_type in ("gpt2", "gptj") else "intermediate_size"


def _published(arch: Arch):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(arch.config())


def _tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``VOCAB`` or fewer tokens, trained on the test texts; with ``bos``, prompts start
    with BOS (as Llama's and Mistral's tokenizers do)."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    texts += [r.prompt.format(r.subject) + " " + r.target_new for r in REQUESTS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<eos>")
    fast.padding_side = "right"
    return fast


def _narrow(arch: Arch, narrow: bool = True):
    """(model, tokenizer): the narrow build (module docstring), seeded; ``narrow=False``: the published widths
    at the narrow build's depth and vocabulary."""
    published = arch.config()
    data = published.to_dict()
    data.pop("layer_types", None)  # derived from the depth
    data[published.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = 2
    if narrow:
        factor = published.num_attention_heads // arch.narrow_heads
        named = {"num_attention_heads": arch.narrow_heads, "hidden_size": published.hidden_size // factor}
        for attr, value in named.items():
            data[published.attribute_map.get(attr, attr)] = value
        if "num_key_value_heads" in data:
            data["num_key_value_heads"] = published.num_key_value_heads // factor
        data[_mlp_key(published)] = MLP_WIDTH
    tokenizer = _tokenizer(arch.bos)
    data.update(vocab_size=VOCAB, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(type(published).from_dict(data)).eval()
    return model, tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a busy 2-core machine a second thread's spinning made these tests up to ten times slower (the narrow
    # models' matmuls are too small to gain from it anyway).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=ARCHS, ids=str)
def narrow(request):
    return request.param, *_narrow(request.param)


def _facts(model, tokenizer) -> list[EditRequest]:
    """Three subject-last facts, each pointed at the object the model does not prefer yet under ``prob``."""
    candidates = [EditRequest(r.case_id, r.subject, r.prompt, r.target_new, REQUESTS[(i + 8) % 16].target_new)
                  for i, r in enumerate(REQUESTS[:3])]
    results = score_probes(model, tokenizer, [_probe(r) for r in candidates], ("prob",))
    return [EditRequest(r.case_id, r.subject, r.prompt, r.target_true, r.target_new) if res.passed["prob"]
            else r for r, res in zip(candidates, results)]


def _probe(req: EditRequest) -> Probe:
    return Probe(req.rewrite_prompt, req.target_new, req.target_true)


def _flipped(model, tokenizer, facts) -> list[bool]:
    return [r.passed["prob"] for r in score_probes(model, tokenizer, [_probe(f) for f in facts], ("prob",))]


def _wrapped(model) -> set[str]:
    """The names of the modules holding LoRA/DoRA adapters."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}


# -- the published configurations ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_published_shapes_lora_targets_and_presets(arch, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the presets' hub corpus: no network check
    model = _published(arch)
    config = model.config
    assert sum(p.numel() for p in model.parameters()) == arch.parameters
    adapter = ArchAdapter.for_model(model)
    hidden, mlp = config.hidden_size, getattr(config, _mlp_key(config)) or 4 * config.hidden_size
    assert adapter.num_layers == config.num_hidden_layers and adapter.hidden_size == hidden
    last = adapter.num_layers - 1
    assert adapter.weight_to_out_in(adapter.mlp_out_weight(last)).shape == (hidden, mlp)
    assert adapter.key_size(last) == mlp
    assert adapter.embed.weight.shape == (config.vocab_size, hidden)
    assert adapter.lm_head.weight.shape == (config.vocab_size, hidden)
    assert (adapter.lm_head.weight is adapter.embed.weight) == config.tie_word_embeddings
    assert (adapter.lm_head.bias is not None) == (config.model_type == "gptj")
    assert hasattr(adapter.layer(last), "ln_2") == (config.model_type == "gpt2")  # GPT-J: attention || MLP
    assert adapter.final_norm.weight.shape == (hidden,)
    if config.model_type != "gpt2":  # GPT-2 fuses q, k and v (c_attn)
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        attn = adapter.attn(last)
        assert attn.q_proj.weight.shape == (config.num_attention_heads * head_dim, hidden)
        assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (kv_heads * head_dim, hidden)
        assert (attn.q_proj.bias is not None) == (config.model_type == "qwen2")

    for method in ("lora", "dora"):
        module = FineTuneModule.from_model(_published(arch), None, adapter=AdapterArgs(method=method, rank=8))
        module.configure_model()
        assert _wrapped(module.model) == arch.linears, method
        a = ArchAdapter.for_model(module.model)
        assert a.mlp_out(last).lora_A["default"].weight.shape == (8, mlp)
        assert a.mlp_out(last).lora_B["default"].weight.shape == (hidden, 8)
        assert ("default" in a.mlp_out(last).lora_magnitude_vector) == (method == "dora")

    modules = dict(model.named_modules())
    checked = 0
    for editor in EDITORS:
        if not (PRESETS / editor / f"{arch.name}.yaml").is_file():
            continue
        hp = editor_hparams(editor, arch.name)
        layers = [hp.layer] if editor in ("rome", "grace", "wise") else hp.layers
        assert not out_of_range(layers, adapter.num_layers), (editor, layers)
        assert all(adapter.mlp_out_name(i) in modules for i in layers)
        checked += 1
    assert checked >= (3 if arch.name != "llama-3.2-1b" else 0)


def test_every_large_preset_has_its_architecture_here():
    names = {p.stem for p in PRESETS.glob("*/*.yaml")} - SMALL_PRESETS
    assert names <= {a.name for a in ARCHS}, names - {a.name for a in ARCHS}


def test_a_rome_edit_and_scoring_at_the_published_widths(tmp_path, monkeypatch):
    """Llama-3-8B's widths (4,096, MLP 14,336, 32 query and 8 key/value heads), 2 layers: one ROME edit with
    C = I (the key covariance would be 14,336² float64, 1.6 GB, and minutes to factor here), then scoring."""
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path))
    model, tokenizer = _narrow(next(a for a in ARCHS if a.name == "llama-3-8b"), narrow=False)
    adapter = ArchAdapter.for_model(model)
    assert adapter.mlp_out_weight(1).shape == (4096, 14336)
    assert adapter.attn(1).k_proj.weight.shape == (1024, 4096)
    fact = _facts(model, tokenizer)[:1]
    hp = RomeHParams(layer=1, v_steps=5, v_weight_decay=0.0, clamp_norm_factor=1e4, context_templates=[],
                     mom2_adjustment=False)
    editor = RomeEditor(hp)
    editor.prepare(model, tokenizer, fingerprint="published widths")  # not hashing 436M weights
    result = editor.edit(model, tokenizer, fact)
    delta = result.deltas[f"{adapter.mlp_out_name(1)}.weight"].double()
    # Rank one, seen through a random sketch of its columns (the full SVD of 4,096 x 14,336 takes half a minute).
    s = torch.linalg.svdvals(delta @ torch.randn(delta.shape[1], 4, dtype=torch.float64))
    assert s[1] < 1e-6 * s[0]
    result.apply(model)
    (scored,) = score_probes(model, tokenizer, [_probe(fact[0])], PROTOCOLS, max_new_tokens=4)
    assert scored.passed["prob"] and scored.generation is not None


# -- narrow builds: editing, scoring, fine-tuning ------------------------------------------------------------


def _hp(corpus, **kw) -> dict:
    """Random models have small activations: no weight decay, a loose clamp, a longer optimisation."""
    return {"context_templates": [[5, 1]], "v_weight_decay": 0.0, "clamp_norm_factor": 1e4, "v_steps": 10,
            "v_lr": 0.5, "mom2_corpus": str(corpus), "mom2_samples": 64, "mom2_max_length": 32, **kw}


def test_locate_then_edit_editors_land_a_batch(narrow, tmp_path, monkeypatch):
    arch, model, tokenizer = narrow
    monkeypatch.setenv("RETENTION_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path)
    adapter = ArchAdapter.for_model(model)
    saved = state(model)
    facts = _facts(model, tokenizer)
    assert not any(_flipped(model, tokenizer, facts))
    name = f"{adapter.mlp_out_name(1)}.weight"

    rome = RomeEditor(RomeHParams(**_hp(corpus, layer=1))).edit(model, tokenizer, facts)
    assert list(rome.deltas) == [name] and rome.deltas[name].shape == adapter.mlp_out_weight(1).shape
    s = torch.linalg.svdvals(rome.deltas[name].double())
    assert s[len(facts)] < 1e-6 * s[0]  # one rank-one update per fact
    memit = MemitEditor(MemitHParams(**_hp(corpus, layers=[0, 1], mom2_update_weight=10.0))).edit(
        model, tokenizer, facts)
    assert sorted(memit.deltas) == sorted(f"{adapter.mlp_out_name(i)}.weight" for i in (0, 1))
    for result in (rome, memit):
        assert same_state(model, saved)
        result.apply(model)
        assert all(_flipped(model, tokenizer, facts)), result.editor
        result.revert(model)

    # AlphaEdit: key statistics over 2 x 16 tokens span at most 32 of the 768 key dimensions; the update
    # leaves the outputs of those preserved keys where they were.
    spec = {"mom2_samples": 2, "mom2_max_length": 16}
    alpha = AlphaEditEditor(AlphaEditHParams(**_hp(corpus, layers=[1], **spec), nullspace_threshold=1e-6,
                                             relative_threshold=True)).edit(model, tokenizer, facts)
    assert MLP_WIDTH - 32 <= alpha.hparams["projector_ranks"][1] < MLP_WIDTH
    windows = _windows(tokenizer, corpus_text(str(corpus), 0)[0], CovarianceSpec(str(corpus), 2, 16))
    with torch.no_grad(), capture({"k": adapter.mlp_out(1)}, outputs=False) as rec:
        model(input_ids=windows)
    k0 = rec["k"].input.reshape(-1, MLP_WIDTH).double().T
    delta = adapter.weight_to_out_in(alpha.deltas[name]).double()
    assert (delta @ k0).norm() < 1e-6 * delta.norm() * k0.norm()
    alpha.apply(model)
    assert all(_flipped(model, tokenizer, facts))
    alpha.revert(model)
    assert same_state(model, saved)


def test_fine_tuning_editors_run(narrow):
    arch, model, tokenizer = narrow
    adapter = ArchAdapter.for_model(model)
    facts = _facts(model, tokenizer)
    ft_m = FtEditor(FtHParams(variant="ft-m", layers=[1], lr=1e-2, steps=30, norm_constraint=None)).edit(
        model, tokenizer, facts)
    losses = ft_m.diagnostics[0].losses
    assert losses[-1] < losses[0]
    assert ft_m.deltas[f"{adapter.mlp_out_name(1)}.weight"].shape == adapter.mlp_out_weight(1).shape
    eps = 2e-3
    ft_l = FtEditor(FtHParams(variant="ft-l", layers=[0, 1], lr=1e-2, steps=5, norm_constraint=eps)).edit(
        model, tokenizer, facts)
    assert sorted(ft_l.deltas) == sorted(f"{adapter.mlp_out_name(i)}.weight" for i in (0, 1))
    assert all(0 < d.abs().max() <= eps * (1 + 1e-6) for d in ft_l.deltas.values())


def test_batched_scoring_and_generation_match_one_probe_at_a_time(narrow):
    arch, model, tokenizer = narrow
    probes = [_probe(f) for f in _facts(model, tokenizer)] + [Probe("The city of Paris is", "known", "Rome")]
    batched = score_probes(model, tokenizer, probes, PROTOCOLS, max_new_tokens=4)
    single = score_probes_unbatched(model, tokenizer, probes, PROTOCOLS, max_new_tokens=4)
    for b, s in zip(batched, single):
        assert b.passed == s.passed and b.generation == s.generation is not None
        assert b.target_logprob == pytest.approx(s.target_logprob, abs=1e-4)
        assert b.alt_logprob == pytest.approx(s.alt_logprob, abs=1e-4)


def _batches(n: int = 4, length: int = 16) -> DataLoader:
    ids = torch.randint(2, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    items = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]
    return DataLoader(items, batch_size=n,
                      collate_fn=lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]})


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_one_lightning_step(narrow, method):
    arch, model, tokenizer = narrow
    saved = state(model)
    module = FineTuneModule.from_model(model, tokenizer, adapter=AdapterArgs(method=method, rank=4),
                                       optimizer=OptimizerArgs(lr=1e-3, schedule="constant"))
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    try:
        trainer.fit(module, train_dataloaders=_batches())
        assert trainer.global_step == 1 and module.train_tokens == 4 * 16
        if method == "full":
            assert not same_state(model, saved)
        else:
            assert _wrapped(module.model) == arch.linears
            trained = [p for n, p in module.model.named_parameters() if "lora_B" in n]
            assert trained and all(p.abs().sum() > 0 for p in trained)  # each B starts at zero
            module.model.unload()  # the shared model without its adapters
    finally:
        model.load_state_dict(saved)
        model.eval().requires_grad_(True)
    assert same_state(model, saved)
