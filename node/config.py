"""The node's one settings object: a TOML file overridden by ``SPINE_NODE_*`` variables.

Loaded once at start-up (:func:`load_settings`) and passed down; nothing reads the
environment after that.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, Field, FilePath, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[ -~]*[!-~][ -~]*$")]

#: Smallest max_pdu_size other than 0 (unlimited): dcmtk's lower bound, room for a command set.
MIN_PDU_SIZE = 4096

#: Default device UID of a node; every installation should set its own (README, Configuration).
DEFAULT_DEVICE_UID = "2.25.275007925420094128946313392911826340931"


class ConfigError(ValueError):
    """Start-up configuration is invalid; the message names the offending key."""


class LogFormat(str, enum.Enum):
    """How log lines are written."""

    TEXT = "text"
    JSON = "json"


#: Study states retention can name (the values of node.schema.StudyState).
StudyStateName = Literal["RECEIVING", "READY", "INCOMPLETE", "GRADING", "GRADED", "DELIVERED", "FAILED"]


class IncompletePolicy(str, enum.Enum):
    """What to do when ``study_timeout_s`` passes with a series role still missing."""

    GRADE_PARTIAL = "grade_partial"
    MARK_INCOMPLETE = "mark_incomplete"


class Caller(BaseModel):
    """One allowed calling peer: its AE title and, optionally, the host it must call from."""

    ae_title: AETitle
    host: str | None = None

    def admits(self, ae_title: str, host: str) -> bool:
        """True if a peer calling as ``ae_title`` from ``host`` matches this entry."""
        return ae_title.strip() == self.ae_title.strip() and self.host in (None, "", host)


class TLSSettings(BaseModel):
    """DICOM TLS for the SCP (and the SCU, for destinations that ask for it)."""

    cert_file: FilePath
    key_file: FilePath
    ca_file: FilePath | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _client_certs_need_a_ca(self) -> "TLSSettings":
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs client certificates)")
        return self


class Peer(BaseModel):
    """A DICOM peer we send to: AE title, address, whether it wants TLS (with the ``tls``
    settings), and whether stored instances are confirmed by C-FIND."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    confirm: bool = True  # after C-STORE, check by C-FIND that the peer holds what it acknowledged

    @property
    def key(self) -> str:
        """``AE@host:port``: how deliveries name the peer."""
        return f"{self.ae_title}@{self.host}:{self.port}"


class Destination(Peer):
    """A peer that receives our result objects over C-STORE, with an optional alternate that
    takes over when the destination's attempts run out."""

    alternate: Peer | None = None


