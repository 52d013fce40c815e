"""The delivery job: a result's DICOM objects to every configured destination over C-STORE.

Each (object, destination) is a Delivery row. Each run opens one association per peer and
sends every row that is due; a success or warning status, confirmed by a C-FIND for the
instance when the peer allows one (``confirm``), marks the row SENT; anything else counts an
attempt and schedules the next (``delivery_retry_s`` doubling, at most an hour).
When a row's attempts at its destination run out it moves to the destination's alternate,
if one is configured, with fresh attempts; when those run out too it is DEAD, the dead letter
that ``show`` lists and ``retry-failed`` sends again. A peer that does not take a
Comprehensive 3D SR gets the result's Comprehensive SR twin, and the row says so. Every
attempt is counted by peer and outcome (``spine_node_delivery_attempts_total``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.association import Association
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import Destination, Peer, Settings
from node.db import reading, transaction
from node.jobs import Claim, complete, fail, hold, reschedule, set_study_state
from node.metrics import DELIVERY_ATTEMPTS, JOB_LATENCY
from node.schema import Delivery, DeliveryState, Event, JobKind, ResultObject, StudyState, utcnow
from node.scu import AssociationFailed, Sent, StudyRootFind, associate, client_ssl_context, context_of, held_by_peer, send_one

if TYPE_CHECKING:
    from worker.tasks import Context

LOGGER = logging.getLogger(__name__)

SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
#: Object kinds sent to destinations; "SR-2D" is the Comprehensive SR twin, sent only in place of the SR.
DELIVERED_KINDS = ("SR", "PR", "SC")


class NothingToSend(RuntimeError):
    """The result has no DICOM objects (made before objects existed): another attempt cannot help."""


@dataclass(frozen=True)
class Outcome:
    """What one C-STORE of one row gave: success, the status text, and a fallback if one was used."""

    ok: bool
    status: str
    fallback: str | None = None


def retry_delay(settings: Settings, attempts: int) -> dt.timedelta:
    """``delivery_retry_s`` doubling per attempt, at most an hour."""
    return dt.timedelta(seconds=min(settings.delivery_retry_s * 2 ** max(attempts - 1, 0), 3600.0))


def deliver_result(ctx: Context, held: Claim) -> str:
    """Send what is due, record each outcome, then finish, wait for the next attempt, or fail;
    returns which: "done", "waiting" or "failed"."""
    settings = ctx.settings
    if not settings.destinations:
        with transaction(ctx.sessions) as session:
            complete(session, hold(session, held))
            session.add(Event(study_id=held.study_id, kind="delivery", actor=ctx.actor,
                              message="no destinations configured: the result stays in the database",
                              details={"job_id": held.job_id, "result_id": held.result_id}))
        return "done"
    objects = _objects(ctx, held)
    _plan(ctx, held, objects, settings.destinations)
    peers = {d.key: d for d in settings.destinations} | {d.alternate.key: d.alternate for d in settings.destinations if d.alternate}
    with reading(ctx.sessions) as session:
        due = session.scalars(select(Delivery).where(
            Delivery.result_id == held.result_id, Delivery.state == DeliveryState.PENDING.value,
            (Delivery.next_attempt_at.is_(None)) | (Delivery.next_attempt_at <= utcnow()))).all()
    by_peer: dict[str, list[Delivery]] = {}
    for row in due:
        by_peer.setdefault(row.via or row.destination, []).append(row)
    for key, rows in by_peer.items():
        peer = peers.get(key)
        outcomes = _send(ctx, held, peer, rows, objects) if peer else {r.id: Outcome(False, f"{key} is no longer configured") for r in rows}
        _record(ctx, held, rows, outcomes, settings)
    return _finish(ctx, held)


def _objects(ctx: Context, held: Claim) -> dict[str, ResultObject]:
    """The result's objects by kind and by SOP Instance UID (the SR twin under "SR-2D")."""
    with reading(ctx.sessions) as session:
        rows = session.scalars(select(ResultObject).where(ResultObject.result_id == held.result_id)).all()
    if not rows:
        raise NothingToSend(f"result {held.result_id} has no DICOM objects to deliver; requeue the study from grade")
    return {r.sop_instance_uid: r for r in rows} | {"SR-2D": r for r in rows if r.kind == "SR-2D"}


