"""Splitting ``<think>...</think>`` out of generated text (the ``--reasoning-parser think`` option)."""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str, in_think: bool = False, final: bool = True) -> tuple[str | None, str]:
    """Split generated text into ``(reasoning, content)`` at ``<think>...</think>``.

    ``in_think``: the prompt already opened the think block (its template ends with ``<think>``).
    With ``final=False`` (streaming) a partial tag at the end is held back, so that successive calls
    on a growing text only ever extend both parts. ``reasoning`` is None when there is no think block.
    """
    s = text
    if not in_think:
        stripped = s.lstrip()
        if stripped.startswith(THINK_OPEN):
            s = stripped[len(THINK_OPEN):]
        elif not final and THINK_OPEN.startswith(stripped):
            return None, ""  # may still become "<think>"
        else:
            return None, text
    end = s.find(THINK_CLOSE)
    if end >= 0:
        return s[:end], s[end + len(THINK_CLOSE):].lstrip("\n")
    if not final:
        for k in range(len(THINK_CLOSE) - 1, 0, -1):
            if s.endswith(THINK_CLOSE[:k]):
                s = s[:-k]
                break
    return s, ""
