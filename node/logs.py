"""Logging set-up shared by every process of the node: text lines for people, or one JSON object
per line for log collectors (``log_format``).

We log UIDs, counts and timings, never a patient's name, ID or birth date. The DICOM libraries
may quote a header value they find invalid, in a warning ("Invalid value for VR DA: '...'") or
in an exception ("Unable to convert '...' to 'DA' object"): their log messages, Python warnings
(routed through logging, so they are masked and, in JSON, are JSON too) and the tracebacks of
exceptions raised inside them have every quoted value masked.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
import threading
from types import TracebackType
from typing import Any

from node.config import LogFormat

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

#: Libraries that read headers and may quote their values in messages and exceptions.
DICOM_LIBRARIES = ("pydicom", "highdicom", "pynetdicom")
#: Loggers whose messages may quote header values: warnings, and the DICOM libraries.
_QUOTING_LOGGERS = ("py.warnings", *DICOM_LIBRARIES)
_QUOTED = re.compile(r"b?'[^'\n]*'|b?\"[^\"\n]*\"")
_MASK = "'***'"


def mask_quoted(text: str) -> str:
    """``text`` with every quoted value (``'...'``, ``"..."``, ``b'...'``) replaced by ``'***'``."""
    return _QUOTED.sub(_MASK, text)


def raised_in_dicom_library(exc: BaseException) -> bool:
    """True if ``exc``, or an exception it chains, was raised inside a DICOM library."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and any(f"{os.sep}{name}{os.sep}" in tb.tb_frame.f_code.co_filename for name in DICOM_LIBRARIES):
            return True
        current = current.__cause__ or current.__context__
    return False


def exception_message(exc: BaseException) -> str:
    """``str(exc)``, for a log line, a job's error or the study's timeline; masked when a DICOM
    library raised it (or an exception it chains)."""
    return mask_quoted(str(exc)) if raised_in_dicom_library(exc) else str(exc)


def _format_exception(formatter: logging.Formatter, ei: Any) -> str:
    text = logging.Formatter.formatException(formatter, ei)
    return mask_quoted(text) if ei[1] is not None and raised_in_dicom_library(ei[1]) else text


def _extras(record: logging.LogRecord) -> dict[str, object]:
    """The fields a call passed with ``extra=`` (study and job ids, counts, timings)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class _ExtrasFormatter(logging.Formatter):
    """The plain line, then the record's ``extra`` fields as key=value (UIDs, counts, timings)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return f"{line} {extras}" if extras else line

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _format_exception(self, ei)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``process`` (name), ``pid``, ``thread``, the ``extra`` fields, and ``exception`` (the
    traceback, masked when a DICOM library raised it) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            **_extras(record),
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return _format_exception(self, ei)


class MaskQuotedValues(logging.Filter):
    """Masks quoted values in messages of loggers that may echo header values (pydicom's
    "Invalid value for VR DA: '19230405'"); our own loggers never log such values."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(record.name == name or record.name.startswith(f"{name}.") for name in _QUOTING_LOGGERS):
            record.msg, record.args = mask_quoted(record.getMessage()), None
        return True


def configure_logging(level: str, fmt: LogFormat | str = LogFormat.TEXT) -> None:
    """Log to stderr at ``level`` as text or JSON lines; pynetdicom's chatter (which may echo
    headers) kept at WARNING. Uncaught exceptions are logged too, in either format: so every
    line is JSON with JSON, and a traceback quoting a header value is masked like any other."""
    handler = logging.StreamHandler()
    _log_uncaught_exceptions()
    if LogFormat(fmt) is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_ExtrasFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    handler.addFilter(MaskQuotedValues())
    logging.captureWarnings(True)
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _log_uncaught_exceptions() -> None:
    """Uncaught exceptions (main thread and others) as log records instead of bare tracebacks."""
    logger = logging.getLogger("spine_node.uncaught")

    def main_thread(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
            return
        logger.critical("uncaught exception", exc_info=(kind, value, tb))

    def other_thread(args: threading.ExceptHookArgs) -> None:
        if issubclass(args.exc_type, SystemExit) or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        logger.error("uncaught exception in thread %s", name, exc_info=args.exc_value)

    sys.excepthook = main_thread
    threading.excepthook = other_thread
