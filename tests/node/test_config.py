"""Settings: TOML file, SPINE_NODE_* overrides, and start-up stopping on a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import ConfigError, IncompletePolicy, load_settings


def test_defaults_are_embedded_mode() -> None:
    settings = load_settings()
    assert settings.broker_url == ""
    assert settings.database_url.startswith("sqlite:///")
    assert settings.allowed_callers == []


def test_toml_then_environment_then_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'ae_title = "FROMFILE"\nport = 1104\nquiet_period_s = 5\nincomplete_policy = "mark_incomplete"\n'
        '[[allowed_callers]]\nae_title = "PACS"\nhost = "10.0.0.5"\n'
        '[[destinations]]\nae_title = "ORTHANC"\nhost = "pacs.local"\nport = 4242\n'
    )
    monkeypatch.setenv("SPINE_NODE_PORT", "2104")
    settings = load_settings(config, quiet_period_s=1.5)
    assert settings.ae_title == "FROMFILE"
    assert settings.port == 2104  # environment beats the file
    assert settings.quiet_period_s == 1.5  # explicit arguments beat both
    assert settings.incomplete_policy is IncompletePolicy.MARK_INCOMPLETE
    assert settings.allowed_callers[0].admits("PACS", "10.0.0.5")
    assert not settings.allowed_callers[0].admits("PACS", "10.0.0.6")
    assert settings.destinations[0].port == 4242


def test_nested_values_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("node.crt", "node.key"):
        (tmp_path / name).write_text("-")
    monkeypatch.setenv("SPINE_NODE_ALLOWED_CALLERS", '[{"ae_title": "PACS"}]')
    monkeypatch.setenv("SPINE_NODE_TLS__CERT_FILE", str(tmp_path / "node.crt"))
    monkeypatch.setenv("SPINE_NODE_TLS__KEY_FILE", str(tmp_path / "node.key"))
    settings = load_settings()
    assert settings.allowed_callers[0].admits("PACS", "any.host")
    assert settings.tls is not None and settings.tls.cert_file == tmp_path / "node.crt"


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ("port = 70000", {}, "port"),
        ('ae_title = "THIS_AE_TITLE_IS_TOO_LONG"', {}, "ae_title"),
        ("", {"SPINE_NODE_QUIET_PERIOD_S": "soon"}, "quiet_period_s"),
        ('[[destinations]]\nae_title = "X"\nhost = "h"\nport = 0', {}, "destinations.0.port"),
        ('device_uid = "1.2.abc"', {}, "device_uid"),
        ("unknown_key = 1", {}, "unknown_key"),
        ('incomplete_policy = "wait_forever"', {}, "incomplete_policy"),
        ("quiet_period_s = 100\nstudy_timeout_s = 10", {}, "study_timeout_s"),
    ],
)
def test_bad_value_names_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str], key: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(toml + "\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert key in str(raised.value)


def test_bad_config_stops_start_up_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("port = -1\n")
    result = subprocess.run([sys.executable, "-m", "node.cli", "--config", str(config), "serve"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "port" in result.stderr and "greater than or equal to 0" in result.stderr


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"cert_file": "{cert}", "key_file": "{cert}", "require_client_cert": True}, "require_client_cert needs ca_file"),
        ({"cert_file": "{missing}", "key_file": "{cert}"}, "tls.cert_file"),
    ],
)
def test_tls_settings_are_checked_at_start(tmp_path: Path, tls: dict[str, object], message: str) -> None:
    cert = tmp_path / "node.pem"
    cert.write_text("not checked here")
    values = {k: v.format(cert=cert, missing=tmp_path / "absent.pem") if isinstance(v, str) else v for k, v in tls.items()}
    with pytest.raises(ConfigError, match=message):
        load_settings(tls=values)



def test_retention_names_exactly_the_study_states() -> None:
    """The states retention accepts are the schema's, and an unknown one is refused by name."""
    import typing

    from node.config import StudyStateName
    from node.schema import StudyState

    assert set(typing.get_args(StudyStateName)) == {s.value for s in StudyState}
    with pytest.raises(ConfigError, match="retention_days"):
        load_settings(retention_days={"ARCHIVED": 3})


def test_the_status_page_needs_a_password_file() -> None:
    with pytest.raises(ConfigError, match="web_port needs web_password_file"):
        load_settings(web_port=8080)
