"""Text from an experiment made safe to print on a terminal.

Experiment output is written by code nobody reviewed. Printed raw, an escape sequence can set the clipboard
(OSC 52), clear the screen, retitle the window or move the cursor to overwrite what nightlab printed, and a
carriage return or backspace can hide part of a line. `terminal_safe` keeps the words and drops the rest.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(
    # Strings a terminal swallows up to BEL or ST (OSC, DCS, SOS, PM, APC); an unended one ends with the line.
    r"\x1b[\]PX^_][^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"
    # Control sequences: ESC [ parameters, intermediates, final byte (colours, cursor moves, clears).
    r"|\x1b\[[0-?]*[ -/]*[@-~]"
    # Other escapes: ESC, intermediates, final byte (charset switches, resets, keypad modes).
    r"|\x1b[ -/]*[0-~]"
    # What is left: C0 controls but tab and newline, DEL, C1 controls, and the invisible marks that reorder
    # text on screen (bidirectional embeddings, overrides and isolates).
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def terminal_safe(text: str) -> str:
    """`text` without escape sequences or control characters, tab and newline kept.

    A carriage return ends a line as a newline does (as Python's universal newlines read it), so text
    printed after one shows on its own line instead of overwriting the text before it."""
    if text.isprintable():  # nothing to drop (no control or format character): the common case, fast
        return text
    return _UNSAFE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
