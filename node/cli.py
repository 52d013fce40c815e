"""``spine-node``: the one command line, and the composition root that wires the processes.

This is the one module of ``node`` that may import ``models`` and ``worker``; it does so inside
the subcommands that need them, so the node's own commands start without loading them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from node import audit
from node.admin import NothingToDeliver, UnknownStudy, list_studies, requeue, result_objects, retry_failed, show_study
from node.audit import AuditAction, local_actor
from node.config import ConfigError, Settings, load_settings, reference_markdown
from node.db import make_engine, make_sessionmaker, migrate
from node.demo import DemoParts, run_demo
from node.schema import JobKind, StudyState
from node.logs import configure_logging
from node.retention import PURGEABLE_STATES, PurgeReport, purge, retention_policy
from node.service import serve
from node.views import make_console, print_result, print_study, studies_table


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the settings once, run the subcommand; return the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"spine-node: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        return int(args.run(settings, args) or 0)
    except (UnknownStudy, NothingToDeliver) as exc:
        print(f"spine-node: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # found only when a part starts (e.g. the status page's password file)
        print(f"spine-node: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spine-node", description="DICOM AI node for lumbar spine MRI (research use only).")
    parser.add_argument("--config", type=Path, help="TOML settings file (SPINE_NODE_* variables override it)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    cmd = commands.add_parser("serve", help="receive studies, decide when they are ready, publish their jobs "
                              "(and, with no broker_url, grade them in this process)")
    cmd.set_defaults(run=_serve)

    cmd = commands.add_parser("worker", help="a Celery worker that grades and delivers (GPU when torch sees one)")
    cmd.add_argument("--queues", default="grade,deliver", help="queues to consume, comma separated (default grade,deliver)")
    cmd.add_argument("--concurrency", type=int, help="worker processes (default: one per GPU, or one on CPU)")
    cmd.set_defaults(run=_worker)

    cmd = commands.add_parser("studies", help="list studies and their states")
    cmd.add_argument("--state", type=StudyState, choices=list(StudyState), help="only studies in this state")
    cmd.add_argument("--json", action="store_true", help="print JSON")
    cmd.set_defaults(run=_studies)

    cmd = commands.add_parser("show", help="one study: series and roles, jobs, timeline, result, audit entries")
    cmd.add_argument("study_instance_uid")
    cmd.add_argument("--json", action="store_true", help="print JSON")
    cmd.set_defaults(run=_show)

    cmd = commands.add_parser("demo", help="the main job end to end on this machine (embedded defaults)")
    cmd.add_argument("--workdir", type=Path, default=Path("demo-out"), help="emptied and reused (default: demo-out)")
    cmd.set_defaults(run=_demo)

    cmd = commands.add_parser("phantom", help="write synthetic lumbar spine studies with ground truth")
    cmd.add_argument("--out", type=Path, required=True, help="output folder")
    cmd.add_argument("--studies", type=int, default=1, help="how many studies (default 1)")
    cmd.add_argument("--seed", type=int, default=0, help="same seed, same studies (default 0)")
    cmd.add_argument("--rsna", action="store_true", help="also write the RSNA 2024 layout and CSVs")
    cmd.add_argument("--enhanced", action="store_true", help="Enhanced MR multi-frame encoding")
    cmd.add_argument("--compression", choices=["jpeg-lossless", "jpeg-ls", "jpeg2000", "rle"], help="compress pixel data")
    cmd.add_argument("--reverse-order", action="store_true", help="InstanceNumber runs against slice position")
    cmd.add_argument("--omit", default="", help="roles to leave out, comma separated (e.g. T2_AX,STIR_SAG)")
    cmd.add_argument("--axial", choices=["random", "single", "multi"], default="random",
                     help="axial T2 as one stack, one stack per disc, or either at random")
    cmd.add_argument("--randomize", action="store_true", help="domain randomisation (random contrast, noise, artefacts)")
    cmd.set_defaults(run=_phantom)

    cmd = commands.add_parser("phantom-sheet", help="PNG contact sheet of one phantom study with its ground truth")
    cmd.add_argument("study_dir", type=Path)
    cmd.add_argument("--out", type=Path, required=True, help="PNG file to write")
    cmd.set_defaults(run=_phantom_sheet)

    cmd = commands.add_parser("grade", help="find the discs of a folder holding one study and grade them, offline")
    cmd.add_argument("folder", type=Path, help="folder of DICOM files (searched recursively)")
    cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    cmd.add_argument("--debug-dir", type=Path, help="write debug PNGs here (ROIs, axial intersections, crops)")
    cmd.add_argument("--detector", type=Path, help="detector weights (default: the shipped ones)")
    cmd.add_argument("--grader", type=Path, help="grader weights (default: the shipped ones)")
    cmd.set_defaults(run=_grade)

    cmd = commands.add_parser("train-detector", help="train the disc detector on phantoms and/or RSNA-format data")
    cmd.add_argument("--out", type=Path, default=None, help="weights file (default: the shipped models/weights/detector.safetensors)")
    cmd.add_argument("--workdir", type=Path, default=Path("var/train-detector"), help="where phantom studies are rendered")
    cmd.add_argument("--studies", type=int, default=120, help="phantom studies to train on (default 120; 0 for none)")
    cmd.add_argument("--seed", type=int, default=1, help="phantom seed of the training studies (default 1)")
    cmd.add_argument("--rsna", type=Path, help="an RSNA 2024 layout to train on as well (canal points of sagittal T2/STIR)")
    cmd.add_argument("--steps", type=int, default=1500, help="optimisation steps (default 1500)")
    cmd.add_argument("--batch", type=int, default=16, help="slices per step (default 16)")
    cmd.add_argument("--eval-studies", type=int, default=20, help="held-out phantom studies for the model card (default 20)")
    cmd.add_argument("--eval-seed", type=int, default=9001, help="seed of the held-out studies, never a training seed (default 9001)")
    cmd.set_defaults(run=_train_detector)

    cmd = commands.add_parser("evaluate-detector", help="detection and extraction metrics on held-out phantom studies")
    cmd.add_argument("--studies", type=int, default=20, help="how many studies (default 20)")
    cmd.add_argument("--seed", type=int, default=9001, help="phantom seed, never one used in training (default 9001)")
    cmd.add_argument("--twins", type=int, default=2, help="studies re-rendered per encoding for the robustness check (default 2; 0 skips)")
    cmd.add_argument("--workdir", type=Path, default=Path("var/evaluate-detector"), help="where the studies are rendered")
    cmd.add_argument("--detector", type=Path, help="detector weights (default: the shipped ones)")
    cmd.set_defaults(run=_evaluate_detector)

    cmd = commands.add_parser("train", help="train the stenosis grader on an RSNA 2024 layout (real or phantom)")
    cmd.add_argument("--data", type=Path, required=True, help="RSNA 2024 layout: train.csv, train_series_descriptions.csv, train_images/")
    cmd.add_argument("--cache", type=Path, help="where the disc volumes are cached (default: DATA/../disc-cache)")
    cmd.add_argument("--workdir", type=Path, default=Path("var/train-grader"), help="checkpoints, for --resume (default var/train-grader)")
    cmd.add_argument("--out", type=Path, default=None, help="weights file (default: the shipped models/weights/grader.safetensors)")
    cmd.add_argument("--preset", choices=["paper", "cpu"], default="paper", help="paper's configuration (default) or the small CPU one")
    cmd.add_argument("--epochs", type=_positive, help="override the preset's epochs")
    cmd.add_argument("--restart", type=_positive, help="override the preset's cosine restart period (epochs); set it to --epochs for one cycle")
    cmd.add_argument("--batch", type=_positive, help="override the preset's batch size")
    cmd.add_argument("--size", type=_slice_size, help="slice size fed to the encoder, HxW (override the preset's; crops are 112x224)")
    cmd.add_argument("--seed", type=int, help="seed of the split, the initialisation and the augmentations (default 0)")
    cmd.add_argument("--inputs", help="volumes used, comma separated among T1_SAG,T2_SAG,T2_AX (Table 2 rows 2-7; default all)")
    cmd.add_argument("--aggregate", choices=["transformer", "attention"], help="attention: the paper's single-sequence baselines (rows 2-4)")
    cmd.add_argument("--conditions", help="train only these heads' losses, comma separated (single-task baselines; default all five)")
    cmd.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    cmd.add_argument("--workers", type=int, default=2, help="processes building the disc cache (default 2)")
    cmd.add_argument("--resume", action="store_true", help="continue the last run from its checkpoint")
    cmd.add_argument("--init", type=Path, help="start from these grader weights (same preset, options and split) instead of a random initialisation")
    cmd.set_defaults(run=_train)

    cmd = commands.add_parser("evaluate", help="the paper's tables for one or more trained graders on their test split")
    cmd.add_argument("--cache", type=Path, required=True, help="the disc cache the graders were trained from")
    cmd.add_argument("--weights", type=Path, action="append", required=True, help="grader weights (repeat for Table 2 rows)")
    cmd.add_argument("--json", action="store_true", help="print the reports as JSON")
    cmd.set_defaults(run=_evaluate)

    cmd = commands.add_parser("config", help="print the configuration reference (Markdown)")
    cmd.set_defaults(run=lambda settings, args: print(reference_markdown(), end=""))

    cmd = commands.add_parser("requeue", help="grade or deliver a study again (supersedes jobs not yet started)")
    cmd.add_argument("study_instance_uid")
    cmd.add_argument("--from-stage", type=JobKind, choices=list(JobKind), default=JobKind.GRADE, metavar="{grade,deliver}",
                     help="grade: grade the study as it is now (default); deliver: send the newest result again")
    cmd.set_defaults(run=_requeue)

    cmd = commands.add_parser("render", help="PNGs of a study's key images and of each presentation state applied to its images")
    cmd.add_argument("study_instance_uid")
    cmd.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    cmd.set_defaults(run=_render)

    cmd = commands.add_parser("retry-failed", help="requeue every FAILED study from the stage that failed")
    cmd.set_defaults(run=_retry_failed)

    cmd = commands.add_parser("purge", help="delete studies past their retention (never one whose results were not delivered)")
    cmd.add_argument("--older-than", type=float, metavar="DAYS",
                     help="days since a study's last change (default: the configured retention_days, per state)")
    cmd.add_argument("--state", choices=[s.value for s in PURGEABLE_STATES], action="append",
                     help="only studies in this state (repeat for more; default: "
                          f"{', '.join(s.value for s in PURGEABLE_STATES)}; work in progress is never purged)")
    cmd.add_argument("--dry-run", action="store_true", help="list what would be purged, and what is kept and why; delete nothing")
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    cmd.set_defaults(run=_purge)

    cmd = commands.add_parser("audit", help="export the audit log (requeues, retries, purges, configuration changes: "
                              "who, what, when), oldest first")
    cmd.add_argument("--since", type=_utc_time, metavar="ISO", help="only entries at or after this time (ISO 8601; UTC unless "
                     "it carries an offset)")
    cmd.add_argument("--study", metavar="UID", help="only entries of this study (also after it was purged)")
    cmd.add_argument("--action", type=AuditAction, choices=list(AuditAction), metavar="{" + ",".join(a.value for a in AuditAction) + "}",
                     help="only entries of this action")
    cmd.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="one JSON object per line (default), or CSV")
    cmd.set_defaults(run=_audit)
    return parser


def _utc_time(text: str) -> dt.datetime:
    """An ISO 8601 time from the command line, timezone-aware (UTC when it names no offset)."""
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serve(settings, stop, run_job=_embedded_runner(settings))
    return 0


def _embedded_runner(settings: Settings) -> Any:
    """With no broker, the worker's job runner for the node's in-process executor."""
    if settings.broker_url:
        return None
    from worker.tasks import Context

    return Context(settings, actor="embedded").run


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.app import run_worker

    try:
        run_worker(settings, [q for q in args.queues.split(",") if q], args.concurrency)
    except ValueError as exc:
        print(f"spine-node: {exc}", file=sys.stderr)
        return 2
    return 0


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from models.data.phantom import generate

    from worker.render import render_result_objects

    parts = DemoParts(lambda folder: generate(folder, studies=1, seed=0, progress=False, axial="single")[0],
                      _embedded_runner, render_result_objects)
    return run_demo(parts, args.workdir, make_console())


def _phantom(settings: Settings, args: argparse.Namespace) -> int:
    from models.data.phantom import generate

    folders = generate(args.out, args.studies, args.seed, rsna=args.rsna, enhanced=args.enhanced,
                       compression=args.compression, reverse_order=args.reverse_order, omit=args.omit,
                       axial=args.axial, randomize=args.randomize)
    print(f"{len(folders)} studies written to {args.out}")
    return 0


def _phantom_sheet(settings: Settings, args: argparse.Namespace) -> int:
    from models.data.phantom import write_contact_sheet

    print(f"contact sheet written to {write_contact_sheet(args.study_dir, args.out)}")
    return 0


def _grade(settings: Settings, args: argparse.Namespace) -> int:
    from models.detect import DEFAULT_WEIGHTS, Detector
    from models.grade import DEFAULT_GRADER, GraderModel, WeightsMismatch
    from worker.pipeline import StudyError, analyse_folder, result_json

    try:
        grader = GraderModel.load(args.grader or DEFAULT_GRADER)
        analysis = analyse_folder(args.folder, Detector.load(args.detector or DEFAULT_WEIGHTS), grader, settings.device_uid)
    except (StudyError, FileNotFoundError, WeightsMismatch) as exc:
        print(f"spine-node: {exc}", file=sys.stderr)
        return 1
    result = result_json(analysis)
    if args.debug_dir:
        from models.debug_pictures import write_debug_pictures

        write_debug_pictures(args.debug_dir, analysis.volumes(), analysis.study)
    if args.json:
        _print_json(result)
    else:
        print_result(result, make_console())
    return 0


def _train_detector(settings: Settings, args: argparse.Namespace) -> int:
    from models.detect import DEFAULT_WEIGHTS
    from models.detector_card import train_and_card

    try:
        path = train_and_card(args.out or DEFAULT_WEIGHTS, args.workdir, args.studies, args.seed, args.rsna, args.steps, args.batch, args.eval_studies, args.eval_seed)
    except (ValueError, FileNotFoundError) as exc:
        print(f"spine-node: {exc}", file=sys.stderr)
        return 2
    print(f"detector weights written to {path} (model card beside them)")
    return 0


def _evaluate_detector(settings: Settings, args: argparse.Namespace) -> int:
    from models.data.phantom import generate
    from models.detect import DEFAULT_WEIGHTS, Detector
    from models.evaluate_detector import evaluate, twins

    detector = Detector.load(args.detector or DEFAULT_WEIGHTS)
    dirs = generate(args.workdir / "held-out", args.studies, args.seed, axial="random", randomize=False)
    report = {"seed": args.seed, **evaluate(dirs, detector)}
    if args.twins:
        report["twins"] = twins(args.workdir / "twins", args.seed, args.twins, detector)
    _print_json(report)
    return 0


def _positive(text: str) -> int:
    """A whole number of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _slice_size(text: str) -> tuple[int, int]:
    """``HxW`` as a pair of integers, each at least 16 pixels (argparse type)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, e.g. 112x224") from None
    if height < 16 or width < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be at least 16 pixels")
    return height, width


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from models.grader_card import SLOT_NAMES, train_and_card

    overrides: dict[str, Any] = {k: v for k, v in (("epochs", args.epochs), ("restart", args.restart), ("batch", args.batch), ("size", args.size), ("seed", args.seed)) if v is not None}
    if args.inputs:
        unknown = set(args.inputs.split(",")) - set(SLOT_NAMES)
        if unknown:
            print(f"spine-node: unknown inputs {sorted(unknown)}; choose among {', '.join(SLOT_NAMES)}", file=sys.stderr)
            return 2
        overrides["slots"] = tuple(sorted(SLOT_NAMES[i] for i in args.inputs.split(",")))
    if args.conditions:
        from models.data.pathology import CONDITIONS

        wanted = tuple(c for c in CONDITIONS if c in args.conditions.split(","))
        if len(wanted) != len(args.conditions.split(",")):
            print(f"spine-node: unknown conditions in {args.conditions!r}; choose among {', '.join(CONDITIONS)}", file=sys.stderr)
            return 2
        overrides["conditions"] = wanted
    from models.grade import DEFAULT_GRADER, WeightsMismatch

    out = args.out or DEFAULT_GRADER
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        path = train_and_card(args.data, args.cache or args.data.parent / "disc-cache", args.workdir, out, args.preset, overrides,
                              {"aggregate": args.aggregate} if args.aggregate else {}, device, args.resume, args.workers,
                              "spine-node " + " ".join(sys.argv[1:]), args.init)
    except (WeightsMismatch, FileNotFoundError) as exc:  # --init weights that do not fit this run
        print(f"spine-node: {exc}", file=sys.stderr)
        return 2
    print(f"grader weights written to {path} (model card, report and figures beside them)")
    return 0


def _evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from models.grader_card import evaluate_weights

    reports, tables = evaluate_weights(args.cache, args.weights)
    if args.json:
        _print_json(reports)
    else:
        print(tables)
    return 0


def _sessions(settings: Settings) -> Any:
    migrate(settings.database_url)
    return make_sessionmaker(make_engine(settings.database_url))


def _studies(settings: Settings, args: argparse.Namespace) -> int:
    rows = list_studies(_sessions(settings), args.state)
    if args.json:
        _print_json(rows)
        return 0
    make_console().print(studies_table(rows))
    return 0


def _show(settings: Settings, args: argparse.Namespace) -> int:
    study = show_study(_sessions(settings), args.study_instance_uid)
    if args.json:
        _print_json(study)
        return 0
    console = make_console()
    print_study(study, console)
    _print_audit(study["audit"], console)
    return 0


def _print_audit(entries: list[dict[str, Any]], console: Console) -> None:
    """A study's audit entries for people (``show``): when, what, who, details."""
    if not entries:
        return
    table = Table("at (UTC)", "action", "by", "details", title="audit log")
    for e in entries:
        table.add_row(e["at"], e["action"], escape(e["actor"]), escape(audit.describe(e["details"])))
    console.print(table)


