"""How studies look on a terminal (rich tables), for the CLI and the demo."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def studies_table(rows: list[dict[str, Any]]) -> Table:
    """The study list: one row per study with its state and counts."""
    table = Table("study", "state", "series", "instances", "updated")
    for row in rows:
        table.add_row(row["study_instance_uid"], row["state"], str(row["series"]), str(row["instances"]), row["updated_at"])
    return table


def print_study(study: dict[str, Any], console: Console) -> None:
    """A study for people: its series and roles, its jobs and its timeline."""
    console.print(f"[bold]{study['study_instance_uid']}[/bold]  state [bold]{study['state']}[/bold]"
                  + (f"  missing: {', '.join(study['missing_roles'])}" if study["missing_roles"] else ""))
    series = Table("#", "description", "role", "instances", "why", title="series")
    for s in study["series"]:
        series.add_row(str(s["series_number"] or ""), s["series_description"] or "", s["role"], str(s["instances"]), s["role_reason"])
    console.print(series)
    if study["jobs"]:
        jobs = Table("job", "kind", "state", "partial", "created", "finished", title="jobs")
        for j in study["jobs"]:
            jobs.add_row(str(j["id"]), j["kind"], j["state"], ", ".join(j["missing_roles"]) or "no", j["created_at"], j["finished_at"] or "")
        console.print(jobs)
    timeline = Table("at", "event", "by", "what", title="timeline")
    for e in study["timeline"]:
        timeline.add_row(e["at"], e["kind"], e["actor"], e["message"])
    console.print(timeline)
