"""Names shared by the files a run writes and the tools that read them.

Kept free of heavy imports so that `resd report` works without torch installed.
"""

# Phases timed in every step; metrics.jsonl has `time_<phase>` for each.
PHASES = ("rollout", "feedback", "reflect", "curate", "teacher", "update")

# Per-step counters of the reflection / curation machinery in metrics.jsonl.
COUNTERS = (
    "reflections",
    "reflections_parsed",  # a whole JSON object with diagnostic fields (not the fallback)
    "reflection_parse_failures",
    "reflection_loose_parses",
    "reflection_truncated",  # cut at reflection_max_new_tokens
    "reflections_raw",  # unparsed replies handed on as raw text (unparsed_reflection: raw)
    "tag_replies",
    "tag_parse_failures",
    "curations",
    "curations_parsed",  # a reply whose operation list could be read
    "curation_parse_failures",
    "curation_truncated",
    "curations_effective",  # curation replies of which at least one operation was applied
    "reflection_tokens",  # tokens generated for reflections, success tags and curation
    "tag_tokens",
    "curation_tokens",
    "tags_applied",
    "ops_applied",
    "ops_skipped",
)

# Why curator operations were skipped (`ops_skipped_<reason>` in metrics.jsonl): the
# playbook's own checks, then the content guards of `resd.guards`.
SKIP_REASONS = (
    "malformed",
    "not_allowed",
    "unknown_id",
    "empty",
    "duplicate",
    "too_short",
    "copies_task",
    "copies_feedback",
    "leaks_answer",
)

# Who reads the playbook, each under its own token budget (`<reader>_playbook_tokens`);
# `playbook_omitted_<reader>` counts the entries left out of that reader's view.
PLAYBOOK_READERS = ("reflection", "curation", "teacher")