def _requeue(settings: Settings, args: argparse.Namespace) -> int:
    job = requeue(_sessions(settings), args.study_instance_uid, actor=local_actor("cli"), from_stage=args.from_stage)
    print(f"requeued {args.study_instance_uid} from {args.from_stage.value}: job {job['id']} written")
    return 0


def _render(settings: Settings, args: argparse.Namespace) -> int:
    from worker.render import render_result_objects

    objects = result_objects(_sessions(settings), args.study_instance_uid)
    if not objects:
        print(f"spine-node: study {args.study_instance_uid} has no result objects yet", file=sys.stderr)
        return 1
    written = render_result_objects([settings.storage_dir / o["path"] for o in objects],
                                    settings.storage_dir / args.study_instance_uid, args.out)
    for path in written:
        print(path)
    return 0


def _retry_failed(settings: Settings, args: argparse.Namespace) -> int:
    jobs = retry_failed(_sessions(settings), actor=local_actor("cli"))
    for job in jobs:
        print(f"requeued {job['study_instance_uid']} from {job['kind']}: job {job['id']} written")
    print(f"{len(jobs)} failed studies requeued")
    return 0


def _purge(settings: Settings, args: argparse.Namespace) -> int:
    if args.older_than is not None and args.older_than < 0:
        print("spine-node: --older-than must not be negative", file=sys.stderr)
        return 2
    states = [StudyState(s) for s in args.state] if args.state else list(PURGEABLE_STATES)
    if args.older_than is None:
        policy = {s: days for s, days in retention_policy(settings).items() if s in states}
    else:
        policy = {s: args.older_than for s in states}
    report = purge(settings, _sessions(settings), policy, dry_run=args.dry_run, actor=local_actor("cli"))
    if args.json:
        _print_json(report.as_json())
        return 0
    _print_purge(report, policy, make_console())
    return 0


