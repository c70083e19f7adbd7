"""Who writes the lessons: the policy itself, or a model behind an OpenAI-compatible API.

RESD's reflector and curator are the policy, prompted differently ("self-reflection").
A small policy writes weak lessons, so `reflector: {base_url, model}` in the config sends
the reflection, tagging and curation prompts to any OpenAI-compatible server instead (a
vLLM server, `resd serve`, a hosted API), decoded under the same JSON schemas through
`response_format`. The student still learns only through distillation: the stronger
model's lessons reach it through the teacher's context. The trade-off: better lessons,
but no longer self-reflection, and every step waits on the network.

Both reflectors take chat conversations and return `Generation`s, and are chosen once,
when `Lessons` is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from resd.config import is_finite_number
from resd.generation.base import Generation

__all__ = ["REFLECTOR_KEYS", "LocalReflector", "RemoteReflector", "check_reflector"]

Conversation = list[dict[str, str]]
REFLECTOR_KEYS = {"base_url", "model", "api_key_env", "timeout", "max_concurrency", "temperature"}


# The numeric settings, checked when the config is read rather than at the first request.
NUMBER_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "timeout": (lambda v: v > 0, "a number of seconds > 0"),
    "max_concurrency": (lambda v: v == int(v) and v >= 1, "a whole number >= 1"),
    "temperature": (lambda v: v >= 0, "a number >= 0"),
}


def check_reflector(value: dict[str, Any]) -> str | None:
    """What is wrong with a `reflector:` mapping, or None."""
    unknown = sorted(set(value) - REFLECTOR_KEYS)
    if unknown:
        return f"unknown key {unknown[0]!r}; keys: {', '.join(sorted(REFLECTOR_KEYS))}"
    missing = [k for k in ("base_url", "model") if not value.get(k)]
    if missing:
        return f"needs {' and '.join(missing)}"
    if not str(value["base_url"]).startswith(("http://", "https://")):
        return f"base_url: expected an http(s):// URL, got {value['base_url']!r}"
    for key, (ok, expected) in NUMBER_RULES.items():
        given = value.get(key)
        # finite first: `.inf` or `.nan` in YAML would reach the server (or make int()
        # raise) instead of naming the setting
        if given is not None and not (is_finite_number(given) and ok(given)):
            return f"{key}: expected {expected}, got {given!r}"
    return None


class LocalReflector:
    """The policy writes its own lessons, through its sampler (prefills, grammar)."""

    def __init__(
        self, sampler: Any, chat: Callable[[Conversation, list[int] | None], list[int]]
    ) -> None:
        self.sampler, self.chat = sampler, chat
        self.structured = bool(sampler.structured)

    def replies(
        self,
        conversations: Sequence[Conversation],
        kind: str,
        max_new_tokens: int,
        seeds: list[int],
        schema: dict[str, Any] | None,
        heads: Sequence[list[int] | None] | None = None,
    ) -> list[Generation]:
        """`heads`: per conversation, the rollout tokens it begins with (conversation
        layout), so the prompt reuses them and the sampler's prefix cache can match."""
        heads = heads or [None] * len(conversations)
        prompts = [self.chat(c, h) for c, h in zip(conversations, heads, strict=True)]
        return self.sampler.replies(prompts, kind, max_new_tokens, seeds, schema)


class RemoteReflector:
    """A model behind an OpenAI-compatible chat-completions endpoint writes the lessons.

    Requests go out concurrently (`max_concurrency`), so a batching server decodes them
    together. Each carries the row's seed, so a server that honours seeds (vLLM, `resd
    serve`) repeats its replies. `Generation.token_ids` are the reply re-tokenized with
    the student's tokenizer: only their count is used (the step's token metrics).
    """

    def __init__(
        self,
        settings: dict[str, Any],
        tokenizer: Any,
        *,
        structured_output: str,
        temperature: float,
    ) -> None:
        try:
            import openai
        except ImportError as exc:
            raise ImportError(
                "reflector: talking to an OpenAI-compatible server needs the 'openai' package "
                "(pip install 'resd[serve]')"
            ) from exc
        # a setting left null (`timeout:` with no value) takes its default, as
        # check_reflector reads it; float(None) would raise here
        settings = {k: v for k, v in settings.items() if v is not None}
        key_env = settings.get("api_key_env")
        api_key = os.environ.get(key_env, "") if key_env else ""
        if key_env and not api_key:
            raise ValueError(
                f"reflector.api_key_env: the environment variable {key_env} is not set"
            )
        self.client = openai.OpenAI(
            base_url=settings["base_url"], api_key=api_key or "none",
            timeout=float(settings.get("timeout", 120)), max_retries=2,
        )  # fmt: skip
        self.model = str(settings["model"])
        self.tokenizer = tokenizer
        self.temperature = float(settings.get("temperature", temperature))
        self.workers = int(settings.get("max_concurrency", 8))
        self.structured = structured_output != "off"  # the server applies the schema

    def replies(
        self,
        conversations: Sequence[Conversation],
        kind: str,
        max_new_tokens: int,
        seeds: list[int],
        schema: dict[str, Any] | None,
        heads: Sequence[list[int] | None] | None = None,  # token heads: local only
    ) -> list[Generation]:
        def one(conversation: Conversation, seed: int) -> Generation:
            extra: dict[str, Any] = {}
            if schema is not None:
                extra["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": f"resd_{kind}", "schema": schema, "strict": True},
                }
            reply = self.client.chat.completions.create(
                model=self.model, messages=conversation, max_tokens=max_new_tokens,
                temperature=self.temperature, seed=seed % 2**31, **extra,
            )  # fmt: skip
            choice = reply.choices[0]
            text = choice.message.content or ""
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            details = getattr(getattr(reply, "usage", None), "prompt_tokens_details", None)
            cached = int(getattr(details, "cached_tokens", 0) or 0)  # the server's prefix cache
            return Generation(ids, text, choice.finish_reason == "stop", cached_tokens=cached)

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(one, conversations, seeds))
