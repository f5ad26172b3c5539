"""Making untrusted text safe to show to people (terminals and text logs).

Much of what the relay prints comes from peers: the ``sub`` a refused token
claims, a target name in a CONNECT line, a refusal a relay sent back.  Printed
raw, control characters in such text act on the reader's terminal (an ESC
sequence sets the window title or clears the screen) or forge output (a
``\\n`` followed by a whole fake log line), and Unicode bidi controls such as
U+202E reorder what is displayed.

:func:`escape_text` is the one helper every output meant for people goes
through: ``dbgrelay audit show``/``verify``, the text log format, the admin
tables and the connector's messages.  JSON output needs nothing more:
``json.dumps`` with its default ``ensure_ascii=True`` escapes all of these.
"""

from __future__ import annotations

__all__ = ["escape_text"]


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_text(value: object) -> str:
    """``str(value)`` with every non-printable character written as an escape.

    Non-printable is what :meth:`str.isprintable` says: C0 controls (``\\n``
    and ``\\t`` included), DEL, C1 controls, format characters (bidi
    overrides and isolates, zero-width characters), line and paragraph
    separators, spaces other than U+0020, surrogates, private-use and
    unassigned code points.  Each becomes ``\\n``, ``\\r``, ``\\t``,
    ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``, as Python's ``repr`` writes
    them.  The result is one line that shows the same on every terminal.
    Backslashes are kept as they are, so the output is not meant to be
    parsed back.

    Args:
        value: Anything; it is converted with ``str`` first.

    Returns:
        The escaped text (the same object when nothing needed escaping).
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)
