"""The SQL schema of the node (SQLAlchemy 2): studies, series, instances, jobs, results,
deliveries, the append-only events table that is each study's timeline, and the append-only
audit log of admin actions, which outlives the studies it names.

States are stored as short strings and checked as enums in Python, so adding a state needs
no migration. Every timestamp is timezone-aware UTC.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is always timezone-aware UTC, also on SQLite (which stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


class StudyState(str, enum.Enum):
    """Where a study is in its life; `spine-node studies --state` filters on these."""

    RECEIVING = "RECEIVING"  # instances arriving, or waiting for the quiet period / roles
    READY = "READY"  # a grading job is written (outbox), waiting for a worker
    INCOMPLETE = "INCOMPLETE"  # timed out with a role missing, policy mark_incomplete
    GRADING = "GRADING"
    GRADED = "GRADED"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class JobKind(str, enum.Enum):
    """What a job does; each kind has its own Celery queue."""

    GRADE = "grade"
    DELIVER = "deliver"


class JobState(str, enum.Enum):
    """A job's state machine: PENDING -> QUEUED -> RUNNING -> DONE | FAILED; CANCELLED when superseded."""

    PENDING = "PENDING"  # written, not yet handed to a broker (the outbox)
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class Base(DeclarativeBase):
    """Declarative base with constraint names that Alembic can render on every database."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Study(Base):
    """One study, keyed by its StudyInstanceUID."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING.value, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Series(Base):
    """One series, with the role we decided for it and why."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    role_reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    """One stored instance: where its bytes are and when they arrived."""

    __tablename__ = "instances"
    __table_args__ = (Index(None, "study_id", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    path: Mapped[str] = mapped_column(String(512))  # relative to storage_dir
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    """A unit of work for a worker (the outbox): one grading or delivery of one study.

    ``input_key`` names the exact input (for grading: the instances present), so the same input
    never gets two jobs, however often the readiness check or a requeue runs. ``result_id`` is
    the result a grading job produced (or found already made) and the one a delivery sends.
    """

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("study_id", "kind", "input_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value, index=True)
    input_key: Mapped[str] = mapped_column(String(128))
    partial: Mapped[bool] = mapped_column(Boolean, default=False)
    missing_roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    last_instance_id: Mapped[int | None] = mapped_column(Integer)  # grading: the newest instance it covers
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id", ondelete="SET NULL", use_alter=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))  # the lease holder: host:pid:token
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # retry backoff: not dispatched earlier
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    queued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    study: Mapped[Study] = relationship(back_populates="jobs")


class Result(Base):
    """The grading result of one job, as the JSON document of DESIGN.md.

    ``input_key`` hashes the series used (and their instances) with the model's weights, so a
    redelivered or requeued grading of the same input finds this row instead of adding one.
    """

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("study_id", "input_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    input_key: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ResultObject(Base):
    """One DICOM object made from a result (SR, its Comprehensive SR twin, presentation state,
    key image), stored under ``storage_dir/results``; deliveries send these files."""

    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # SR, SR-2D (fallback twin), PR, SC
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    path: Mapped[str] = mapped_column(String(512))  # relative to storage_dir
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeliveryState(str, enum.Enum):
    """One object at one destination: waiting (maybe after a backoff), stored there, or given up."""

    PENDING = "PENDING"
    SENT = "SENT"
    DEAD = "DEAD"  # attempts used up at the destination and its alternate: the dead letter


class Delivery(Base):
    """One result object sent (or to be sent) to one destination (``via``: the peer in use now,
    the destination or, after its attempts ran out, its alternate)."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_id", "destination", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(128))  # AE@host:port
    via: Mapped[str | None] = mapped_column(String(128))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Event(Base):
    """One line of a study's timeline (append-only; never updated or deleted by the node)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[str] = mapped_column(String(255), default="node")


class AuditEntry(Base):
    """One admin action (node.audit.AuditAction): who, what, when, and its details as JSON.

    Append-only (the migration adds triggers that refuse UPDATE and DELETE). The study is named
    by its UID, not a foreign key, so a purge keeps the audit trail of the study it deletes.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255))  # cli:<os user>@<host>, web:<user>, retention, node:<os user>@<host>
    action: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