class Settings(BaseSettings):
    """Every setting of the node; see README "Configuration" for the reference table."""

    model_config = SettingsConfigDict(
        env_prefix="SPINE_NODE_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    ae_title: AETitle = Field("SPINENODE", description="Our AE title; associations calling another are rejected.")
    host: str = Field("0.0.0.0", description="Address the SCP listens on.")
    port: int = Field(11112, ge=0, le=65535, description="TCP port of the SCP (0 picks a free one).")
    database_url: str = Field("sqlite:///var/spine-node.db", description="SQLAlchemy URL; SQLite (embedded) or PostgreSQL.")
    storage_dir: Path = Field(Path("var/storage"), description="Where received instances are stored, as received.")
    broker_url: str = Field("", description="Celery broker (Redis) URL; empty runs grading in-process (embedded mode).")
    allowed_callers: list[Caller] = Field(default_factory=list, description="Calling AE title (+ host) allowlist: list of tables with ae_title and optional host; empty admits every caller.")
    max_associations: int = Field(16, ge=1, le=1000, description="Most simultaneous associations per receiver process.")
    receivers: int = Field(1, ge=1, le=64, description="Receiving processes; with more than one, the main process hands each connection to the least busy.")
    max_pdu_size: int = Field(1048576, ge=0, le=2**32 - 1, description="Largest P-DATA-TF PDU (bytes) the SCP announces and accepts; a peer sending a longer one is aborted. 0 = unlimited (pynetdicom's meaning).")
    max_instance_bytes: int = Field(2**30, ge=0, description="Largest instance (encoded dataset, bytes) accepted; a larger one gets 0xA700 and leaves nothing behind. 0 = unlimited.")
    quiet_period_s: float = Field(30.0, ge=0, description="Seconds without new instances before a complete study is READY.")
    study_timeout_s: float = Field(600.0, gt=0, description="Seconds after the last instance before an incomplete study is decided.")
    incomplete_policy: IncompletePolicy = Field(IncompletePolicy.GRADE_PARTIAL, description="At timeout with a role missing: grade what is there, or mark the study INCOMPLETE.")
    job_lease_s: float = Field(60.0, ge=1, description="A running job's lease; a worker renews it every third of it, and the node returns the job when it lapses (worker gone).")
    job_max_attempts: int = Field(3, ge=1, le=100, description="Attempts of a job (transient errors, vanished workers) before it is FAILED.")
    job_retry_backoff_s: float = Field(10.0, ge=0, description="Delay before a job's second attempt after a transient error; doubles per attempt, at most an hour.")
    grade_time_limit_s: float = Field(600.0, ge=10, description="Hard time limit of one grading task (Celery); the soft limit is 90 % of it.")
    min_free_disk_mb: int = Field(1024, ge=0, description="Refuse new instances (0xA700) when the storage disk has less free space.")
    tls: TLSSettings | None = Field(None, description="DICOM TLS for the SCP: table with cert_file, key_file, ca_file, require_client_cert (env: SPINE_NODE_TLS__CERT_FILE, ...); absent = plain TCP.")
    destinations: list[Destination] = Field(default_factory=list, description="Where result objects are sent: list of tables with ae_title, host, port, tls, confirm (C-FIND check, default true), and an optional alternate table (same keys).")
    delivery_retry_s: float = Field(30.0, ge=0, description="Delay before an object's second C-STORE attempt; doubles per attempt, at most an hour.")
    delivery_max_attempts: int = Field(10, ge=1, le=1000, description="C-STORE attempts per object at a destination (then at its alternate) before it is dead-lettered.")
    device_uid: str = Field(DEFAULT_DEVICE_UID, pattern=r"^[0-2](\.(0|[1-9][0-9]*))+$", max_length=64, description="Our device UID, stamped on our result objects so we never take them as inputs.")
    uid_root: str = Field("2.25", pattern=r"^[0-2](\.(0|[1-9][0-9]*))*$", max_length=40, description="UID root for the objects we create.")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Python logging level.")
    log_format: LogFormat = Field(LogFormat.TEXT, description="Log lines as text for people, or one JSON object per line for log collectors.")
    metrics_port: int = Field(0, ge=0, le=65535, description="HTTP port of the node's /metrics (Prometheus) and /healthz; 0 turns it off.")
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="HTTP port of a worker's /metrics and /healthz; 0 turns it off.")
    web_port: int = Field(0, ge=0, le=65535, description="HTTP port of the status page (studies, grades, key images, requeue); 0 turns it off.")
    web_user: str = Field("admin", min_length=1, max_length=64, description="User name for the status page (HTTP Basic authentication).")
    web_password_file: FilePath | None = Field(None, description="File holding the status page's password; the page does not start without one.")
    retention_days: dict[StudyStateName, float] = Field(default_factory=dict, description="Days to keep a study's files and rows after its last change, per state (e.g. DELIVERED = 30); a state not listed is kept forever, and a study whose results are not delivered is never purged.")

    @field_validator("storage_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("max_pdu_size")
    @classmethod
    def _pdu_holds_a_fragment(cls, value: int) -> int:
        if 0 < value < MIN_PDU_SIZE:
            raise ValueError(f"must be 0 (unlimited) or at least {MIN_PDU_SIZE} bytes")
        return value

    @model_validator(mode="after")
    def _web_page_needs_a_password(self) -> "Settings":
        if self.web_port and self.web_password_file is None:
            raise ValueError("web_port needs web_password_file (the status page is never served without a password)")
        return self

    @model_validator(mode="after")
    def _study_timeout_after_quiet(self) -> "Settings":
        if self.study_timeout_s < self.quiet_period_s:
            raise ValueError("study_timeout_s must not be shorter than quiet_period_s")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, then the environment, then the TOML file."""
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read ``config_file`` (TOML, optional), then ``SPINE_NODE_*`` variables, then ``overrides``.

    Raises :class:`ConfigError` naming every bad key, so start-up stops with a clear message.
    """
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        file_config = {**Settings.model_config, "toml_file": config_file}
        settings_cls = cast(type[Settings], type("Settings", (Settings,), {"model_config": file_config}))
    try:
        loaded = settings_cls(**overrides)
        return loaded if settings_cls is Settings else Settings(**loaded.model_dump())
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except ValueError as exc:  # a TOML syntax error, or JSON in a variable that does not parse
        raise ConfigError(f"{config_file}: {exc}" if config_file else str(exc)) from None


def _describe(exc: ValidationError) -> str:
    """One line per bad key, named as in the TOML file (``destinations.0.port``)."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "config"
        value = error.get("input")
        shown = f" (got {value!r})" if isinstance(value, (str, int, float)) and key != "config" else ""
        lines.append(f"{key}: {error['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def reference_markdown() -> str:
    """The configuration reference as a Markdown table, generated from :class:`Settings`.

    README.md embeds it; a test keeps the two identical.
    """
    rows = ["| key | environment variable | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        if isinstance(default, enum.Enum):
            default = default.value
        shown = "(none)" if default is None else f"`{default if isinstance(default, (str, Path)) and default != '' else repr(default)}`"
        rows.append(f"| `{name}` | `SPINE_NODE_{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows) + "\n"
