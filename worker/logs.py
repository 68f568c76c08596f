"""The worker's log lines: one a record, nothing an outsider sent written raw.

Job ids, model names and error texts in a log line can come from whoever wrote the message.
Every handler Celery sets up gets :class:`EscapeControls`: control characters (a newline
above all) in a record's message and in its exception's text come out as escapes, so no
sender can start a log line of their own. With ``BATCHERY_LOG_FORMAT=json``, handlers also
write one JSON object a line.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from celery import signals


def escape(text: str) -> str:
    """``text`` with every non-printable character (newline, escape, ...) as an escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _exception_lines(te: traceback.TracebackException) -> list[str]:
    """A traceback as Python prints it, with each exception's own text escaped."""
    lines: list[str] = []
    if te.__cause__ is not None:
        lines += _exception_lines(te.__cause__)
        lines.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif te.__context__ is not None and not te.__suppress_context__:
        lines += _exception_lines(te.__context__)
        lines.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    if te.stack:
        lines += ["Traceback (most recent call last):\n", *te.stack.format()]
    lines.append(escape("".join(te.format_exception_only()).rstrip("\n")) + "\n")
    return lines


class EscapeControls(logging.Filter):
    """Escapes control characters in a record's message and exception text (never drops)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = escape(message), ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            te = traceback.TracebackException(*record.exc_info)
            record.exc_text = "".join(_exception_lines(te)).rstrip("\n")
        return True


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "processName": "process",
                       "name": "logger"},
    )  # fmt: skip


def set_up(log_format: str) -> None:
    """Have every handler Celery sets up escape control characters (and write JSON)."""
    as_json = log_format == "json"

    def on_setup(logger: logging.Logger, **_: Any) -> None:
        """Fields of a JSON line: time, level, process, logger, message, and what a line
        adds (a batch's ``job_ids``, ``batch_size``, ``models``, ``failed``)."""
        formatter = _json_formatter() if as_json else None
        for handler in logger.handlers:
            if not any(isinstance(f, EscapeControls) for f in handler.filters):
                handler.addFilter(EscapeControls())
            if formatter is not None:
                handler.setFormatter(formatter)

    signals.after_setup_logger.connect(on_setup, weak=False)
    signals.after_setup_task_logger.connect(on_setup, weak=False)
