"""The delivery job: send a stored result to the configured destinations.

The DICOM result objects (TID 1500 SR, presentation states, key images) and their C-STORE are
not built yet; until they are, a delivery with destinations configured fails with that reason,
and one without destinations completes, leaving the result in the database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.db import transaction
from node.jobs import Claim, complete, hold
from node.schema import Event

if TYPE_CHECKING:
    from worker.tasks import Context


class DeliveryUnavailable(RuntimeError):
    """Destinations are configured but this version cannot build the objects to send them."""


def deliver_result(ctx: Context, held: Claim) -> None:
    """Complete the delivery job (no destinations) or fail it with the reason."""
    if ctx.settings.destinations:
        raise DeliveryUnavailable("sending results to PACS is not implemented in this version: "
                                  "the result stays in the database (spine-node show)")
    with transaction(ctx.sessions) as session:
        job = hold(session, held)
        complete(session, job)
        session.add(Event(study_id=held.study_id, kind="delivery", actor=ctx.actor,
                          message="no destinations configured: the result stays in the database",
                          details={"job_id": held.job_id, "result_id": held.result_id}))
