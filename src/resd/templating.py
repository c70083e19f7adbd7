"""Text handling for prompts: literal slot filling, clipping, reasoning removal.

Model replies and environment feedback routinely contain braces, `{prompt}` or text
that looks like our own section markers. `str.format` would choke on the braces, and
repeated `replace` calls would substitute into text inserted by an earlier slot.
`fill` scans the *template* once and never looks at inserted text again.
"""

from __future__ import annotations

import re
from pathlib import Path

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_SLOT = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def names_a_file(value: str) -> bool:
    """Whether a setting that takes a file or the text itself names an existing file.

    Text that no path can be is not looked up: a line of 4096 characters or more
    (PATH_MAX), or one with a newline. Linux raises "File name too long" for a component
    over 255 bytes rather than answer False, which here means text too.
    """
    if len(value) >= 4096 or "\n" in value:
        return False
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # a component past NAME_MAX; a NUL byte
        return False


def from_where(path: str | Path) -> str:
    """The words " (relative to the working directory D)" for a relative path, else "": a config's
    paths are read from where the command runs, not from the config file's folder, and a
    missing file's error says where it was looked for."""
    return "" if Path(path).is_absolute() else f" (relative to the working directory {Path.cwd()})"


def read_text_file(path: str | Path, what: str) -> str:
    """A file the user named for `what`, as UTF-8 text. A binary file, or text in another
    encoding, raised Python's UnicodeDecodeError, whose words ("'utf-8' codec can't decode
    byte 0x80 in position 1") name neither the file nor the setting."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{what}: {path} is not UTF-8 text (byte {exc.start} cannot be read: {exc.reason})"
        ) from None


def slots(template: str) -> list[str]:
    return _SLOT.findall(template)


def fill(template: str, values: dict[str, str], *, strict: bool = True) -> str:
    """Replace `{name}` slots by `values[name]` in one pass over the template.

    Unknown slots raise (strict) or stay as written. Braces that do not form a slot
    (JSON examples in a prompt) are left alone, so templates need no escaping.
    """

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in values:
            return values[name]
        if strict:
            raise KeyError(f"template slot {{{name}}} has no value")
        return match.group(0)

    return _SLOT.sub(sub, template)


def clip_tokens(text: str, max_tokens: int | None, tokenizer) -> str:
    """Bound untrusted text to `max_tokens` tokens of `tokenizer`, marking the cut.

    A cheap character cut first (no token is anywhere near 32 characters long), so that
    a reply of megabytes is not tokenized whole just to be thrown away.
    """
    if max_tokens is None or not text:
        return text
    text = text[: 32 * max_tokens]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[: max(1, max_tokens - 8)]).rstrip() + "\n…[truncated]"


def strip_thinking(text: str) -> str:
    """Remove `<think>…</think>` reasoning (and an unterminated trailing one).

    Reflection prompts and teacher contexts show the model's *answer*, not its
    scratchpad: the scratchpad is long and would crowd out the feedback.
    A lone `</think>` (templates that open the block in the prompt) cuts everything
    before it.
    """
    text = _THINK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()
