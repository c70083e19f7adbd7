"""What the sanity check's reflections carried: the right value, the wrong one, whole sentences.

The sanity check (`benchmarks/sd_sanity.py`) trains on 8 multiplications whose feedback
quotes the student's wrong number beside the right one. With the lessons-only teacher
template, the reflection is the only way the right value reaches the teacher, so what the
reflections hold decides whether the teacher can teach. This script reads the runs'
`samples.jsonl` and `metrics.jsonl` and counts, per run:

- reflection replies logged, those that parsed into a reflection, and those that contain the item's right product or the student's
  wrong answer as the feedback quoted it (as whole numbers, so 5784 does not count for 57840);
- diagnosis fields parsed, fields that do not end a sentence (cut, or so ended by the
  model), characters per field;
- fields the sampler closed at their token deadline (`reflection_fields_cut`, when the
  run's code counted it);
- mean reflection tokens per step.

It reads finished run folders only and decodes nothing, so it runs in a second.

    python benchmarks/reflection_content.py runs/sd_sanity_lessons_only/resd-quote \
        runs/sd_sanity_lessons_only_tokens/resd-quote --json benchmarks/results/reflection_content.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

from resd.rundir import read_jsonl

FIELDS = ("error_identification", "root_cause_analysis", "correct_approach", "key_insight")
SENTENCE_ENDS = (".", "!", "?", ".'", '."', ".)", ".`")
ITEM = re.compile(r"(\d+)\s*\*\s*(\d+)")
QUOTED = re.compile(r"final answer (-?[\d,.]+?)\.? is wrong")  # the quoting feedback's wording


def _numbers(text: str) -> set[str]:
    """The whole numbers in `text`, thousands separators removed."""
    return {n.replace(",", "") for n in re.findall(r"\d[\d,]*\d|\d", text)}


def ends_mid_sentence(text: str) -> bool:
    """The text stops without ending a sentence: cut, or so ended by the model."""
    return not text.rstrip().endswith(SENTENCE_ENDS)


def count(run: Path) -> dict[str, Any]:
    """The counts above for one run folder."""
    replies = [s for s in read_jsonl(run / "samples.jsonl") if s.get("reflection_reply")]
    samples = [s for s in replies if s.get("reflection")]  # parsed into a reflection
    right = wrong = 0
    fields: dict[str, list[str]] = {k: [] for k in FIELDS}
    for s in samples:
        a, b = ITEM.search(s["item"]).groups()
        numbers = _numbers(s["reflection"])
        right += str(int(a) * int(b)) in numbers
        quoted = QUOTED.search(s["feedback"] or "")
        wrong += bool(quoted) and quoted.group(1).replace(",", "") in numbers
        try:
            reply = json.loads(s.get("reflection_reply") or "", strict=False)
        except json.JSONDecodeError:
            continue
        for k in FIELDS:
            if isinstance(reply.get(k), str):
                fields[k].append(reply[k])
    metrics = read_jsonl(run / "metrics.jsonl")
    texts = [t for v in fields.values() for t in v]
    cut = [m["reflection_fields_cut"] for m in metrics if "reflection_fields_cut" in m]
    return {
        "run": str(run),
        "replies": len(replies),
        "reflections": len(samples),
        "with_right_value": right,
        "with_wrong_value": wrong,
        "fields": len(texts),
        "fields_mid_sentence": sum(ends_mid_sentence(t) for t in texts),
        "fields_cut_at_deadline": sum(cut) if cut else None,
        "chars_per_field": {
            k: statistics.mean(map(len, v)) if v else 0.0 for k, v in fields.items()
        },
        "reflection_tokens_per_step": statistics.mean(
            m.get("reflection_tokens", 0) for m in metrics
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with samples.jsonl)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "samples.jsonl").is_file()]
    if missing:
        parser.error(f"no samples.jsonl in: {', '.join(missing)}")
    rows = [count(r) for r in args.runs]
    print(
        "| run | replies | reflections | right value | wrong value | fields | mid-sentence | cut at deadline | chars/field |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        chars = statistics.mean(r["chars_per_field"].values())
        cut = "–" if r["fields_cut_at_deadline"] is None else r["fields_cut_at_deadline"]
        print(f"| {r['run']} | {r['replies']} | {r['reflections']} | {r['with_right_value']} | {r['with_wrong_value']} "
              f"| {r['fields']} | {r['fields_mid_sentence']} | {cut} | {chars:.0f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
