"""Generation backends: static KV cache / torch.compile, the vLLM sampler, LoRA weight merging.

Everything runs on CPU with the tiny local Llama. vLLM cannot run here (no GPU), so its
sampler is checked against a stand-in `vllm` module that records what it is asked to do;
the output conversion and the weight-sync paths are ours and are exercised for real.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import CompileConfig

import resd.generation.hf as generation
from resd.config import ConfigError
from resd.generation.hf import (
    Generation,
    TransformersSampler,
    chat_prompt_ids,
    decode_options,
    generate,
)
from resd.generation.vllm_engine import VLLMSampler, merged_lora_weights
from resd.models import load_model, load_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama with larger random weights, so greedy text varies with the prompt.

    At the default init scale every position decodes to the same token, which would let
    a broken cache pass a token-for-token comparison.
    """
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model, tok


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok = tiny
    # different lengths in one batch: rows are left-padded by different amounts
    return [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 9, 4, 15)]


def _tokens(gens: list[Generation]) -> list[list[int]]:
    return [g.token_ids for g in gens]


COMMON = {"max_new_tokens": 12, "batch_size": 4, "autocast": "none"}


def test_decode_options_default_is_the_plain_call():
    assert decode_options(CPU, None, False) == {}  # default path: model.generate unchanged
    assert decode_options(CPU, "static", False) == {
        "cache_implementation": "static",
        "disable_compile": True,  # transformers would auto-compile a static cache on GPU
    }
    compiled = decode_options(CPU, "static", True)["compile_config"]
    assert compiled._compile_all_devices  # CPU only compiles when told to
    with pytest.raises(ValueError, match="compile=True needs cache_implementation='static'"):
        decode_options(CPU, None, True)
    with pytest.raises(ValueError, match="cache_implementation"):
        decode_options(CPU, "sliding", False)


def test_static_cache_greedy_matches_dynamic(tiny, prompts):
    model, tok = tiny
    dynamic = generate(model, tok, prompts, temperature=0.0, **COMMON)
    static = generate(model, tok, prompts, temperature=0.0, cache_implementation="static", **COMMON)
    assert len({tuple(t) for t in _tokens(dynamic)}) == len(prompts)  # the test can fail
    assert _tokens(static) == _tokens(dynamic)
    assert [g.finished for g in static] == [g.finished for g in dynamic]


def test_static_cache_seeded_sampling_matches_dynamic(tiny, prompts):
    model, tok = tiny
    kw = {"temperature": 1.0, "top_p": 0.9, "seeds": [11, 12, 13, 14], **COMMON}
    dynamic = generate(model, tok, prompts, **kw)
    static = generate(model, tok, prompts, cache_implementation="static", **kw)
    assert _tokens(static) == _tokens(dynamic)


def test_sampler_signature_and_static_cache(tiny, prompts):
    model, tok = tiny
    params = inspect.signature(TransformersSampler).parameters
    assert list(params) == ["model", "tokenizer", "batch_size", "autocast",
                            "cache_implementation", "compile", "grammar", "prefix_cache"]  # fmt: skip
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in list(params)[2:])
    assert (params["batch_size"].default, params["autocast"].default) == (8, "auto")
    assert (params["cache_implementation"].default, params["compile"].default) == (None, False)
    with pytest.raises(ValueError, match="compile=True"):
        TransformersSampler(model, tok, compile=True)  # refused up front, not mid-training
    sampler = TransformersSampler(model, tok, batch_size=4, autocast="none",
                                  cache_implementation="static")  # fmt: skip
    got = sampler.generate(prompts, max_new_tokens=12, temperature=0.0, top_p=1.0)
    assert _tokens(got) == _tokens(generate(model, tok, prompts, temperature=0.0, **COMMON))


def test_compiled_decoding_matches_eager(tiny, prompts, monkeypatch):
    """compile=True goes through transformers' compiled decode step and keeps the tokens.

    Inductor needs ~17 s to compile even this tiny model on 2 CPU cores, so the default
    run uses dynamo with the `aot_eager` backend (~1 s): the same graph capture of the
    decode step with the static cache, without generating C++ kernels. Set
    RESD_TEST_INDUCTOR=1 to run the real inductor path too.
    """
    model, tok = tiny
    backend = "inductor" if os.environ.get("RESD_TEST_INDUCTOR") == "1" else "aot_eager"
    monkeypatch.setattr(generation, "CompileConfig", lambda: CompileConfig(backend=backend))
    eager = generate(model, tok, prompts, temperature=0.0, **COMMON)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = generate(model, tok, prompts, temperature=0.0, cache_implementation="static",
                            compile=True, **COMMON)  # fmt: skip
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled
        assert model._last_compile_config.backend == backend
        assert _tokens(compiled) == _tokens(eager)
    finally:
        del model._compiled_call  # leave no compiled state to the other tests
        torch._dynamo.reset()


# --- vLLM backend ------------------------------------------------------------------------


