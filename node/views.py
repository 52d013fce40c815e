"""How studies look on a terminal (rich tables), for the CLI and the demo."""

from __future__ import annotations

from typing import Any

import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def make_console() -> Console:
    """A console that never cuts a UID: full width on a terminal, 240 columns when piped."""
    return Console(width=None if sys.stdout.isatty() else 240)


def studies_table(rows: list[dict[str, Any]]) -> Table:
    """The study list: one row per study with its state and counts."""
    table = Table("state", "series", "instances", "updated (UTC)", "study")
    table.columns[-1].no_wrap = True
    for row in rows:
        table.add_row(row["state"], str(row["series"]), str(row["instances"]), _when(row["updated_at"]),
                      escape(row["study_instance_uid"]))
    return table


def print_study(study: dict[str, Any], console: Console) -> None:
    """A study for people: its series and roles, its jobs and its timeline."""
    console.print(f"[bold]{escape(study['study_instance_uid'])}[/bold]  state [bold]{study['state']}[/bold]"
                  + (f"  missing: {', '.join(study['missing_roles'])}" if study["missing_roles"] else ""))
    series = Table("#", "description", "role", "instances", "why", title="series")
    for s in study["series"]:
        series.add_row(str(s["series_number"] or ""), escape(s["series_description"] or ""), s["role"], str(s["instances"]),
                       escape(s["role_reason"]))
    console.print(series)
    if study["jobs"]:
        jobs = Table("job", "kind", "state", "partial", "created (UTC)", "finished (UTC)", title="jobs")
        for j in study["jobs"]:
            jobs.add_row(str(j["id"]), j["kind"], j["state"], ", ".join(j["missing_roles"]) or "no", _when(j["created_at"]),
                     _when(j["finished_at"]))
        console.print(jobs)
    if study.get("stages"):
        stages = Table("job", "stage", "started (UTC)", "seconds", "ok", title="stages")
        for st in study["stages"]:
            stages.add_row(str(st["job_id"]), st["stage"], _when(st["started_at"]), f"{st['duration_s']:.2f}", "yes" if st["ok"] else "no")
        console.print(stages)
    if study.get("deliveries"):
        deliveries = Table("object", "destination", "via", "state", "attempts", "last status", title="deliveries")
        for d in study["deliveries"]:
            deliveries.add_row(d["sop_instance_uid"], escape(d["destination"]), escape(d["via"] or ""), d["state"],
                               str(d["attempts"]), escape(d["last_status"] or ""))
        console.print(deliveries)
    timeline = Table("at (UTC)", "event", "by", "what", title="timeline")
    for e in study["timeline"]:
        timeline.add_row(_when(e["at"]), e["kind"], escape(e["actor"]), escape(e["message"]))
    console.print(timeline)


def _when(iso: str | None) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM:SS.mmm' (UTC), compact for tables."""
    return iso.replace("T", " ")[:23] if iso else ""


def print_result(result: dict[str, Any], console: Console) -> None:
    """A grading result for people: levels with centre, confidence and views, then warnings."""
    console.print(f"[bold]{escape(result['study_instance_uid'])}[/bold]  (research use only, not for diagnosis)")
    short = {"spinal_canal_stenosis": "SCS", "left_neural_foraminal_narrowing": "L-NFN", "right_neural_foraminal_narrowing": "R-NFN",
             "left_subarticular_stenosis": "L-SS", "right_subarticular_stenosis": "R-SS"}
    levels = Table("level", "centre (LPS mm)", "confidence", "views", *short.values(), title="discs")
    for level, lv in result["levels"].items():
        views = ", ".join(f"{v['role']}" for v in lv["views"])
        grades = [_grade_cell(lv["conditions"].get(name)) for name in short]
        levels.add_row(level, ", ".join(f"{c:.1f}" for c in lv["center"]), f"{lv['confidence']:.2f}", views, *grades)
    console.print(levels)
    for w in result["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")


def _grade_cell(condition: dict[str, Any] | None) -> str:
    """'moderate 0.71': the grade and its probability, or '-' when not graded."""
    if not condition:
        return "-"
    return f"{condition['grade'].replace('normal_mild', 'normal/mild')} {condition['probabilities'][condition['grade']]:.2f}"
