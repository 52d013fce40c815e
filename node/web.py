"""The status page: studies with their state, one study's grades, key images and audit log, requeue.

Standard library only: a ``ThreadingHTTPServer`` on ``web_port`` behind HTTP Basic
authentication (``web_user`` and the password in ``web_password_file``). The pages show UIDs,
states and grades, never a patient's name or ID; every value is HTML-escaped and every response
is ``Cache-Control: no-store``. A requeue is a POST carrying a token the study page embeds (an
HMAC of the user and the study under a key made when the process starts), so another site
cannot make a logged-in browser requeue.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import html
import io
import logging
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pydicom
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from node.admin import NothingToDeliver, UnknownStudy, list_studies, requeue, result_objects, show_study
from node.audit import describe
from node.config import ConfigError, Settings
from node.schema import JobKind, StudyState

LOGGER = logging.getLogger(__name__)

_UID = r"([0-9]{1,64}(?:\.[0-9]{1,64}){0,63})"
STUDY_PATH = re.compile(rf"/studies/{_UID}")
KEY_IMAGE_PATH = re.compile(rf"/studies/{_UID}/key-images/{_UID}\.png")
REQUEUE_PATH = re.compile(rf"/studies/{_UID}/requeue")

#: The five conditions in table order, with the short names the CLI uses.
CONDITIONS = {"spinal_canal_stenosis": "SCS", "left_neural_foraminal_narrowing": "L-NFN",
              "right_neural_foraminal_narrowing": "R-NFN", "left_subarticular_stenosis": "L-SS",
              "right_subarticular_stenosis": "R-SS"}
#: Grade -> (label, CSS class); anything else is shown escaped with class "unknown".
GRADES = {"normal_mild": ("normal/mild", "normal"), "moderate": ("moderate", "moderate"), "severe": ("severe", "severe")}
MAX_FORM_BYTES = 4096
MAX_LISTED = 500
BANNER = "NOT FOR DIAGNOSTIC USE - research software"
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'",
}
STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.banner { background: #b00; color: #fff; font-weight: bold; padding: .4em .8em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .2em .6em; text-align: left; font-size: 90%; }
.grade { display: block; padding: .1em .3em; }
.normal { background: #d8f0d8; } .moderate { background: #fbe7a1; } .severe { background: #f5b7b1; }
.unknown { background: #ddd; }
img { max-width: 45%; margin: .3em; border: 1px solid #888; }
form { display: inline-block; margin-right: 1em; }
"""


class Html(str):
    """Markup that is already safe: table cells and pages escape every other value."""


class HttpProblem(Exception):
    """A request that ends in an error page with this status and message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Response:
    """What a request gets back; ``HEADERS`` are added to every response."""

    status: HTTPStatus
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class WebServer(ThreadingHTTPServer):
    """The status page's server; ``shutdown`` stops it and closes its socket."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sessions: sessionmaker[Session], storage_dir: Path, user: str,
                 password: str) -> None:
        super().__init__(address, StatusHandler)
        self.sessions = sessions
        self.storage_dir = storage_dir.resolve()
        self.user = user
        self._password = password.encode()
        self._key = secrets.token_bytes(32)  # CSRF tokens are valid while this process runs

    def authorised(self, header: str | None) -> bool:
        """True if ``header`` (Authorization) is HTTP Basic with our user and password."""
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, colon, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except ValueError:  # not base64 (binascii.Error) or not UTF-8
            return False
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        password_ok = hmac.compare_digest(password.encode(), self._password)
        return bool(colon) and user_ok and password_ok

    def token(self, study_instance_uid: str) -> str:
        """The CSRF token a requeue of this study must carry."""
        return hmac.new(self._key, f"{self.user}\0{study_instance_uid}".encode(), hashlib.sha256).hexdigest()

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        super().shutdown()
        self.server_close()


def start_web(settings: Settings, sessions: sessionmaker[Session]) -> WebServer:
    """Serve the status page on ``settings.host``:``settings.web_port`` from a daemon thread.

    Raises :class:`ConfigError` when ``web_password_file`` is unreadable or empty, and
    ``ValueError`` when the page is off (``web_port`` 0). Stop it with ``.shutdown()``.
    """
    if settings.web_port == 0 or settings.web_password_file is None:
        raise ValueError("the status page needs web_port and web_password_file")
    password = read_password(settings.web_password_file)
    server = WebServer((settings.host, settings.web_port), sessions, settings.storage_dir, settings.web_user, password)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="web", daemon=True).start()
    LOGGER.info("status page on http://%s:%d/", settings.host, server.server_address[1])
    return server


