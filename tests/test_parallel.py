"""The parallel strategies' pure parts, in one process: which strategy a launch asks for,
the ZeRO options, the gradient clip and its non-finite check, how work is shared and
results gathered, tied weights in checkpoints, and the collectives of a process group of
one (a real gloo group: the multi-process runs are in test_distributed.py)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from resd.config import ConfigError, load_config
from resd.parallel import STRATEGIES, Parallel, make_parallel, resolve_strategy, tied_aliases
from resd.parallel.base import NonFiniteGradient, clip_gradients, without_tied_copies
from resd.parallel.zero import STALE_LOCK_S, load_optimizer_state, stale_build_locks, zero_options
from test_distributed import PARTITION_EVERY_PARAMETER, free_port

LAUNCH_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE", "WORLD_SIZE", "RANK", "LOCAL_RANK")  # fmt: skip


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def group_of_one(no_launcher: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A real gloo process group of one process, as a launcher would have made it."""
    init = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        yield no_launcher
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Tied(nn.Module):
    """An embedding and an output head sharing one weight, as tied LMs do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


# ---- which strategy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "strategy"),
    [
        ({"ACCELERATE_USE_FSDP": "1"}, "fsdp"),
        ({"ACCELERATE_USE_FSDP": " YES "}, "fsdp"),
        ({"ACCELERATE_USE_FSDP": "false"}, "ddp"),
        ({"ACCELERATE_USE_FSDP": "0"}, "ddp"),
        ({"ACCELERATE_USE_DEEPSPEED": "0", "ACCELERATE_USE_FSDP": "true"}, "fsdp"),
        ({"ACCELERATE_USE_DEEPSPEED": "1", "ACCELERATE_USE_FSDP": "1"}, "deepspeed"),
    ],
)
def test_auto_reads_the_launchers_flags_as_booleans(
    no_launcher: pytest.MonkeyPatch, env: dict[str, str], strategy: str
) -> None:
    """Catches a flag read as set whatever its value ("0", "false"), one whose spelling or
    padding is not accepted, and DeepSpeed losing to fsdp when a config exports both."""
    for name, value in env.items():
        no_launcher.setenv(name, value)
    assert resolve_strategy("auto") == strategy
    assert resolve_strategy("fsdp") == "fsdp"  # an explicit strategy is never second-guessed


def test_every_listed_strategy_is_a_setting_the_config_accepts() -> None:
    """`resd.parallel.STRATEGIES` is what a front end offers; catches a name in it that
    the config would refuse."""
    assert STRATEGIES[0] == "auto"
    for strategy in STRATEGIES:
        assert load_config(None, [f"strategy={strategy}"]).strategy == strategy


def test_a_single_process_runs_alone_and_warns_only_when_a_strategy_was_asked_for(
    no_launcher: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """WORLD_SIZE=1 is one process whatever the request; a zero_stage is a request too;
    and so is no WORLD_SIZE at all, a plain `resd train`."""
    no_launcher.setenv("WORLD_SIZE", "1")
    with caplog.at_level(logging.WARNING, logger="resd.parallel"):
        assert make_parallel().name == "single"  # the default is `auto`: nothing asked for
        assert not caplog.records
        assert type(make_parallel("auto", zero_stage=3)) is Parallel
    assert "zero_stage 3" in caplog.text
    no_launcher.delenv("WORLD_SIZE")
    assert make_parallel("auto").name == "single"


def test_a_launcher_with_several_processes_gets_the_strategy_it_asked_for(
    group_of_one: pytest.MonkeyPatch,
) -> None:
    """Under a launcher (WORLD_SIZE > 1) `auto` follows its config and an explicit strategy
    wins; rank and world size come from the launcher's environment."""
    pytest.importorskip("deepspeed")
    group_of_one.setenv("WORLD_SIZE", "2")
    group_of_one.setenv("RANK", "1")
    group_of_one.setenv("LOCAL_RANK", "1")
    ddp = make_parallel("auto")
    assert (ddp.name, ddp.world_size, ddp.rank, ddp.local_rank) == ("ddp", 2, 1, 1)
    assert not ddp.is_main and not ddp.sharded and not ddp.lockstep
    group_of_one.setenv("ACCELERATE_USE_FSDP", "true")
    fsdp = make_parallel("auto")
    assert (fsdp.name, fsdp.sharded, fsdp.lockstep) == ("fsdp", True, True)
    assert make_parallel("ddp").name == "ddp"
    zero3 = make_parallel("deepspeed", zero_stage=3)
    assert (zero3.name, zero3.options["stage"], zero3.sharded) == ("deepspeed", 3, True)
    zero2 = make_parallel("deepspeed", zero_stage=2)
    assert (zero2.options["stage"], zero2.sharded, zero2.lockstep) == (2, False, True)