def test_vllm_sampler_without_vllm_says_how_to_install(tiny_model_dir, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, installed or not
    with pytest.raises(ConfigError) as err:
        VLLMSampler(str(tiny_model_dir), tiny[1], max_model_len=256)
    message = str(err.value)
    assert message.startswith("generation_backend:")
    assert "pip install 'resd[vllm]'" in message
    assert "CUDA GPU" in message


def test_vllm_sampler_without_cuda_is_a_config_error(tiny_model_dir, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^generation_backend: .*CUDA GPU"):
        VLLMSampler(str(tiny_model_dir), tiny[1], max_model_len=256)


def test_the_vllm_backend_without_vllm_or_a_gpu_is_refused_before_anything_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`generation_backend: vllm` on a machine without vLLM, or without a GPU: said by
    `--dry-run` (which passed it) and by the trainer before the model loads. The trainer
    said "device: 'cuda', but torch sees no CUDA device here", for a device the user never
    set, after loading the tokenizer and the model."""
    from resd.cli import main
    from resd.training.trainer import Trainer
    from test_trainer import config

    cfg = config(tiny_model_dir, tmp_path / "run", "generation_backend=vllm")
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main(["train", "--config", str(path), "--dry-run"]) == 2
    assert "generation_backend: 'vllm' needs the vllm package" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import resd.training.trainer as trainer_module

    def no_load(*_args, **_kwargs):
        raise AssertionError("the tokenizer was loaded before the backend was checked")

    monkeypatch.setattr(trainer_module, "load_tokenizer", no_load)
    with pytest.raises(ConfigError, match=r"^generation_backend: 'vllm' needs a CUDA GPU"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


class _FakeLLM:
    """Records what VLLMSampler asks of `vllm.LLM`; answers with scripted completions."""

    def __init__(self, model: str, **kwargs) -> None:
        self.model, self.kwargs = model, kwargs
        self.scripted: list[SimpleNamespace] = []
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.resets = 0
        self.requests = self.params = None
        inner = SimpleNamespace(load_weights=lambda w: self.loaded.extend(w))
        runner = SimpleNamespace(model=inner)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )

    def generate(self, requests, sampling_params=None, use_tqdm=True):
        self.requests, self.params = requests, sampling_params
        return [SimpleNamespace(outputs=[c]) for c in self.scripted]

    def reset_prefix_cache(self) -> None:
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = _FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # restored afterwards
    return module


def test_vllm_sampler_requests_and_output_schema(tiny_model_dir, tiny, fake_vllm):
    _, tok = tiny
    sampler = VLLMSampler(str(tiny_model_dir), tok, max_model_len=256, seed=3,
                          vllm_args={"gpu_memory_utilization": 0.5, "enforce_eager": True})  # fmt: skip
    llm = sampler.llm
    assert llm.kwargs == {"gpu_memory_utilization": 0.5, "dtype": "bfloat16", "seed": 3,
                          "max_model_len": 256, "enforce_eager": True}  # fmt: skip
    eos = tok.eos_token_id
    assert eos in sampler.eos
    llm.scripted = [
        SimpleNamespace(token_ids=[5, 6, eos, 7], finish_reason="stop", stop_reason=None),
        SimpleNamespace(token_ids=[8, 9], finish_reason="length", stop_reason=None),
        SimpleNamespace(token_ids=[10], finish_reason="stop", stop_reason=eos),  # EOS dropped
    ]
    gens = sampler.generate([[1, 2], [3], [4]], max_new_tokens=4, temperature=0.7, top_p=0.9,
                            seeds=[1, 2, 3])  # fmt: skip
    assert llm.requests == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]},
                            {"prompt_token_ids": [4]}]  # fmt: skip
    assert [p.seed for p in llm.params] == [1, 2, 3]
    assert all(p.max_tokens == 4 and p.temperature == 0.7 and p.top_p == 0.9 for p in llm.params)
    assert all(p.stop_token_ids == sampler.eos and p.n == 1 for p in llm.params)
    assert not any(hasattr(p, "top_k") or hasattr(p, "min_p") for p in llm.params)  # vLLM's off
    assert [(g.token_ids, g.finished) for g in gens] == [
        ([5, 6, eos], True), ([8, 9], False), ([10, eos], True)]  # fmt: skip
    assert gens[0].text == tok.decode([5, 6, eos], skip_special_tokens=True)

    llm.scripted = [SimpleNamespace(token_ids=[5], finish_reason="length", stop_reason=None)]
    sampler.generate([[1]], max_new_tokens=1, temperature=0.0, top_p=0.9, seeds=[4])
    assert (llm.params[0].temperature, llm.params[0].top_p, llm.params[0].seed) == (0.0, 1.0, None)
    llm.scripted = [SimpleNamespace(token_ids=[5], finish_reason="length", stop_reason=None)]
    sampler.generate([[1]], max_new_tokens=1, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05)
    assert (llm.params[0].top_k, llm.params[0].min_p) == (20, 0.05)  # filters reach vLLM


def test_vllm_sampler_load_weights_paths(tiny_model_dir, tiny, fake_vllm):
    sampler = VLLMSampler(str(tiny_model_dir), tiny[1], max_model_len=256)
    llm = sampler.llm
    weight = torch.ones(2)
    sampler.load_weights(iter([("model.norm.weight", weight)]))  # in-process engine
    assert llm.loaded == [("model.norm.weight", weight)] and llm.resets == 1

    llm.llm_engine = SimpleNamespace()  # engine core in another process: go through RPC
    calls = []
    llm.collective_rpc = lambda fn, args=(): calls.append((fn, args))
    sampler.load_weights([("model.norm.weight", weight)])
    (fn, (batch,)), = calls  # fmt: skip
    got = []
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=torch.nn.Linear(2, 2)))
    worker.model_runner.model.load_weights = lambda w: got.extend(w)
    assert fn(worker, batch) == 1 and got[0][0] == "model.norm.weight"
    assert llm.resets == 2  # stale prefix KV is dropped after every sync

    del llm.collective_rpc
    with pytest.raises(RuntimeError, match="weights cannot be synced"):
        sampler.load_weights([])


# --- LoRA merging --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model_dir))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; make the delta real
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def test_merged_lora_weights_match_merge_and_unload(lora_model):
    model = lora_model
    ids = torch.tensor([[3, 17, 42, 9, 100]])
    before = model(input_ids=ids).logits.detach().clone()
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    merged = dict(merged_lora_weights(model))
    reference_model = copy.deepcopy(model).merge_and_unload()
    reference = reference_model.state_dict()

    assert set(merged) == {n for n, _ in reference_model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in merged
    assert not any("lora_" in n or "base_layer" in n or n.startswith("base_model") for n in merged)
    for name, tensor in merged.items():
        assert torch.equal(tensor, reference[name]), name
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base_q)

    # the model is untouched: same parameters, same outputs
    for name, param in model.named_parameters():
        assert torch.equal(param, params_before[name]), name
    assert torch.equal(model(input_ids=ids).logits, before)


def test_merged_lora_weights_pass_a_plain_model_through(tiny):
    model, _ = tiny
    got = dict(merged_lora_weights(model))
    assert got.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(got[n], p) for n, p in model.named_parameters())


# --- the trainer with generation_backend: vllm ------------------------------------------------


class _HFEngine:
    """Stands in for `vllm.LLM` on CPU: a transformers copy of the model behind vLLM's call
    shapes (token-id requests, per-request seeds, an in-process `load_weights`). It samples
    with our own row-seeded sampler, so a run through it must equal a transformers run."""

    def __init__(self, model: str, **kwargs) -> None:
        self.kwargs = kwargs
        self.hf = load_model(model, dtype="float32", device="cpu")
        self.tok = load_tokenizer(model)
        self.syncs = 0
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        )

    def _load_weights(self, weights) -> None:
        params = dict(self.hf.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)  # a KeyError here is a naming bug in the sync
        self.syncs += 1

    def generate(self, requests, sampling_params=None, use_tqdm=True):
        first = sampling_params[0]
        seeds = None if first.seed is None else [p.seed for p in sampling_params]
        gens = generate(self.hf, self.tok, [r["prompt_token_ids"] for r in requests],
                        max_new_tokens=first.max_tokens, temperature=first.temperature,
                        top_p=first.top_p, seeds=seeds, autocast=None)  # fmt: skip
        return [
            SimpleNamespace(outputs=[SimpleNamespace(
                token_ids=g.token_ids, finish_reason="stop" if g.finished else "length", stop_reason=None,
            )])
            for g in gens
        ]  # fmt: skip

    def reset_prefix_cache(self) -> None:
        pass


def test_trainer_with_the_vllm_backend_matches_the_transformers_backend(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Wiring, end to end: the engine is built from the model path, receives the policy's
    weights by plain HF name after every optimizer step, and every rollout, reflection,
    curation and evaluation sample goes through it."""
    from resd.training.trainer import Trainer
    from test_trainer import config, read_jsonl

    common = (
        "device=cpu",
        "autocast=none",
        "generation_dtype=float32",
        "steps=2",
        "eval_samples=1",
    )
    reference = Trainer(config(tiny_model_dir, tmp_path / "hf", *common)).train()

    engines: list[_HFEngine] = []
    module = types.ModuleType("vllm")
    module.LLM = lambda model, **kw: engines.append(_HFEngine(model, **kw)) or engines[-1]
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    trainer = Trainer(config(tiny_model_dir, tmp_path / "vllm", *common, "generation_backend=vllm"))
    summary = trainer.train()

    (engine,) = engines
    assert engine.kwargs["dtype"] == "float32" and engine.kwargs["gpu_memory_utilization"] == 0.3
    assert engine.syncs == 1 + 2  # at start, then after each optimizer step
    for name, param in trainer.model.named_parameters():
        assert torch.equal(dict(engine.hf.named_parameters())[name], param.detach()), name
    for name in ("metrics.jsonl", "samples.jsonl"):
        ours, theirs = read_jsonl(tmp_path / "vllm" / name), read_jsonl(tmp_path / "hf" / name)
        for a, b in zip(ours, theirs, strict=True):
            for key in ("reward", "loss", "response", "reflection_reply", "curation_reply"):
                assert a.get(key) == b.get(key), (name, key)
    assert summary["eval_after"]["task_mean@k"] == reference["eval_after"]["task_mean@k"]