def read_password(path: Path) -> str:
    """The status page's password: the file's text without its final line break (the settings
    refuse a ``web_port`` without ``web_password_file``)."""
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"web_password_file: cannot read {path}: {exc}") from None
    if not password.strip():
        raise ConfigError(f"web_password_file: {path} holds no password")
    if path.stat().st_mode & 0o077:
        LOGGER.warning("web_password_file %s can be read by other users; chmod 600 it", path)
    return password


class StatusHandler(BaseHTTPRequestHandler):
    """One request: authenticate, route, answer; errors become error pages here and only here."""

    server: WebServer
    timeout = 30  # a client that stops sending loses its thread after this many seconds
    server_version = "spine-node"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        LOGGER.debug("status page %s: " + format, self.address_string(), *args)

    def _answer(self, method: str) -> None:
        try:
            response = self._route(method)
        except HttpProblem as exc:
            response = error_page(exc.status, str(exc))
        except UnknownStudy as exc:
            response = error_page(HTTPStatus.NOT_FOUND, str(exc))
        except NothingToDeliver as exc:
            response = error_page(HTTPStatus.CONFLICT, str(exc))
        except Exception:
            LOGGER.exception("status page: %s %s failed", method, urlsplit(self.path).path)
            response = error_page(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the node's log")
        self._send(response)

    def _route(self, method: str) -> Response:
        if not self.server.authorised(self.headers.get("Authorization")):
            if "Authorization" in self.headers:
                LOGGER.warning("status page: wrong credentials from %s", self.client_address[0])
            return error_page(HTTPStatus.UNAUTHORIZED, "log in to see the status page",
                              {"WWW-Authenticate": 'Basic realm="spine-node", charset="UTF-8"'})
        url = urlsplit(self.path)
        if method == "GET" and url.path == "/":
            return studies_page(self.server, url.query)
        if method == "GET" and (match := STUDY_PATH.fullmatch(url.path)):
            return study_page(self.server, match[1])
        if method == "GET" and (match := KEY_IMAGE_PATH.fullmatch(url.path)):
            return key_image(self.server, match[1], match[2])
        if method == "POST" and (match := REQUEUE_PATH.fullmatch(url.path)):
            return requeue_study(self.server, match[1], self._form())
        raise HttpProblem(HTTPStatus.NOT_FOUND, "no such page")

    def _form(self) -> dict[str, str]:
        """The POSTed form (application/x-www-form-urlencoded), first value of each field."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpProblem(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if not 0 <= length <= MAX_FORM_BYTES:
            raise HttpProblem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "form too large")
        fields = parse_qs(self.rfile.read(length).decode("utf-8", "replace"), keep_blank_values=True)
        return {name: values[0] for name, values in fields.items()}

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        headers = {**HEADERS, "Content-Type": response.content_type, "Content-Length": str(len(response.body)),
                   **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)


def studies_page(server: WebServer, query: str) -> Response:
    """``GET /[?state=S]``: every study (newest first) with state, counts and last change."""
    wanted = parse_qs(query).get("state", [""])[0]
    try:
        state = StudyState(wanted) if wanted else None
    except ValueError:
        raise HttpProblem(HTTPStatus.BAD_REQUEST, f"no study state {wanted!r}") from None
    studies = list_studies(server.sessions)
    counts = collections.Counter(s["state"] for s in studies)
    shown = [s for s in studies if state is None or s["state"] == state.value]
    links = [link("/", f"all ({len(studies)})")] + [link(f"/?state={s.value}", f"{s.value} ({counts[s.value]})") for s in StudyState]
    rows = [(link(study_url(s["study_instance_uid"]), s["study_instance_uid"]), s["state"], s["series"], s["instances"],
             when(s["updated_at"])) for s in shown[:MAX_LISTED]]
    more = f"<p>{MAX_LISTED} of {len(shown)} shown.</p>" if len(shown) > MAX_LISTED else ""
    body = (f"<h1>Studies</h1><p>{' | '.join(links)}</p>"
            + (table(("study", "state", "series", "instances", "updated (UTC)"), rows) if rows else "<p>No studies.</p>")
            + more)
    return Response(HTTPStatus.OK, page("spine-node studies", body))


def study_page(server: WebServer, study_instance_uid: str) -> Response:
    """``GET /studies/<uid>``: state, requeue, grades, key images, series, jobs, stages, deliveries, timeline, audit log."""
    study = show_study(server.sessions, study_instance_uid)
    images = [o["sop_instance_uid"] for o in result_objects(server.sessions, study_instance_uid) if o["kind"] == "SC"]
    missing = f" - missing: {esc(', '.join(study['missing_roles']))}" if study["missing_roles"] else ""
    body = "".join([
        f"<p>{link('/', 'all studies')}</p><h1>Study {esc(study_instance_uid)}</h1>",
        f"<p>state <b>{esc(study['state'])}</b>{missing}; updated {esc(when(study['updated_at']))} UTC</p>",
        requeue_forms(server, study_instance_uid),
        grades_section(study["result"]),
        key_images_section(study_instance_uid, images),
        "<h2>Series</h2>" + table(("#", "description", "role", "instances", "why"), [
            (s["series_number"], s["series_description"], s["role"], s["instances"], s["role_reason"]) for s in study["series"]]),
        "<h2>Jobs</h2>" + table(("job", "kind", "state", "attempts", "missing roles", "created (UTC)", "finished (UTC)", "error"), [
            (j["id"], j["kind"], j["state"], j["attempts"], ", ".join(j["missing_roles"] or []), when(j["created_at"]),
             when(j["finished_at"]), j["error"]) for j in study["jobs"]]),
        "<h2>Stage timings</h2>" + table(("job", "stage", "started (UTC)", "seconds", "ok"), [
            (st["job_id"], st["stage"], when(st["started_at"]), seconds(st["duration_s"]), "yes" if st["ok"] else "no")
            for st in study["stages"]]),
        "<h2>Deliveries</h2>" + table(("object", "destination", "via", "state", "attempts", "last status", "updated (UTC)"), [
            (d["sop_instance_uid"], d["destination"], d["via"], d["state"], d["attempts"], d["last_status"],
             when(d["updated_at"])) for d in study["deliveries"]]),
        "<h2>Timeline</h2>" + table(("at (UTC)", "event", "by", "what"), [
            (when(e["at"]), e["kind"], e["actor"], e["message"]) for e in study["timeline"]]),
        "<h2>Audit log</h2>" + table(("at (UTC)", "action", "by", "details"), [
            (when(a["at"]), a["action"], a["actor"], describe(a["details"])) for a in study["audit"]]),
    ])
    return Response(HTTPStatus.OK, page(f"spine-node study {study_instance_uid}", body))


def requeue_forms(server: WebServer, study_instance_uid: str) -> str:
    """Two POST forms (grade, deliver), each with the study's CSRF token."""
    action = esc(study_url(study_instance_uid) + "/requeue")
    token = esc(server.token(study_instance_uid))
    return "".join(
        f'<form method="post" action="{action}"><input type="hidden" name="token" value="{token}">'
        f'<input type="hidden" name="stage" value="{stage.value}"><button type="submit">Requeue from {stage.value}</button></form>'
        for stage in (JobKind.GRADE, JobKind.DELIVER)
    )


def grades_section(result: dict[str, Any] | None) -> str:
    """The grades table (levels x the five conditions, grade and its probability) and the warnings."""
    if not result:
        return "<h2>Grades</h2><p>No result yet.</p>"
    rows = [(level, *(grade_cell(lv.get("conditions", {}).get(c)) for c in CONDITIONS)) for level, lv in result.get("levels", {}).items()]
    warnings = "".join(f"<li>{esc(w)}</li>" for w in result.get("warnings", []))
    return ("<h2>Grades</h2>" + table(("level", *CONDITIONS.values()), rows)
            + (f"<h3>Warnings</h3><ul>{warnings}</ul>" if warnings else "<p>No warnings.</p>"))


def grade_cell(condition: dict[str, Any] | None) -> Html | str:
    """'moderate 0.71' coloured by grade, or '-' when the condition was not graded."""
    if not condition:
        return "-"
    grade = str(condition.get("grade"))
    label, css = GRADES.get(grade, (grade, "unknown"))
    probability = condition.get("probabilities", {}).get(grade)
    text = f"{label} {probability:.2f}" if isinstance(probability, (int, float)) else label
    return Html(f'<span class="grade {css}">{esc(text)}</span>')


def key_images_section(study_instance_uid: str, sop_instance_uids: Sequence[str]) -> str:
    """The key images (Secondary Captures of the newest result) as ``<img>`` elements."""
    if not sop_instance_uids:
        return "<h2>Key images</h2><p>No key images.</p>"
    images = "".join(f'<img src="{esc(key_image_url(study_instance_uid, sop))}" alt="key image {esc(sop)}">'
                     for sop in sop_instance_uids)
    return f"<h2>Key images</h2><div>{images}</div>"


def key_image(server: WebServer, study_instance_uid: str, sop_instance_uid: str) -> Response:
    """``GET /studies/<uid>/key-images/<sop>.png``: a key image of the study's newest result as PNG;
    any other SOP (not a result object of this study, or not a Secondary Capture) is 404."""
    found = [o for o in result_objects(server.sessions, study_instance_uid)
             if o["kind"] == "SC" and o["sop_instance_uid"] == sop_instance_uid]
    if not found:
        raise HttpProblem(HTTPStatus.NOT_FOUND, "no such key image")
    path = (server.storage_dir / found[0]["path"]).resolve()
    if not path.is_relative_to(server.storage_dir) or not path.is_file():
        LOGGER.warning("key image %s of study %s is not in storage", sop_instance_uid, study_instance_uid,
                       extra={"study_instance_uid": study_instance_uid})
        raise HttpProblem(HTTPStatus.NOT_FOUND, "key image file is missing")
    return Response(HTTPStatus.OK, png(path), "image/png")


def png(path: Path) -> bytes:
    """A Secondary Capture (RGB or greyscale, 8-bit; the first frame of a multi-frame one) as PNG."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def requeue_study(server: WebServer, study_instance_uid: str, form: dict[str, str]) -> Response:
    """``POST /studies/<uid>/requeue`` (token, stage=grade|deliver): a new job, audited as ``web:<user>`` (the
    authenticated user), then back to the study (303)."""
    if not hmac.compare_digest(form.get("token", "").encode(), server.token(study_instance_uid).encode()):
        raise HttpProblem(HTTPStatus.FORBIDDEN, "missing or wrong form token; reload the study page and try again")
    try:
        stage = JobKind(form.get("stage", ""))
    except ValueError:
        raise HttpProblem(HTTPStatus.BAD_REQUEST, "stage must be grade or deliver") from None
    actor = f"web:{server.user}"
    job = requeue(server.sessions, study_instance_uid, actor, stage)
    LOGGER.info("study %s requeued from %s by %s", study_instance_uid, stage.value, actor,
                extra={"study_instance_uid": study_instance_uid, "job_id": job["id"]})
    return Response(HTTPStatus.SEE_OTHER, b"", headers={"Location": study_url(study_instance_uid)})


def error_page(status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> Response:
    """A small page naming the status and the reason."""
    body = f"<h1>{status.value} {esc(status.phrase)}</h1><p>{esc(message)}</p><p>{link('/', 'all studies')}</p>"
    return Response(status, page(f"{status.value} {status.phrase}", body), headers=headers or {})


def page(title: str, body: str) -> bytes:
    """A whole HTML page with the not-for-diagnostic-use banner above and below ``body`` (already HTML)."""
    banner = f'<div class="banner">{esc(BANNER)}</div>'
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>{banner}{body}{banner}</body></html>").encode()


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An HTML table; cells are escaped unless they are :class:`Html`, and None is empty."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" if body else "<p>None.</p>"


def cell(value: object) -> str:
    """A table cell's content, escaped unless already :class:`Html`."""
    if isinstance(value, Html):
        return value
    return "" if value is None else esc(str(value))


def link(href: str, text: str) -> Html:
    """``<a href>`` with both parts escaped."""
    return Html(f'<a href="{esc(href)}">{esc(text)}</a>')


def esc(value: object) -> str:
    """HTML-escaped text, quotes included."""
    return html.escape(str(value), quote=True)


def study_url(study_instance_uid: str) -> str:
    """The path of a study's page."""
    return f"/studies/{quote(study_instance_uid, safe='')}"


def key_image_url(study_instance_uid: str, sop_instance_uid: str) -> str:
    """The path of one key image as PNG."""
    return f"{study_url(study_instance_uid)}/key-images/{quote(sop_instance_uid, safe='')}.png"


def when(iso: str | None) -> str:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM:SS' (UTC), or '' when not set."""
    return iso.replace("T", " ")[:19] if iso else ""


def seconds(value: float | None) -> str:
    """A duration in seconds with two decimals, or '' when unknown."""
    return f"{value:.2f}" if isinstance(value, (int, float)) else ""