# ---- ZeRO options -------------------------------------------------------------------------


def test_zero_stage_precedence_file_then_environment_then_default(
    no_launcher: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The resd config's stage beats a DeepSpeed file's, which beats the exported stage;
    a file without a stage, a missing file or the literal "none" leave the exported stage
    in charge. Catches any of these orders reversed."""
    no_launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    no_launcher.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    assert zero_options(None) == {"stage": 3}
    no_launcher.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "absent.json"))
    assert zero_options(None) == {"stage": 3}
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    no_launcher.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json))
    assert zero_options(None) == {"overlap_comm": True, "stage": 3}
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert zero_options(None) == {"stage": 1}
    assert zero_options(2) == {"stage": 2}
    no_launcher.chdir(tmp_path)
    (tmp_path / "none").write_text(ds_json.read_text())  # "none" is never a file name
    no_launcher.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    assert zero_options(None) == {"stage": 3}
    no_launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "auto")  # not a number: ignored
    no_launcher.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    assert zero_options(None) == {"stage": 2}


@pytest.mark.parametrize("stage", [0, 4])
def test_a_zero_stage_deepspeed_has_not_is_refused(
    no_launcher: pytest.MonkeyPatch, stage: int
) -> None:
    """Stages are 1, 2 and 3; catches 0 or 4 passed on to DeepSpeed."""
    with pytest.raises(ConfigError, match="zero_stage"):
        zero_options(stage)
    no_launcher.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    with pytest.raises(ConfigError, match="zero_stage"):
        zero_options(None)
    for good in (1, 3):
        assert zero_options(good)["stage"] == good


def test_zero_refuses_an_optimizer_state_of_another_model_before_loading_any() -> None:
    """Position-keyed state (torch's own optimizer.state_dict) or state naming other
    parameters is refused with what does not match, before the engine is touched."""
    model = nn.Linear(2, 2)
    entry = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    with pytest.raises(ValueError, match="parameter-name keys"):
        load_optimizer_state(None, model, {"state": {0: entry, 1: entry}})
    with pytest.raises(ValueError, match=r"missing \['bias'\].*unknown \['head'\]"):
        load_optimizer_state(None, model, {"state": {"weight": entry, "head": entry}})
    model.bias.requires_grad_(False)  # a frozen parameter has no optimizer state
    with pytest.raises(ValueError, match=r"missing \[\].*unknown \['bias'\]"):
        load_optimizer_state(None, model, {"state": {"weight": entry, "bias": entry}})


def test_zero3_refuses_what_it_cannot_run(group_of_one: pytest.MonkeyPatch) -> None:
    """LoRA and the chunked loss need whole weights, which ZeRO-3 partitions away; stage 2
    keeps them whole and runs both."""
    pytest.importorskip("deepspeed")
    from resd.parallel.zero import Zero

    lora = load_config(None, ["lora={r: 4}"])
    chunked = load_config(None, ["loss_chunk_size=4"])
    with pytest.raises(ConfigError, match="lora"):
        Zero(3).check(lora)
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        Zero(3).check(chunked)
    Zero(3).check(load_config(None, []))
    Zero(2).check(lora)
    Zero(2).check(chunked)
    model = nn.Linear(2, 2)
    assert Zero(2).policy(model) is model  # no engine yet: the bare module
    assert Zero(2).teacher_source(model) is None  # stage 2: the teacher reads the student
    # ZeRO-3: the teacher is fed full weights (here nothing is partitioned: the tensors)
    full = list(Zero(3).teacher_source(model))
    assert [t.data_ptr() for t in full] == [p.data_ptr() for p in model.parameters()]


class Small(nn.Module):
    """Two layers with what a checkpoint must treat apart: a frozen parameter (no optimizer
    state), a persistent buffer (saved) and a non-persistent one (not saved)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)
        self.out.bias.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("cache", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(x))) * self.scale


