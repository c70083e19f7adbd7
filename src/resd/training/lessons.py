"""The lesson half of a step: reflect on failures, tag what helped successes, curate the
playbook, remember solutions, and build what the teacher is shown.

Every process works on its own rollouts; what changes shared state (bullet tags, curator
operations, new solutions) is gathered and applied on every process in global rollout
order, so all hold the same playbook. All curators of a step see one playbook snapshot,
so their replies can be generated in one batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from resd.config import TrainConfig
from resd.envs.base import Item
from resd.generation.hf import chat_ids_after, chat_prompt_ids
from resd.generation.schemas import curation_schema, reflection_schema, tag_schema
from resd.parallel import Parallel
from resd.templating import clip_tokens, strip_thinking
from resd.training.algorithms import Algorithm
from resd.training.guards import LessonSource, lesson_problem
from resd.training.parsing import extract_bullet_tags
from resd.training.playbook import OPERATION_TYPES, Playbook, prune_due
from resd.training.policy import PolicySampler
from resd.training.reflection import (
    Reflection,
    curation_messages,
    parse_operations,
    parse_reflection,
    parse_tags,
    reflection_followup,
    reflection_messages,
    success_tag_followup,
    success_tag_messages,
)
from resd.training.reflector import LocalReflector, RemoteReflector
from resd.training.rollout import Outcome, Rollout, row_seed
from resd.training.teacher_context import (
    SolutionBuffer,
    TeacherTemplate,
    teacher_chat,
    teacher_context,
)


@dataclass(frozen=True)
class PlaybookView:
    """The playbook as one reader is shown it: text, the ids in it, how many were left out."""

    text: str = ""
    ids: list[str] = field(default_factory=list)
    omitted: int = 0


@dataclass
class PlaybookChanges:
    """What one step did to the playbook (metrics and playbook_history.jsonl)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    applied: Counter = field(default_factory=Counter)  # tags_applied, ops_applied, ... (not summed)


def reflection_choice(outcomes: list[Outcome], cap: int | None) -> set[int]:
    """The global indices of the failures to reflect on (partial credit is a failure).

    Under a cap, every task's first failure comes before any task's second, in global
    order: with several rollouts per prompt, the first failures in plain index order would
    all be the first prompt's, and a step's lessons would come from one task.
    """
    earlier: Counter[str] = Counter()
    ranked = []
    for g, o in enumerate(outcomes):
        if o.score < 1.0:
            ranked.append((earlier[o.item_id], g))
            earlier[o.item_id] += 1
    return {g for _, g in sorted(ranked)[:cap]}