def _plan(ctx: Context, held: Claim, objects: dict[str, ResultObject], destinations: Sequence[Destination]) -> None:
    """A PENDING row for every (object, destination) that has none yet (new destinations included)."""
    sendable = {r.sop_instance_uid for r in objects.values() if r.kind in DELIVERED_KINDS}
    with transaction(ctx.sessions) as session:
        have = set(session.execute(select(Delivery.destination, Delivery.sop_instance_uid).where(
            Delivery.result_id == held.result_id)).all())
        for destination in destinations:
            for sop in sorted(sendable):
                if (destination.key, sop) not in have:
                    session.add(Delivery(study_id=held.study_id, result_id=held.result_id, destination=destination.key,
                                         via=destination.key, sop_instance_uid=sop, state=DeliveryState.PENDING.value))


def _send(ctx: Context, held: Claim, peer: Peer, rows: Sequence[Delivery], objects: dict[str, ResultObject]) -> dict[int, Outcome]:
    """One association to ``peer`` for all ``rows``; every row's outcome (all failed if it cannot connect)."""
    twin = objects.get("SR-2D")
    files = [objects[r.sop_instance_uid] for r in rows] + ([twin] if twin else [])
    with ctx.storage.local_files([o.path for o in files]) as paths:
        path_of = {o.sop_instance_uid: p for o, p in zip(files, paths)}
        contexts = {context_of(p) for p in paths}  # each file goes out in the transfer syntax it was written in
        if peer.confirm:
            contexts.add((StudyRootFind, ExplicitVRLittleEndian))
        try:
            assoc = associate(peer.host, peer.port, peer.ae_title, ctx.settings.ae_title, contexts,
                              client_ssl_context(ctx.settings) if peer.tls else None)
        except (AssociationFailed, ValueError) as exc:
            return {r.id: Outcome(False, str(exc)) for r in rows}
        try:
            courier = _Courier(assoc, held.study_instance_uid, path_of, peer)
            out = {}
            for row in rows:
                obj = objects[row.sop_instance_uid]
                outcome = courier.store(obj)
                if obj.sop_class_uid == SR_3D and not outcome.ok and twin is not None:
                    fallback = courier.store(twin)
                    outcome = Outcome(fallback.ok, f"{fallback.status} as Comprehensive SR {twin.sop_instance_uid} "
                                                   f"(Comprehensive 3D SR: {outcome.status})", twin.sop_instance_uid)
                out[row.id] = outcome
            return out
        finally:
            if assoc.is_established:
                assoc.release()


@dataclass
class _Courier:
    """Stores objects on one association and confirms each by C-FIND when the peer allows it."""

    assoc: Association
    study_instance_uid: str
    path_of: dict[str, Path]
    peer: Peer

    def store(self, obj: ResultObject) -> Outcome:
        if not any(str(cx.abstract_syntax) == obj.sop_class_uid for cx in self.assoc.accepted_contexts):
            return Outcome(False, f"SOP class {obj.sop_class_uid} not accepted")
        sent = send_one(self.assoc, self.path_of[obj.sop_instance_uid])
        if not sent.ok or not self.peer.confirm:
            return Outcome(sent.ok, _status(sent))
        try:
            held = held_by_peer(self.assoc, self.study_instance_uid, [obj.sop_instance_uid])
        except AssociationFailed as exc:
            return Outcome(False, f"{_status(sent)} but not confirmed: {exc}")
        if held is None:
            return Outcome(True, f"{_status(sent)} (not confirmed: the peer offers no C-FIND)")
        if obj.sop_instance_uid not in held:
            return Outcome(False, f"{_status(sent)} but not held by the peer (C-FIND): it was discarded")
        return Outcome(True, f"{_status(sent)}, confirmed by C-FIND")


def _status(sent: Sent) -> str:
    """A C-STORE outcome as text: the status in hex with the peer's comment, or the local error."""
    if sent.status is None:
        return f"no status: {sent.error}"
    return f"0x{sent.status:04X}" + (f" {sent.error}" if sent.error else "")