def adamw(model: nn.Module) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=0.1, weight_decay=0.01)


def small_loss(policy: nn.Module) -> torch.Tensor:
    return policy(torch.randn(5, 4, generator=torch.Generator().manual_seed(1))).pow(2).sum()


def lm_loss(policy: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    return policy(input_ids=ids, labels=ids).loss


def take_steps(strategy: Parallel, model: nn.Module, optimizer: torch.optim.Optimizer,
               count: int, max_grad_norm: float | None = 1.0,
               loss: Callable[[nn.Module], torch.Tensor] = small_loss) -> list[float]:  # fmt: skip
    """`count` optimizer steps as the trainer takes them: zero, backward, step."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for _ in range(count):
        optimizer.zero_grad(set_to_none=True)
        strategy.backward(loss(strategy.policy(model)))
        norms.append(strategy.step(optimizer, params, max_grad_norm))
    return norms


def test_zero_steps_saves_and_loads_as_one_plain_process_does(
    group_of_one: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A real DeepSpeed engine in a group of one against torch's AdamW in one plain
    process: the same norms and weights after clipped steps, and checkpoints in one
    layout (full tensors, optimizer state keyed by name) that each loads from the other
    and continues identically. Catches an optimizer state left out, mis-shaped, keyed
    by position, saved for a frozen parameter or without its step; a state loaded into an
    engine before its first step that goes nowhere, or with the wrong step count; a
    ZeRO-3 checkpoint without its buffers or with the non-persistent ones; the norm not
    returned; a saved state that the engine's later steps change under it; and a save
    before the first update, which DeepSpeed refuses with a TypeError (a run whose first
    step had nothing to learn, saved then, crashed). All stages in one process group:
    DeepSpeed keeps the first group it sees."""
    pytest.importorskip("deepspeed")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        group_of_one.setenv(name, value)  # what a launcher sets, and DeepSpeed requires
    # ZeRO-3 keeps parameters under 100,000 elements whole (all of a tiny model's): a
    # threshold of 0 partitions every one, so the gathers are what is tested
    config = tmp_path / "deepspeed.json"
    config.write_text(json.dumps(PARTITION_EVERY_PARAMETER))
    group_of_one.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    for stage in (1, 2, 3):
        check_zero_against_one_plain_process(stage)


def check_zero_against_one_plain_process(stage: int) -> None:
    from resd.parallel.zero import Zero, is_partitioned

    plain, reference = Parallel(), Small()
    reference_optimizer = adamw(reference)
    zero, model = Zero(stage), Small()
    optimizer = adamw(model)
    zero.prepare(model, optimizer, 1.0)
    assert zero.policy(model) is zero.engine and zero.policy(reference) is reference
    partitioned = [is_partitioned(p) and p.numel() == 0 for p in model.parameters()]
    assert all(partitioned) if stage == 3 else not any(partitioned)
    assert zero.full_optimizer_state(model, optimizer)["state"] == {}  # no step yet

    norms = take_steps(zero, model, optimizer, 2)
    assert norms == pytest.approx(take_steps(plain, reference, reference_optimizer, 2), rel=1e-5)
    assert min(norms) > 1.0  # the clip acted
    weights = {name: t.clone() for name, t in zero.full_state_dict(model).items()}
    expected = plain.full_state_dict(reference)
    names = {"inner.weight", "inner.bias", "out.weight", "out.bias", "scale"}  # no "cache"
    assert set(weights) == set(expected) == names
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=1e-6)
    gathered = dict(zero.full_parameters(model))
    assert list(gathered) == ["inner.weight", "inner.bias", "out.weight", "out.bias"]
    for name, tensor in gathered.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
    teacher = zero.teacher_source(model)  # ZeRO-3 only: the student's weights are partitioned
    if stage == 3:
        for tensor, param in zip(teacher, reference.parameters(), strict=True):
            torch.testing.assert_close(tensor, param.detach(), rtol=1e-5, atol=1e-6)
    else:
        assert teacher is None

    saved = zero.full_optimizer_state(model, optimizer)
    torch_saved = plain.full_optimizer_state(reference, reference_optimizer)
    assert list(saved["state"]) == list(torch_saved["state"]) == ["inner.weight", "inner.bias",
                                                                  "out.weight"]  # fmt: skip
    assert saved["param_groups"][0]["params"] == torch_saved["param_groups"][0]["params"]
    assert saved["param_groups"][0]["lr"] == 0.1
    for name, entry in torch_saved["state"].items():
        assert float(saved["state"][name]["step"]) == float(entry["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved["state"][name][key], entry[key], rtol=1e-5, atol=1e-7)
    kept = {name: entry["exp_avg"].clone() for name, entry in saved["state"].items()}
    take_steps(zero, model, optimizer, 1)  # the engine that saved goes on; its checkpoint stays
    for name, exp_avg in kept.items():
        torch.testing.assert_close(saved["state"][name]["exp_avg"], exp_avg, rtol=0, atol=0)

    # ZeRO resumes from the plain process's checkpoint, the plain process from ZeRO's
    resumed_zero, zero_model = Zero(stage), Small()
    zero_model.load_state_dict(expected)
    zero_optimizer = adamw(zero_model)
    resumed_zero.prepare(zero_model, zero_optimizer, None)  # unclipped from here on
    resumed_zero.load_optimizer_state(zero_model, zero_optimizer, torch_saved)
    plain_model = Small()
    plain_model.load_state_dict(weights)
    plain_optimizer = adamw(plain_model)
    plain.load_optimizer_state(plain_model, plain_optimizer, saved)
    followed = take_steps(plain, reference, reference_optimizer, 1, None)
    assert followed[0] > 1.0  # a norm a clip at 1 would have cut
    assert take_steps(resumed_zero, zero_model, zero_optimizer, 1, None) == pytest.approx(
        followed, rel=1e-5
    )
    resumed_norm = take_steps(plain, plain_model, plain_optimizer, 1, None)
    assert resumed_norm == pytest.approx(followed, rel=1e-5)
    after = plain.full_state_dict(reference)
    for state in (resumed_zero.full_state_dict(zero_model), plain.full_state_dict(plain_model)):
        for name in after:
            torch.testing.assert_close(state[name], after[name], rtol=1e-5, atol=1e-6)
    assert float(resumed_zero.full_optimizer_state(zero_model, zero_optimizer)["state"]
                 ["inner.weight"]["step"]) == 3.0  # fmt: skip
    with pytest.raises(NonFiniteGradient):  # a nan gradient stops the run under ZeRO too
        zero_optimizer.zero_grad(set_to_none=True)
        resumed_zero.backward(resumed_zero.policy(zero_model)(torch.ones(1, 4)).sum() * math.nan)
        resumed_zero.step(zero_optimizer, [], None)


def tiny_llama() -> nn.Module:
    """A two-layer Llama with tied embeddings, as small as FSDP's units allow."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config)


def test_fsdp_steps_saves_and_loads_as_one_plain_process_does(
    group_of_one: pytest.MonkeyPatch,
) -> None:
    """FSDP2 in a real group of one against the same model in one plain process: one unit
    per decoder layer plus the root; a forward without backward leaves the root gathered
    (the chunked loss applies its head after the forward) and the layers sharded, until
    `reshard`; the same gradient norms and weights after clipped steps; a checkpoint of
    full tensors with the tied head once, and name-keyed optimizer state that each side
    loads from the other. Catches a layer left out of the units, a root resharded after
    its forward or never, a gradient divided by a factor, and a checkpoint of shards."""
    import copy

    from torch.distributed.fsdp import FSDPModule

    from resd.parallel.base import is_dtensor
    from resd.parallel.fsdp import FSDP

    fsdp, plain = FSDP(), Parallel()
    model = tiny_llama()
    reference = copy.deepcopy(model)
    assert fsdp.shard_model(model) is model
    units = {id(m) for m in model.modules() if isinstance(m, FSDPModule)}
    assert units == {id(model), *(id(layer) for layer in model.model.layers)}
    with torch.no_grad():  # a teacher's forward
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert not is_dtensor(model.model.norm.weight)  # the root stays gathered
    assert is_dtensor(model.model.layers[0].mlp.up_proj.weight)  # a layer is sharded again
    fsdp.reshard(model)
    assert is_dtensor(model.model.norm.weight)

    optimizer, reference_optimizer = adamw(model), adamw(reference)
    norms = take_steps(fsdp, model, optimizer, 2, loss=lm_loss)
    assert norms == pytest.approx(
        take_steps(plain, reference, reference_optimizer, 2, loss=lm_loss), rel=1e-5
    )
    assert min(norms) > 1.0  # the clip acted
    weights = fsdp.full_state_dict(model)
    expected = without_tied_copies(reference, plain.full_state_dict(reference))
    assert set(weights) == set(expected) and "lm_head.weight" not in weights
    for name, tensor in expected.items():
        assert type(weights[name]) is torch.Tensor
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)

    saved = fsdp.full_optimizer_state(model, optimizer)
    torch_saved = plain.full_optimizer_state(reference, reference_optimizer)
    assert set(saved["state"]) == set(torch_saved["state"]) == set(expected)
    for name, entry in torch_saved["state"].items():
        assert float(saved["state"][name]["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert type(saved["state"][name][key]) is torch.Tensor
            torch.testing.assert_close(saved["state"][name][key], entry[key], rtol=1e-5, atol=1e-7)

    # FSDP resumes from the plain process's checkpoint, the plain process from FSDP's
    resumed = tiny_llama()
    resumed.load_state_dict(plain.full_state_dict(reference))
    fsdp.shard_model(resumed)
    resumed_optimizer = adamw(resumed)
    fsdp.load_optimizer_state(resumed, resumed_optimizer, copy.deepcopy(torch_saved))
    plain_model = tiny_llama()
    plain_model.load_state_dict(weights, strict=False)  # the tied head follows the embedding
    plain_optimizer = adamw(plain_model)
    plain.load_optimizer_state(plain_model, plain_optimizer, copy.deepcopy(saved))
    followed = take_steps(plain, reference, reference_optimizer, 1, loss=lm_loss)
    assert take_steps(fsdp, resumed, resumed_optimizer, 1, loss=lm_loss) == pytest.approx(
        followed, rel=1e-5
    )
    assert take_steps(plain, plain_model, plain_optimizer, 1, loss=lm_loss) == pytest.approx(
        followed, rel=1e-5
    )
    after = plain.full_state_dict(reference)
    for state in (fsdp.full_state_dict(resumed), plain.full_state_dict(plain_model)):
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, after[name], rtol=1e-5, atol=1e-6)


# ---- clipping -----------------------------------------------------------------------------


def linear_with_grads(weight_grad: float) -> nn.Linear:
    model = nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.full((1, 2), weight_grad)
    return model


@pytest.mark.parametrize("max_grad_norm", [None, 0, 0.0])
def test_no_max_grad_norm_measures_without_clipping(max_grad_norm: float | None) -> None:
    """0 and None mean "measure only"; catches them read as a limit of 0 (or 1)."""
    model = linear_with_grads(3.0)
    norm = clip_gradients(list(model.parameters()), max_grad_norm)
    assert norm == pytest.approx(3.0 * math.sqrt(2))
    torch.testing.assert_close(model.weight.grad, torch.full((1, 2), 3.0))


def test_a_max_grad_norm_clips_and_reports_the_norm_before_clipping() -> None:
    """Catches the clip skipped, or the norm reported after clipping."""
    model = linear_with_grads(3.0)
    before = model.weight.detach().clone()
    norm = Parallel().step(
        torch.optim.SGD(model.parameters(), lr=1.0), list(model.parameters()), 1.5
    )
    assert norm == pytest.approx(3.0 * math.sqrt(2))
    assert float(model.weight.grad.norm()) == pytest.approx(1.5, rel=1e-4)
    torch.testing.assert_close(model.weight.detach(), before - model.weight.grad)  # updated


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_gradient_is_refused_before_the_update(bad: float) -> None:
    """Catches a nan/inf norm let through to the optimizer (weights must stay as they were)."""
    model = linear_with_grads(bad)
    before = model.weight.detach().clone()
    with pytest.raises(NonFiniteGradient, match="grad_norm"):
        Parallel().step(torch.optim.SGD(model.parameters(), lr=1.0), list(model.parameters()), 1.0)
    torch.testing.assert_close(model.weight.detach(), before)
    assert issubclass(NonFiniteGradient, ValueError)


# ---- sharing work and results, tied weights --------------------------------------------


def test_each_process_owns_a_strided_share_and_results_come_back_in_index_order() -> None:
    """Every item is owned once, shares differ by at most one, and a gather puts the
    results of all processes back in the global order."""
    shares = []
    for rank in range(3):
        p = Parallel()
        p.rank, p.world_size = rank, 3
        shares.append(p.shard(list("abcdefg")))
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    single = Parallel()
    assert single.shard(list("abc")) == [0, 1, 2] and single.is_main
    # by index, not by value (catches a sort on the results themselves)
    assert single.gather_indexed([(2, "a"), (0, "c"), (1, "b")]) == ["c", "b", "a"]
    assert (single.sum(2.5), single.max(3), single.gather("x")) == (2.5, 3, ["x"])
    model = nn.Linear(2, 2)
    assert single.shard_model(model) is model and single.policy(model) is model
    # rank 0 of 1, on the device asked for (catches a local rank that would pick cuda:1)
    assert (single.world_size, single.rank, single.local_rank) == (1, 0, 0)
    assert (single.device("cpu"), single.device("auto")) == ("cpu", "auto")


def test_tied_weights_are_saved_once_under_their_first_name() -> None:
    """Catches a tied head saved twice (or under the alias instead of the embedding)."""
    model = Tied()
    assert tied_aliases(model) == {"head.weight"}
    assert tied_aliases(nn.Linear(2, 2)) == set()
    state = {"embed.weight": torch.zeros(1), "head.weight": torch.zeros(1)}
    assert list(without_tied_copies(model, state)) == ["embed.weight"]


def test_only_the_main_process_returns_full_weights_and_optimizer_state() -> None:
    """Rank 0 writes checkpoints; other ranks get None. The state is keyed by name and
    loads back into a fresh optimizer."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    main, other = Parallel(), Parallel()
    other.rank = 1
    assert other.full_state_dict(model) is None and not other.is_main
    assert other.full_optimizer_state(model, optimizer) is None
    assert set(main.full_state_dict(model)) == {"weight", "bias"}
    assert [name for name, _ in main.full_parameters(model)] == ["weight", "bias"]
    state = main.full_optimizer_state(model, optimizer)
    assert set(state["state"]) == {"weight", "bias"}
    model.zero_grad(set_to_none=True)  # as at a resume, before any backward
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    main.load_optimizer_state(model, fresh, state)
    torch.testing.assert_close(
        fresh.state[model.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"]
    )


# ---- a process group (of one) ---------------------------------------------------------


def test_ddp_step_sums_gradients_and_gives_unused_parameters_a_zero_gradient(
    group_of_one: pytest.MonkeyPatch,
) -> None:
    """A parameter no loss reached (grad None) must still take part in the all-reduce, as
    a zero gradient, or the processes' collectives fall out of step."""
    from resd.parallel.ddp import DDP

    group_of_one.setenv("WORLD_SIZE", "1")
    ddp = DDP()
    used, unused = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    used.weight.grad = torch.full((1, 2), 3.0)
    params = [*used.parameters(), *unused.parameters()]
    before = [p.detach().clone() for p in params]
    norm = ddp.step(torch.optim.SGD(params, lr=1.0), params, 1.5)
    assert norm == pytest.approx(3.0 * math.sqrt(2))
    torch.testing.assert_close(unused.weight.grad, torch.zeros(1, 2))
    torch.testing.assert_close(unused.weight.detach(), before[1])
    assert float(used.weight.grad.norm()) == pytest.approx(1.5, rel=1e-4)
    torch.testing.assert_close(used.weight.detach(), before[0] - used.weight.grad)  # updated
    assert (ddp.sum(2.5), ddp.max(3), ddp.gather({"a": 1})) == (2.5, 3, [{"a": 1}])
    assert ddp.device("cpu") == "cpu"


def test_a_shard_is_read_as_the_whole_tensor(group_of_one: pytest.MonkeyPatch) -> None:
    """FSDP parameters are DTensors: sampling copies and checkpoints need the full tensor,
    a plain one; catches a DTensor not recognised (handed on as a shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from resd.parallel import full_tensor

    whole = torch.arange(6.0).reshape(3, 2)
    shard = distribute_tensor(whole, init_device_mesh("cpu", (1,)), [Shard(0)])
    full = full_tensor(shard)
    assert type(full) is torch.Tensor
    torch.testing.assert_close(full, whole)
    assert full_tensor(whole) is whole


def collectives_of_rank(rank: int, port: int, out: str) -> None:
    """One of two processes (torch.multiprocessing.spawn): what each collective returns
    here, written to `out`/<rank>.json."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    from resd.parallel.ddp import DDP

    ddp = DDP()
    owned = ddp.shard(list("abcde"))
    used, unused = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    used.weight.grad = torch.full((1, 2), float(rank + 1))
    params = [*used.parameters(), *unused.parameters()]
    norm = ddp.step(torch.optim.SGD(params, lr=0.0), params, None)
    arrived = Path(out, "rank 1 arrived")  # written by rank 1 late, just before each barrier
    if rank == 1:
        time.sleep(0.5)
        arrived.write_text("barrier")
    ddp.barrier()
    waited = {"barrier": arrived.exists()}
    results = {
        "rank": (ddp.rank, ddp.world_size, ddp.local_rank, ddp.is_main),
        "sum": ddp.sum(rank + 0.5),
        "max": ddp.max(10 * rank + 3),
        "gather": ddp.gather({"rank": rank}),
        "indexed": ddp.gather_indexed([(i, f"{i} from {rank}") for i in owned]),
        "grad": used.weight.grad.tolist(),
        "unused_grad": unused.weight.grad.tolist(),
        "norm": norm,
    }
    if rank == 1:
        time.sleep(0.5)
        arrived.write_text("close")
    ddp.close()
    waited["close"] = arrived.read_text() == "close"
    results["closed"], results["waited"] = not dist.is_initialized(), waited
    Path(out, f"{rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_two_processes_agree_on_every_collective(tmp_path: Path) -> None:
    """Two real processes over gloo: sums, maxima and gathers combine both ranks' values
    and every rank gets the same answer; a ddp step sums the gradients (a parameter no loss
    reached takes part as zeros); `barrier` and `close` wait for the late rank, and `close`
    takes the group down on both. Catches a collective left out (each rank would keep its
    own value and the ranks diverge)."""
    torch.multiprocessing.spawn(collectives_of_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    first, second = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert first["rank"] == [0, 2, 0, True] and second["rank"] == [1, 2, 1, False]
    for results in (first, second):
        assert results["sum"] == 2.0 and results["max"] == 13
        assert results["gather"] == [{"rank": 0}, {"rank": 1}]
        assert results["indexed"] == ["0 from 0", "1 from 1", "2 from 0", "3 from 1", "4 from 0"]
        assert results["grad"] == [[3.0, 3.0]] and results["unused_grad"] == [[0.0, 0.0]]
        assert results["norm"] == pytest.approx(3.0 * math.sqrt(2))
        assert results["closed"]
        # rank 0 passed each barrier only once rank 1 was there (it arrives 0.5 s late)
        assert results["waited"] == {"barrier": True, "close": True}


def test_closing_a_process_group_takes_it_down(group_of_one: pytest.MonkeyPatch) -> None:
    """After a run, `close` waits for every process and destroys the group, so the next
    run in the same interpreter (or its exit) does not find a stale one."""
    from resd.parallel.ddp import DDP

    ddp = DDP()
    ddp.close()
    assert not dist.is_initialized()
    ddp.close()  # no group (any more): nothing to do


def test_fsdp_refuses_a_model_that_names_no_decoder_layer(
    group_of_one: pytest.MonkeyPatch,
) -> None:
    """FSDP shards one unit per decoder layer, found by `_no_split_modules`; a model that
    declares none is a config error naming its class, not a run with one huge unit. A
    PEFT model is sharded by its base model's layers."""
    from resd.parallel.fsdp import FSDP

    with pytest.raises(ConfigError, match=r"fsdp needs .* which Linear does not declare"):
        FSDP().shard_model(nn.Linear(2, 2))
    # a LoRA model declares nothing itself; its base model's layers are found through it
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FSDPModule

    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    FSDP().shard_model(lora)
    layers = lora.get_base_model().model.layers
    assert all(isinstance(layer, FSDPModule) for layer in layers)


def test_a_missing_deepspeed_is_named_before_the_process_group_is_made(
    no_launcher: pytest.MonkeyPatch,
) -> None:
    """Under a launcher of 2 processes, `deepspeed` without the package installed is a
    config error with the install hint, raised before the process group, which would wait
    for the other rank (catches the import left to the first engine)."""
    no_launcher.setitem(sys.modules, "deepspeed", None)  # import deepspeed: ImportError
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # a group made by mistake fails at once
        no_launcher.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'resd\[deepspeed\]'"):
        make_parallel("auto")
    assert not dist.is_initialized()


def test_fsdp_reshard_is_a_no_op_without_a_sharded_model(group_of_one: pytest.MonkeyPatch) -> None:
    """The trainer reshards every teacher, and there may be none (None) or an unsharded
    one; catches either taken for an FSDP module."""
    from resd.parallel.fsdp import FSDP

    FSDP().reshard(None)
    FSDP().reshard(nn.Linear(2, 2))


def test_a_lock_a_killed_extension_build_left_is_found(tmp_path, monkeypatch):
    """A DeepSpeed start killed while it held a torch extension's lock (a test run stopped
    with SIGTERM did it here) made every later DeepSpeed start wait forever without a word.
    Catches the lock going unfound, in the folder layout of TORCH_EXTENSIONS_DIR and of
    torch's default root (one level deeper), and a fresh lock, a build under way now,
    being called stale."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old, deeper, fresh = (tmp_path / "shm_comm" / "lock", tmp_path / "py311_cpu" / "op" / "lock",
                          tmp_path / "cpu_adam" / "lock")  # fmt: skip
    for lock in (old, deeper, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    now = time.time()
    for lock in (old, deeper):
        os.utime(lock, (now - STALE_LOCK_S - 5, now - STALE_LOCK_S - 5))
    assert stale_build_locks(now) == sorted([old, deeper])
    assert stale_build_locks(now - 10) == []  # ten seconds earlier, none was stale yet