def _audit(settings: Settings, args: argparse.Namespace) -> int:
    rows = audit.entries(_sessions(settings), args.since, args.study, args.action)
    (audit.write_csv if args.format == "csv" else audit.write_jsonl)(rows, sys.stdout)
    return 0


def _print_purge(report: PurgeReport, policy: dict[StudyState, float], console: Console) -> None:
    """The purge report for people: what went (or would go), what was kept and why."""
    def size(n: int) -> str:
        for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
            if n >= 2**shift:
                return f"{n / 2**shift:.1f} {unit}"
        return f"{n} bytes"

    if not policy:
        console.print("no retention configured (retention_days) and no --older-than given: nothing to purge")
    verb = "would purge" if report.dry_run else "purged"
    console.print(f"{verb} {report.studies} studies, {report.instances} instances, {size(report.bytes_freed)}")
    if report.interrupted:
        console.print(f"{report.interrupted} interrupted purges {'to finish' if report.dry_run else 'finished'}")
    if report.purged:
        gone = Table("state", "age (days)", "instances", "result objects", "size", "missing files", "study", title=verb)
        gone.columns[-1].no_wrap = True
        for p in report.purged:
            gone.add_row(p.state, f"{p.age_days:.1f}", str(p.instances), str(p.result_objects), size(p.bytes),
                         str(p.files_missing), p.study_instance_uid)
        console.print(gone)
    if report.kept:
        kept = Table("state", "age (days)", "why kept", "study", title="kept")
        kept.columns[-1].no_wrap = True
        for k in report.kept:
            kept.add_row(k.state, f"{k.age_days:.1f}", escape(k.reason), k.study_instance_uid)
        console.print(kept)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
