"""Error types the command line turns into one line on stderr, and the helpers that format them.

Every mistake a user can make (an option, a data file, a checkpoint, an output
place) raises a subclass of :class:`UsageError` whose message names the option
or file and says what was expected; ``icl`` prints it as one line and exits with
:data:`EXIT_USAGE`. Anything else is a fault of the program or the machine: one
line too, exit 1, and the traceback with ``--debug`` (and in ``OUT/error.log``
for training runs).
"""
from __future__ import annotations

import re
from typing import Tuple

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(ValueError):
    """A user's input (option, data, checkpoint, output place) cannot be used; the message says why."""


class ConfigError(UsageError):
    """A configuration value is invalid; the message names the option."""


# DataLoader workers send their exceptions back as "Caught X in DataLoader worker
# process N.\nOriginal Traceback (most recent call last):\n ... \nmodule.X: message".
_WORKER_HEAD = re.compile(r"^Caught (\w+) in DataLoader worker process (\d+)\.")
_TRACEBACK = "Original Traceback (most recent call last):"


def unwrap_worker_message(message: str) -> Tuple[str, bool]:
    """The original message of an exception re-raised from a DataLoader worker, and
    whether ``message`` was such a wrapped one. The worker's traceback is dropped."""
    if _TRACEBACK not in message:
        return message, False
    tail = message.split(_TRACEBACK, 1)[1]
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    # the exception line is the last one not indented (tracebacks indent frames and source lines)
    start = None
    for i in range(len(lines) - 1, -1, -1):
        if not lines[i].startswith(" "):
            start = i
            break
    if start is None:
        return " ".join(message.split()), True
    text = " ".join(ln.strip() for ln in lines[start:])
    # "icl.data.io.DataError: path: reason" -> "path: reason"
    m = re.match(r"^[\w.]+(?:Error|Exception|Warning|Interrupt|Exit)\b:\s*(.*)$", text)
    if m:
        text = m.group(1)
    return text, True


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (worker tracebacks unwrapped, whitespace collapsed)."""
    msg, _ = unwrap_worker_message(str(exc))
    return " ".join(msg.split())


def or_list(names) -> str:
    """``a``, ``a or b``, ``a, b or c``: the alternatives an error message offers."""
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