def _record(ctx: Context, held: Claim, rows: Sequence[Delivery], outcomes: dict[int, Outcome], settings: Settings) -> None:
    """Write each row's outcome: SENT, the next attempt, the alternate, or DEAD; events for the timeline."""
    now = utcnow()
    alternates = {d.key: d.alternate for d in settings.destinations}
    counted: list[tuple[str, str]] = []  # (peer, outcome), counted once the rows are committed
    with transaction(ctx.sessions) as session:
        for row in rows:
            outcome = outcomes[row.id]
            fresh = session.get(Delivery, row.id, with_for_update=True)
            assert fresh is not None
            fresh.attempts += 1
            fresh.last_status = f"{fresh.via}: {outcome.status}"[:4000]
            peer = str(fresh.via or fresh.destination)
            if outcome.ok:
                fresh.state, fresh.next_attempt_at = DeliveryState.SENT.value, None
                counted.append((peer, "fallback" if outcome.fallback else "sent"))
                if outcome.fallback:
                    _event(session, held, "delivery-fallback", f"{fresh.via}: {outcome.status}", fresh)
            elif fresh.attempts < settings.delivery_max_attempts:
                fresh.next_attempt_at = now + retry_delay(settings, fresh.attempts)
                counted.append((peer, "failed"))
            elif fresh.via == fresh.destination and alternates.get(fresh.destination) is not None:
                alternate = alternates[fresh.destination]
                assert alternate is not None
                fresh.via, fresh.attempts, fresh.next_attempt_at = alternate.key, 0, None
                counted.append((peer, "alternate"))
                _event(session, held, "delivery-alternate", f"{fresh.destination} failed {settings.delivery_max_attempts} times "
                                                            f"({outcome.status}); sending to {alternate.key}", fresh)
            else:
                fresh.state, fresh.next_attempt_at = DeliveryState.DEAD.value, None
                counted.append((peer, "dead"))
                _event(session, held, "delivery-dead", f"gave up on {fresh.via} after {fresh.attempts} attempts: {outcome.status}", fresh)
    for peer, result in counted:
        DELIVERY_ATTEMPTS.labels(peer=peer, outcome=result).inc()


def _event(session: Session, held: Claim, kind: str, message: str, row: Delivery) -> None:
    session.add(Event(study_id=held.study_id, kind=kind, actor="worker", message=message,
                      details={"job_id": held.job_id, "sop_instance_uid": row.sop_instance_uid, "destination": row.destination}))


def _finish(ctx: Context, held: Claim) -> str:
    """All SENT: DONE and the study DELIVERED; some DEAD and none waiting: FAILED; else wait."""
    with reading(ctx.sessions) as session:
        rows = session.scalars(select(Delivery).where(Delivery.result_id == held.result_id)).all()
    states = [r.state for r in rows]
    if states and all(s == DeliveryState.SENT.value for s in states):
        with transaction(ctx.sessions) as session:
            job = hold(session, held)
            complete(session, job)
            set_study_state(session, held.study_id, StudyState.DELIVERED, (StudyState.GRADED,))
            session.add(Event(study_id=held.study_id, kind="delivered", actor=ctx.actor,
                              message=f"{len(rows)} objects stored at {len({r.destination for r in rows})} destinations",
                              details={"job_id": held.job_id, "result_id": held.result_id}))
        JOB_LATENCY.labels(kind=JobKind.DELIVER.value).observe((utcnow() - job.created_at).total_seconds())
        return "done"
    waiting = [r.next_attempt_at or utcnow() for r in rows if r.state == DeliveryState.PENDING.value]
    if waiting:
        when = min(waiting)
        with transaction(ctx.sessions) as session:
            reschedule(session, hold(session, held), when,
                       f"{len(waiting)} of {len(rows)} objects not stored yet; next attempt at {when.isoformat(timespec='seconds')}",
                       ctx.actor)
        return "waiting"
    dead = sum(s == DeliveryState.DEAD.value for s in states)
    fail(ctx.sessions, held, f"{dead} of {len(rows)} objects dead-lettered (spine-node show lists them)", True, ctx.policy, ctx.actor)
    return "failed"
