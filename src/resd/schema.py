"""Names shared by the files a run writes and the tools that read them.

Kept free of heavy imports so that `resd report` works without torch installed.
"""

# Phases timed in every step; metrics.jsonl has `time_<phase>` for each.
PHASES = ("rollout", "feedback", "reflect", "curate", "teacher", "update")

# Per-step counters of the reflection / curation machinery in metrics.jsonl.
COUNTERS = (
    "reflections",
    "reflection_parse_failures",
    "reflection_loose_parses",
    "tag_parse_failures",
    "curation_parse_failures",
    "tags_applied",
    "ops_applied",
    "ops_skipped",
)