class Lessons:
    def __init__(
        self,
        cfg: TrainConfig,
        algo: Algorithm,
        tokenizer: Any,
        sampler: PolicySampler,
        parallel: Parallel,
    ) -> None:
        self.cfg, self.algo, self.tokenizer, self.sampler, self.parallel = (
            cfg,
            algo,
            tokenizer,
            sampler,
            parallel,
        )
        self.template = TeacherTemplate.from_config(cfg.teacher_template)
        self.playbook = Playbook.load(cfg.playbook_init) if cfg.playbook_init else Playbook()
        self.buffer = SolutionBuffer(keep=cfg.solution_buffer_keep)
        self.curation_ops = OPERATION_TYPES if cfg.curation_ops == "all" else ("ADD",)
        # `lesson_calls: one`: the reflector's reply also holds the playbook operations, so
        # the curator's generation pass is skipped (needs reflection and a playbook).
        self.single_call = cfg.lesson_calls == "one" and algo.reflection and algo.playbook
        self.clip = partial(clip_tokens, max_tokens=cfg.slot_max_tokens, tokenizer=tokenizer)
        # `reflection_layout`: reflection and tagging prompts quote the task and the attempt
        # (the release), or continue the rollout's own conversation, beginning with its tokens.
        self.conversation = cfg.reflection_layout == "conversation"
        self.reflection_messages = reflection_followup if self.conversation else reflection_messages
        self.tag_messages = success_tag_followup if self.conversation else success_tag_messages
        self.omitted: dict[str, int] = {}  # entries each reader was not shown, this step
        self._views: dict[tuple[str, int | None], PlaybookView] = {}
        # Who writes reflections, tags and curations: the policy, or `reflector:`'s server.
        self.reflector: LocalReflector | RemoteReflector = (
            RemoteReflector(cfg.reflector, tokenizer, structured_output=str(cfg.structured_output),
                            temperature=cfg.temperature)
            if cfg.reflector
            else LocalReflector(sampler, self._chat)
        )  # fmt: skip

    # ---- views and prompts ---------------------------------------------------------------------
    def view(self, reader: str) -> PlaybookView:
        """The playbook as `reader` (reflection, curation, teacher) is shown it.

        Each reader has a token budget (`<reader>_playbook_tokens`, null = all); when the
        playbook does not fit, whole entries are left out, least proven first, and the
        omission is counted in the step's metrics. Views are cached until the playbook's
        text changes: a step asks for them many times, and fitting a budget tokenizes
        every entry.
        """
        budget = getattr(self.cfg, f"{reader}_playbook_tokens")
        key = (self.playbook.render(), budget)
        view = self._views.get(key)
        if view is None:
            text = self.playbook.render(
                max_tokens=budget, count_tokens=self._count_tokens, include_empty=False
            )
            shown = [i for i in self.playbook.entries if f"[{i}]" in text]
            view = PlaybookView(text if shown else "", shown, len(self.playbook) - len(shown))
            self._views = {k: v for k, v in self._views.items() if k[0] == key[0]}
            self._views[key] = view
        self.omitted[reader] = view.omitted
        return view

    def student_messages(self, item: Item) -> list[dict[str, str]]:
        """The student's prompt: the item's messages, plus the playbook if `student_playbook`.

        RESD's student never sees the playbook (the lessons must be distilled into the
        weights); showing it is the deployment-time option ACE uses.
        """
        if not (self.cfg.student_playbook and self.algo.playbook and len(self.playbook)):
            return item.messages
        view = self.view("teacher")
        if not view.text:  # no entry fits the budget: no header with nothing under it
            return item.messages
        lessons = f"Lessons from earlier tasks:\n{view.text}\n\n"
        messages = [dict(m) for m in item.messages]
        last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[last_user]["content"] = lessons + messages[last_user]["content"]
        return messages

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _chat(self, messages: list[dict[str, str]], head: list[int] | None = None) -> list[int]:
        limit = self.cfg.max_teacher_prompt_tokens
        if head:
            return chat_ids_after(self.tokenizer, messages, head, limit)
        return chat_prompt_ids(self.tokenizer, messages, limit)

    def _attempt(self, r: Rollout) -> tuple[str | list[dict[str, str]], str]:
        """The task and the attempt as a reflection or tagging prompt shows them: the
        rollout's messages and reply as they were, or clipped text."""
        if self.conversation:
            return self.student_messages(r.item), r.response
        return self.clip(r.item.prompt_text), self.clip(r.response)

    def _heads(self, rollouts: list[Rollout]) -> list[list[int]] | None:
        """In the conversation layout, the tokens each prompt begins with: the rollout's
        prompt and reply, which the sampler's prefix cache holds."""
        if not self.conversation:
            return None
        return [[*r.prompt_ids, *r.gen.content_ids] for r in rollouts]

    def _schema(self, build, budget: int, view: PlaybookView) -> dict[str, Any] | None:
        """The JSON schema of a reply (ids: the entries its prompt shows); None without a grammar."""
        if not self.reflector.structured:
            return None
        if build is curation_schema or (build is reflection_schema and self.single_call):
            return build(view.ids, budget, self._count_tokens, operations=self.curation_ops,
                         min_operations=self.cfg.curation_min_operations)  # fmt: skip
        return build(view.ids, budget, self._count_tokens)

    # ---- the phases ------------------------------------------------------------------------------
    def prune(self, step: int, changes: PlaybookChanges) -> None:
        """Prune the playbook every F context updates, before this step's reflections."""
        if self.algo.playbook and prune_due(step, self.cfg.playbook_prune_every):
            changes.removed += self.playbook.prune(
                step, policy=self.cfg.playbook_policy, seed=self.cfg.seed + step
            )

    def reflect(
        self,
        rollouts: list[Rollout],
        outcomes: list[Outcome],
        step: int,
        counts: Counter,
        changes: PlaybookChanges,
    ) -> None:
        """REFLECT on failures (at most `max_reflections_per_step` of the global batch) and
        TAG successes, each in one batched call; the tags are applied in global order."""
        tags: list[tuple[int, list[tuple[str, str]]]] = []
        if self.algo.reflection:
            chosen = reflection_choice(outcomes, self.cfg.max_reflections_per_step)
            tags += self._reflect([r for r in rollouts if r.index in chosen], step, counts)
        if self.algo.playbook and len(self.playbook):
            tags += [(len(outcomes) + i, t) for i, t in self._tag_successes(rollouts, step, counts)]
        self.sampler.forget_prefixes()  # reflections and tags were their only readers
        if self.algo.playbook:
            for pairs in self.parallel.gather_indexed(tags):
                changes.applied["tags_applied"] += sum(
                    self.playbook.tag(i, t, step) for i, t in pairs
                )

    def _reflect(self, failed: list[Rollout], step: int, counts: Counter) -> list[tuple[int, list]]:
        if not failed:
            return []
        view = self.view("reflection") if self.algo.playbook else PlaybookView()
        operations = self.curation_ops if self.single_call else None
        prompts = [self.reflection_messages(*self._attempt(r), self.clip(r.score.feedback), view.text,
                                            operations=operations) for r in failed]  # fmt: skip
        budget = self.cfg.reflection_max_new_tokens
        seeds = [row_seed(self.cfg.seed, step, "reflect", r.index) for r in failed]
        replies = self.reflector.replies(
            prompts, "reflection", budget, seeds, self._schema(reflection_schema, budget, view),
            heads=self._heads(failed),
        )  # fmt: skip
        tags = []
        for r, reply in zip(failed, replies, strict=True):
            counts["reflections"] += 1
            counts["reflection_tokens"] += len(reply.token_ids)
            counts["reflection_cached_tokens"] += reply.cached_tokens
            counts["reflection_cache_hits"] += reply.cached_tokens > 0
            counts["reflection_truncated"] += not reply.finished
            counts["reflection_fields_cut"] += reply.fields_cut
            r.reflection_reply = reply.text
            r.reflection = parse_reflection(reply.text)
            if r.reflection is None:
                counts["reflection_parse_failures"] += 1
                tags.append((r.index, extract_bullet_tags(None, reply.text)))  # regex fallback
                if self.cfg.unparsed_reflection == "raw" and strip_thinking(reply.text):
                    # the release hands the raw reply on to the curator and the teacher
                    r.reflection = Reflection.raw(strip_thinking(reply.text))
                    counts["reflections_raw"] += 1
            else:
                counts["reflection_loose_parses"] += r.reflection.loose
                counts["reflections_parsed"] += not r.reflection.loose
                tags.append((r.index, r.reflection.bullet_tags))
        return tags

    def _tag_successes(
        self, rollouts: list[Rollout], step: int, counts: Counter
    ) -> list[tuple[int, list]]:
        wins = [r for r in rollouts if r.success]
        if not wins:
            return []
        view = self.view("reflection")
        prompts = [self.tag_messages(*self._attempt(r), view.text) for r in wins]
        budget = self.cfg.reflection_max_new_tokens
        seeds = [row_seed(self.cfg.seed, step, "tag", r.index) for r in wins]
        replies = self.reflector.replies(prompts, "tag", budget, seeds,
                                         self._schema(tag_schema, budget, view), heads=self._heads(wins))  # fmt: skip
        tags = []
        for r, reply in zip(wins, replies, strict=True):
            counts["tag_replies"] += 1
            counts["tag_tokens"] += len(reply.token_ids)
            counts["tag_cached_tokens"] += reply.cached_tokens
            counts["tag_fields_cut"] += reply.fields_cut
            parsed = parse_tags(reply.text)
            if parsed is None:
                counts["tag_parse_failures"] += 1
            else:
                tags.append((r.index, parsed))
        return tags

    def curate(
        self, rollouts: list[Rollout], step: int, counts: Counter, changes: PlaybookChanges
    ) -> None:
        """CURATE from every reflection (or, without reflection, from raw feedback), then
        apply the operations in global order; prune if the playbook is over budget."""
        if not self.algo.playbook:
            return
        retired: dict[str, str | None] = {}  # ids this step's earlier replies merged or deleted
        for ops, source in self.parallel.gather_indexed(self._curate(rollouts, step, counts)):
            report = self.playbook.apply_operations(ops, step, allowed=self.curation_ops, retired=retired,
                                                    similarity=self.cfg.playbook_similarity,
                                                    check=partial(lesson_problem, source=source))  # fmt: skip
            changes.applied["ops_applied"] += report.applied
            changes.applied["curations_effective"] += report.applied > 0
            changes.applied["ops_skipped"] += report.skipped
            changes.applied.update({f"ops_skipped_{k}": v for k, v in report.reasons.items()})
            changes.added += report.added
            changes.removed += report.removed  # DELETE and MERGE
            changes.updated += report.updated
        if len(self.playbook) > self.cfg.playbook_max_entries:
            changes.removed += self.playbook.prune(step, policy=self.cfg.playbook_policy,
                                                     max_entries=self.cfg.playbook_max_entries, seed=self.cfg.seed + step)  # fmt: skip

    def _curate(
        self, rollouts: list[Rollout], step: int, counts: Counter
    ) -> list[tuple[int, tuple]]:
        if self.algo.reflection:
            sources = [(r, r.reflection.as_text()) for r in rollouts if r.reflection is not None]
        else:  # ablation: curate straight from the environment's feedback
            sources = [(r, f"Feedback on a failed attempt: {r.score.feedback}") for r in rollouts
                       if not r.success and r.score.feedback]  # fmt: skip
        if not sources:
            return []
        if self.single_call:  # the operations came with the reflection
            return self._operations(((r, r.reflection_reply) for r, _ in sources), counts)
        view = self.view("curation")
        stats = self.playbook.stats()
        prompts = [curation_messages(stats, self.clip(text), view.text, self.clip(r.item.prompt_text),
                                     operations=self.curation_ops) for r, text in sources]  # fmt: skip
        budget = self.cfg.curation_max_new_tokens
        seeds = [row_seed(self.cfg.seed, step, "curate", r.index) for r, _ in sources]
        replies = self.reflector.replies(
            prompts, "curation", budget, seeds, self._schema(curation_schema, budget, view)
        )
        for reply in replies:
            counts["curation_tokens"] += len(reply.token_ids)
            counts["curation_truncated"] += not reply.finished
            counts["curation_fields_cut"] += reply.fields_cut
        return self._operations(
            ((r, reply.text) for (r, _), reply in zip(sources, replies, strict=True)), counts
        )

    def _operations(
        self, replies: Iterable[tuple[Rollout, str]], counts: Counter
    ) -> list[tuple[int, tuple]]:
        """The playbook operations each curation reply (or single-call reflection) holds."""
        operations = []
        for r, text in replies:
            counts["curations"] += 1
            r.curation_reply = text
            ops = parse_operations(text)
            if ops is None:
                counts["curation_parse_failures"] += 1
            else:
                counts["curations_parsed"] += 1
                operations.append(
                    (
                        r.index,
                        (ops, LessonSource(r.item.prompt_text, r.score.feedback, r.item.answer)),
                    )
                )
        return operations

    def remember_solutions(self, rollouts: list[Rollout]) -> dict[str, str]:
        """This step's successes, from every process: into the solution buffer (RESD), and
        returned by item id as peers for SDPO's teacher."""
        wins = self.parallel.gather_indexed(
            [(r.index, (r.item.id, r.response)) for r in rollouts if r.success]
        )
        if self.algo.solution_buffer:
            for item_id, response in wins:
                self.buffer.add(item_id, response)
        return dict(reversed(wins))  # the first success per item

    def teacher_prompts(self, rollouts: list[Rollout], peers: dict[str, str]) -> None:
        """Render each rollout's teacher context and decide which rollouts are distilled."""
        playbook = self.view("teacher").text if self.algo.playbook else ""
        clip = self.clip
        for r in rollouts:
            ctx = teacher_context(self.algo, r, playbook=playbook, buffer=self.buffer, peers=peers,
                                  rollouts_per_prompt=self.cfg.rollouts_per_prompt,
                                  feedback_with_solution=self.cfg.teacher_feedback_with_solution)  # fmt: skip
            r.distill = ctx.distill
            r.teacher_prompt = self.template.render(
                prompt=clip(r.item.prompt_text), playbook=ctx.playbook, previous_trial=clip(ctx.previous_trial),
                feedback=clip(ctx.feedback), reflection=clip(ctx.reflection), successful_trial=clip(ctx.solution),
            )  # fmt: skip
            r.teacher_ids = self._chat(teacher_chat(r.item, r.teacher_prompt))
