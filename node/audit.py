"""The audit log: every admin action (requeue, retry-failed, purge, configuration change at start)
with who, what and when, in an append-only table that outlives the studies it names.

:func:`record` adds a row inside the caller's transaction, so an action and its audit row commit
(or roll back) together; an action that changes nothing (a dry run) records nothing. Rows hold
UIDs, states, counts and settings, never a patient's name or ID; settings are recorded with the
password of every URL masked (a password file is recorded by its path, never its contents).
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import getpass
import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from typing import Any, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import reading, transaction
from node.schema import AuditEntry

LOGGER = logging.getLogger(__name__)

#: Columns of an exported entry, in order (the header of ``spine-node audit --format csv``).
FIELDS = ("id", "at", "actor", "action", "study_instance_uid", "details")

#: What replaces a secret in the recorded settings.
MASK = "***"

#: URL query parameters whose values are masked (matched as parts of the lower-case name).
SECRET_PARAMETERS = ("password", "secret", "token")


class AuditAction(str, enum.Enum):
    """What an audit entry records."""

    REQUEUE = "requeue"
    RETRY_FAILED = "retry-failed"
    PURGE = "purge"
    CONFIG = "config"  # the settings a start runs with differ from the last start's


def local_actor(role: str) -> str:
    """``<role>:<os user>@<host>``: who acts from this machine (``cli`` for commands, ``node`` for a start)."""
    return f"{role}:{_os_user()}@{socket.gethostname()}"


def _os_user() -> str:
    """The login name, or ``uid<n>`` where the user has none (a container run under an arbitrary uid)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def record(session: Session, actor: str, action: AuditAction, study_instance_uid: str | None = None, **details: Any) -> None:
    """Add one audit entry to ``session``'s transaction, so it commits with the action it records."""
    session.add(AuditEntry(actor=actor, action=action.value, study_instance_uid=study_instance_uid, details=details))


def query(since: dt.datetime | None = None, study_instance_uid: str | None = None,
          action: AuditAction | None = None) -> Select[AuditEntry]:
    """SELECT the entries matching every filter given (``since``: timezone-aware), oldest first."""
    stmt = select(AuditEntry).order_by(AuditEntry.at, AuditEntry.id)
    if since is not None:
        stmt = stmt.where(AuditEntry.at >= since)
    if study_instance_uid is not None:
        stmt = stmt.where(AuditEntry.study_instance_uid == study_instance_uid)
    if action is not None:
        stmt = stmt.where(AuditEntry.action == action.value)
    return stmt


def as_json(entry: AuditEntry) -> dict[str, Any]:
    """One entry as ``show --json`` and the export write it (the keys of :data:`FIELDS`)."""
    return {"id": entry.id, "at": entry.at.isoformat(), "actor": entry.actor, "action": entry.action,
            "study_instance_uid": entry.study_instance_uid, "details": entry.details}


def entries(sessions: sessionmaker[Session], since: dt.datetime | None = None, study_instance_uid: str | None = None,
            action: AuditAction | None = None) -> Iterator[dict[str, Any]]:
    """The entries matching every filter given, oldest first, streamed (the log may be long)."""
    with reading(sessions) as session:
        for entry in session.scalars(query(since, study_instance_uid, action).execution_options(yield_per=500)):
            yield as_json(entry)


def write_jsonl(rows: Iterable[dict[str, Any]], out: TextIO) -> None:
    """One JSON object per line."""
    for row in rows:
        out.write(json.dumps(row, sort_keys=True) + "\n")


def write_csv(rows: Iterable[dict[str, Any]], out: TextIO) -> None:
    """CSV (RFC 4180) with a header of :data:`FIELDS`; ``details`` as a JSON string."""
    writer = csv.DictWriter(out, FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "details": json.dumps(row["details"], sort_keys=True)})


def describe(details: dict[str, Any]) -> str:
    """Details for a table cell: ``key=value`` pairs, values that are not plain text as JSON."""
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, sort_keys=True)}" for k, v in details.items())


def settings_snapshot(settings: Settings) -> dict[str, Any]:
    """The settings as JSON, the password of every ``*_url`` masked; file paths are kept as they are."""
    return {key: _masked(key, value) for key, value in settings.model_dump(mode="json").items()}


def _masked(key: str, value: Any) -> Any:
    """``value`` with :func:`mask_url` applied to every string under a key ending in ``_url``."""
    if isinstance(value, dict):
        return {k: _masked(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(key, v) for v in value]
    return mask_url(value) if key.endswith("_url") and isinstance(value, str) else value


def mask_url(url: str) -> str:
    """``url`` with its password and its password/secret/token query values replaced by :data:`MASK`."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can take apart: record none of it
        return MASK
    params = parse_qsl(parts.query, keep_blank_values=True)
    secret = [name for name, _ in params if any(s in name.lower() for s in SECRET_PARAMETERS)]
    if password is None and not secret:
        return url  # unchanged (urlunsplit would rewrite sqlite:/// URLs)
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{MASK}@{host}"
    masked = urlencode([(name, MASK if name in secret else value) for name, value in params], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=masked))


def changed_keys(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two snapshots (added and removed keys included), sorted."""
    missing = object()
    return sorted(k for k in previous.keys() | current.keys() if previous.get(k, missing) != current.get(k, missing))


def record_config(sessions: sessionmaker[Session], settings: Settings, actor: str) -> list[str]:
    """At start: record the settings when they differ from those the last start recorded.

    The entry lists the changed keys, their previous values and the whole new (masked) snapshot,
    which the next start compares against; the first start records every key, marked initial.
    Returns the changed keys (empty: nothing changed, nothing recorded).
    """
    snapshot = settings_snapshot(settings)
    with transaction(sessions) as session:
        last = session.scalars(select(AuditEntry.details).where(AuditEntry.action == AuditAction.CONFIG.value)
                               .order_by(AuditEntry.id.desc()).limit(1)).first()
        previous: dict[str, Any] = last["settings"] if last else {}
        changed = changed_keys(previous, snapshot)
        if changed:
            record(session, actor, AuditAction.CONFIG, initial=last is None, changed=changed,
                   previous={k: previous[k] for k in changed if k in previous}, settings=snapshot)
    if last is None:
        LOGGER.info("configuration recorded in the audit log (first start)", extra={"actor": actor})
    elif changed:
        LOGGER.info("configuration changed since the last start: %s", ", ".join(changed), extra={"actor": actor})
    return changed
