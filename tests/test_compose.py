"""compose.yaml, the Dockerfile and deploy/, checked without Docker (it cannot build or run here).

The services, their images, commands, settings, volumes and health checks must agree with each
other, with the settings model and with the command line; no secret may be written in them.
The containers' settings are loaded with the real ``load_settings`` from the environment compose
would give them (compose.yaml interpolated with the variables of deploy/spine-node.env.example,
its empty secrets filled in). Where the Docker Compose plugin is installed, ``docker compose
config`` checks the file as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from node import cli
from node.config import Settings, load_settings
from node.dispatch import QUEUES

ROOT = Path(__file__).parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_FILE = "deploy/spine-node.env"
ENV_EXAMPLE = ROOT / "deploy" / "spine-node.env.example"
CPU_OVERRIDE = ROOT / "deploy" / "compose.cpu.yaml"

#: spine-node's services and the Dockerfile target each one runs.
SPINE_SERVICES = {"node": "node", "grade-worker": "worker", "deliver-worker": "worker"}
WORKERS = ("grade-worker", "deliver-worker")
INFRASTRUCTURE = ("postgres", "redis", "orthanc")
#: Variables holding secrets: they must come from the env file, never have a default.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
INTERPOLATION = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
REQUIRED_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}")
HEALTHZ_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/]*)")


# --- compose.yaml as compose reads it ---------------------------------------------------------------


class MissingVariable(KeyError):
    """A ``${VAR:?message}`` whose variable is unset or empty: compose stops with the message."""


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation of one string: ``$$``, ``$VAR``, ``${VAR}`` and the ``:-``, ``-``,
    ``:?``, ``?``, ``:+``, ``+`` forms."""

    def replace(match: re.Match[str]) -> str:
        escaped, name, operator, argument, bare = match.groups()
        if escaped:
            return "$"
        if bare:
            return variables.get(bare, "")
        value = variables.get(name)
        unset = value is None or (operator is not None and operator.startswith(":") and value == "")
        if operator in (":-", "-"):
            return argument if unset else str(value)
        if operator in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {argument}")
            return str(value)
        if operator in (":+", "+"):
            return "" if unset else argument
        return value or ""

    return INTERPOLATION.sub(replace, text)


def interpolate_all(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [interpolate_all(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_all(value, variables) for key, value in node.items()}
    return node


def strings_in(node: Any) -> Iterator[str]:
    """Every string value (not key) in a loaded YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)


def parse_env_file(path: Path, commented: bool = False) -> dict[str, str]:
    """``KEY=VALUE`` lines as compose reads them (quotes removed); with ``commented``, also the
    ``# KEY=VALUE`` lines that document optional settings."""
    variables: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if commented:
            line = line.lstrip("#").strip()
        match = re.fullmatch(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if not match:
            continue
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #")[0].strip()
        variables[key] = value
    return variables


@cache
def raw_compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@cache
def deployment_variables() -> dict[str, str]:
    """The example env file with its empty values filled in, as an operator would."""
    variables = parse_env_file(ENV_EXAMPLE)
    for key, value in variables.items():
        if not value:
            digest = hashlib.sha256(key.encode()).hexdigest()
            variables[key] = f"2.25.{int(digest[:24], 16)}" if key == "SPINE_NODE_DEVICE_UID" else digest[:32]
    return variables


@cache
def compose() -> dict[str, Any]:
    """compose.yaml interpolated with :func:`deployment_variables`."""
    resolved = interpolate_all(raw_compose(), deployment_variables())
    assert isinstance(resolved, dict)
    return resolved


def services() -> dict[str, Any]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment:``, mapping or list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def env_files(service: Mapping[str, Any]) -> list[str]:
    files = service.get("env_file") or []
    files = [files] if isinstance(files, (str, dict)) else files
    return [item["path"] if isinstance(item, dict) else item for item in files]


def container_environment(name: str) -> dict[str, str]:
    """What a spine-node container's process sees: its env_file, then its ``environment:``."""
    service = services()[name]
    env: dict[str, str] = {}
    for path in env_files(service):
        assert path == ENV_FILE, f"{name}: env_file {path}: expected {ENV_FILE}"
        env.update(deployment_variables())
    env.update(environment(service))
    return env


@cache
def settings_of(name: str) -> Settings:
    """The settings a spine-node container loads at start-up (a ConfigError fails the test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_NODE_")}
    env.update(container_environment(name))
    with mock.patch.dict(os.environ, env, clear=True):
        return load_settings()


def command(name: str) -> list[str]:
    cmd = services()[name]["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def healthcheck_text(name: str) -> str:
    test = services()[name]["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def volume_mounts(name: str) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each of a service's volumes, short or long syntax."""
    mounts = []
    for volume in services()[name].get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), str(volume["target"]), bool(volume.get("read_only"))))
        else:
            parts = str(volume).split(":")
            mounts.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return mounts


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~"))


# --- the Dockerfile -----------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


@cache
def dockerfile_stages() -> dict[str, Stage]:
    """Stages by name (unnamed ones by index), each with its instructions, continuations joined."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        instruction, _, args = logical.strip().partition(" ")
        logical = ""
        if not instruction:
            continue
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name, words[0])
        elif current is not None:
            current.instructions.append((instruction, args))
    return stages


def lineage(target: str) -> list[Stage]:
    """The stage and the stages it is built FROM, oldest first."""
    stages = dockerfile_stages()
    chain = [stages[target]]
    while chain[0].base in stages:
        chain.insert(0, stages[chain[0].base])
    return chain


def copy_sources(stage: Stage) -> list[str]:
    """The build-context paths a stage COPYs (not those copied from other stages)."""
    sources = []
    for args in stage.args("COPY") + stage.args("ADD"):
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, POSIX) out of the build context: the last
    matching pattern decides, ``!`` re-includes, a matched folder excludes what it holds."""
    ignored = False
    parents = [str(Path(*Path(path).parts[:i])) for i in range(1, len(Path(path).parts) + 1)]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, parent) for parent in parents):
            ignored = not negated
    return ignored


# --- services, images and commands ---------------------------------------------------------------------


def test_compose_has_every_service() -> None:
    assert set(SPINE_SERVICES) | set(INFRASTRUCTURE) <= set(services())


def test_spine_node_services_build_their_dockerfile_target() -> None:
    stages = dockerfile_stages()
    for name, target in SPINE_SERVICES.items():
        build = services()[name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT, name
        assert build.get("dockerfile", "Dockerfile") == DOCKERFILE.name, name
        assert build["target"] == target and target in stages, f"{name}: target {build['target']!r}"


def test_services_run_the_right_spine_node_command() -> None:
    parser = cli._parser()
    node_cmd = command("node")
    assert node_cmd[0] == "spine-node" and parser.parse_args(node_cmd[1:]).run is cli._serve
    consumed: set[str] = set()
    for name, queues in (("grade-worker", {"grade"}), ("deliver-worker", {"deliver"})):
        cmd = command(name)
        args = parser.parse_args(cmd[1:])
        assert cmd[0] == "spine-node" and args.run is cli._worker, name
        assert set(args.queues.split(",")) == queues, name
        consumed |= queues
    assert consumed == set(QUEUES.values()), "every job queue needs a worker"


def test_dockerfile_targets_default_to_the_same_commands() -> None:
    parser = cli._parser()
    for target, run in (("node", cli._serve), ("worker", cli._worker)):
        cmds = dockerfile_stages()[target].args("CMD")
        assert cmds, f"target {target} has no CMD"
        cmd = json.loads(cmds[-1])
        assert cmd[0] == "spine-node" and parser.parse_args(cmd[1:]).run is run, target


def test_grade_workers_reserve_nvidia_gpus_and_nothing_else_does() -> None:
    devices = services()["grade-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               and (d.get("count") == "all" or (isinstance(d.get("count"), int) and d["count"] >= 1) or d.get("device_ids"))
               for d in devices), devices
    for name in ("node", "deliver-worker"):
        assert "devices" not in json.dumps(services()[name].get("deploy", {})), f"{name} reserves a device"


def test_cpu_override_drops_only_the_gpu_reservation() -> None:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!reset", lambda loader, node: "!reset")
    override = yaml.load(CPU_OVERRIDE.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader)
    assert set(override["services"]) == {"grade-worker"}
    worker = override["services"]["grade-worker"]
    assert worker["deploy"] == "!reset"
    args = cli._parser().parse_args(worker["command"][1:])
    assert worker["command"][0] == "spine-node" and args.run is cli._worker and args.queues == "grade"


# --- settings -------------------------------------------------------------------------------------------


def test_every_spine_node_variable_is_a_setting() -> None:
    names = set(parse_env_file(ENV_EXAMPLE, commented=True))
    names |= {m.group(2) or m.group(5) for m in INTERPOLATION.finditer(COMPOSE.read_text()) if m.group(2) or m.group(5)}
    for service in raw_compose()["services"].values():
        names |= set(environment(service))
    spine_names = {n for n in names if n.startswith("SPINE_NODE_")}
    assert len(spine_names) >= 8, spine_names
    unknown = sorted(n for n in spine_names if n.removeprefix("SPINE_NODE_").lower().split("__")[0] not in Settings.model_fields)
    assert not unknown, f"not settings (node/config.py): {unknown}"


def test_node_and_workers_load_the_same_settings() -> None:
    node = settings_of("node").model_dump()
    for name in WORKERS:
        assert settings_of(name).model_dump() == node, f"{name} is configured differently from the node"
    assert settings_of("node").log_format.value == "json"


def test_database_and_broker_are_the_compose_services() -> None:
    settings = settings_of("node")
    postgres = environment(services()["postgres"])
    db = urlsplit(settings.database_url)
    assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres" and db.port in (None, 5432)
    assert db.username == postgres["POSTGRES_USER"] and db.path == f"/{postgres['POSTGRES_DB']}"
    assert db.password == postgres["POSTGRES_PASSWORD"] == deployment_variables()["POSTGRES_PASSWORD"]
    broker = urlsplit(settings.broker_url)
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port in (None, 6379)
    assert broker.password == environment(services()["redis"])["REDIS_PASSWORD"] == deployment_variables()["REDIS_PASSWORD"]


def test_node_and_workers_share_one_storage_volume_at_storage_dir() -> None:
    sources = set()
    for name in SPINE_SERVICES:
        storage_dir = str(settings_of(name).storage_dir)
        mounts = [(source, read_only) for source, target, read_only in volume_mounts(name) if target == storage_dir]
        assert len(mounts) == 1, f"{name}: nothing (or several) mounted at its storage_dir {storage_dir}"
        source, read_only = mounts[0]
        assert is_named_volume(source) and not read_only, f"{name}: {source} at {storage_dir}"
        sources.add((source, storage_dir))
    assert len(sources) == 1, f"the node and the workers must mount one volume at one path: {sources}"


def test_volumes_are_named_and_declared() -> None:
    declared = set(compose().get("volumes") or {})
    used = {source for name in services() for source, _, _ in volume_mounts(name) if is_named_volume(source)}
    assert used == declared, f"used {sorted(used)}, declared {sorted(declared)}"
    for name, data in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data"), ("orthanc", "/var/lib/orthanc/db")):
        assert any(is_named_volume(s) and t == data for s, t, _ in volume_mounts(name)), f"{name}: {data} is not on a named volume"


def test_node_publishes_its_dicom_port() -> None:
    port = settings_of("node").port
    published = [str(p).rsplit(":", 1)[-1] if not isinstance(p, dict) else str(p["target"]) for p in services()["node"]["ports"]]
    assert str(port) in published, f"SCP port {port} not in {published}"


def test_orthanc_receives_the_results_and_knows_the_node() -> None:
    settings = settings_of("deliver-worker")
    orthanc = environment(services()["orthanc"])
    orthanc_ae, orthanc_port = orthanc["ORTHANC__DICOM_AET"], int(orthanc.get("ORTHANC__DICOM_PORT", "4242"))
    assert any(d.host == "orthanc" and d.port == orthanc_port and d.ae_title == orthanc_ae and d.confirm
               for d in settings.destinations), settings.destinations
    modalities = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"]).values()
    node = [m for m in modalities if m["AET"] == settings.ae_title]
    assert node, f"Orthanc does not know our AE title {settings.ae_title}"
    assert node[0]["Host"] == "node" and node[0]["Port"] == settings.port
    assert node[0].get("AllowFind", True) and node[0].get("AllowStore", True), "deliveries are confirmed by C-FIND"
    assert not settings.allowed_callers or any(c.admits(orthanc_ae, "") for c in settings.allowed_callers)


# --- health and start order ----------------------------------------------------------------------------


def test_every_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check.get("test") != ["NONE"], name
    assert "pg_isready" in healthcheck_text("postgres")
    assert "redis-cli" in healthcheck_text("redis") and "ping" in healthcheck_text("redis")
    assert "test-aliveness" in healthcheck_text("orthanc") or "/system" in healthcheck_text("orthanc")


def test_node_and_worker_healthchecks_hit_their_metrics_port() -> None:
    for name in SPINE_SERVICES:
        settings = settings_of(name)
        port = settings.metrics_port if name == "node" else settings.worker_metrics_port
        assert port, f"{name}: its metrics port is off, so /healthz is not served"
        found = HEALTHZ_URL.findall(healthcheck_text(name))
        assert found == [(str(port), "/healthz")], f"{name}: health check {found}, metrics port {port}"


def test_services_wait_for_what_they_need_to_be_healthy() -> None:
    needs = {"node": {"postgres", "redis"}, "grade-worker": {"postgres", "redis", "node"},
             "deliver-worker": {"postgres", "redis", "node"}}
    for name, wanted in needs.items():
        depends = services()[name].get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        assert wanted <= set(depends), f"{name} depends on {sorted(depends)}"
        for dependency in wanted:
            assert depends[dependency].get("condition") == "service_healthy", f"{name} -> {dependency}"
            assert services()[dependency].get("healthcheck"), dependency


# --- secrets --------------------------------------------------------------------------------------------


def test_no_secret_is_written_in_compose_yaml() -> None:
    raw = raw_compose()
    for name, service in raw["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_INTERPOLATION.fullmatch(value), f"{name}: {key} must be ${{VAR:?message}}"
    credentials = 0
    for text in strings_in(raw):
        masked = REQUIRED_INTERPOLATION.sub("<required>", text)
        for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s'\"]+", masked):
            userinfo = url.split("://", 1)[1].rpartition("@")[0]
            if ":" in userinfo:
                assert userinfo.split(":", 1)[1] == "<required>", f"password written in {url}"
                credentials += 1
        if "--requirepass" in text:
            assert re.search(r"--requirepass\s+\"?\$\$[A-Z_]+", text), f"literal Redis password: {text}"
    assert credentials >= 2, "the database and broker URLs carry their passwords from the env file"
    users = json.loads(REQUIRED_INTERPOLATION.sub("X", environment(raw["services"]["orthanc"])["ORTHANC__REGISTERED_USERS"]))
    assert users and set(users.values()) == {"X"}, "Orthanc's passwords must come from the env file"


def test_secrets_are_required_and_never_defaulted() -> None:
    text = COMPOSE.read_text()
    secrets = {m.group(2) for m in INTERPOLATION.finditer(text) if m.group(2) and SECRET_NAME.search(m.group(2))}
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "ORTHANC_PASSWORD"} <= secrets
    for m in INTERPOLATION.finditer(text):
        if m.group(2) in secrets:
            assert m.group(3) == ":?" and ENV_FILE in m.group(4), f"{m.group(0)}: must stop compose, naming {ENV_FILE}"
    for secret in secrets | {"SPINE_NODE_DEVICE_UID"}:
        missing = {k: v for k, v in deployment_variables().items() if k != secret}
        with pytest.raises(MissingVariable, match=secret):
            interpolate_all(raw_compose(), missing)


def test_the_example_env_file_holds_no_secret() -> None:
    example = parse_env_file(ENV_EXAMPLE)
    secrets = [key for key in example if SECRET_NAME.search(key)]
    assert secrets and all(example[key] == "" for key in secrets), "the example must leave every secret empty"
    assert example["SPINE_NODE_DEVICE_UID"] == "", "each installation makes its own device UID"


def test_the_real_env_file_stays_out_of_git_and_the_image() -> None:
    for name in SPINE_SERVICES:
        assert env_files(services()[name]) == [ENV_FILE], name
    assert dockerignored(ENV_FILE) and dockerignored(".env")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git whether the env file is ignored")
    ignored = subprocess.run(["git", "check-ignore", "--quiet", "--no-index", ENV_FILE], cwd=ROOT)
    assert ignored.returncode == 0, f"{ENV_FILE} holds secrets: git must ignore it"


# --- the Dockerfile -------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_the_targets_compose_uses() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 3
    assert set(SPINE_SERVICES.values()) <= set(stages)


def test_final_targets_run_as_a_non_root_user() -> None:
    for target in set(SPINE_SERVICES.values()):
        chain = lineage(target)
        users = [user for stage in chain for user in stage.args("USER")]
        assert users, f"target {target} runs as root"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), f"target {target} runs as {user}"
        created = " ".join(run for stage in chain for run in stage.args("RUN"))
        match = re.search(rf"useradd\b[^&;]*--uid\s+(\d+)[^&;]*\s{re.escape(user)}\b", created)
        assert match and int(match.group(1)) != 0, f"target {target}: user {user} is not created with its own uid"
    for name in SPINE_SERVICES:
        assert str(services()[name].get("user", "")).split(":")[0] not in ("root", "0"), name


def test_images_carry_the_shipped_weights() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["models"]
    weights = sorted((ROOT / "models" / "weights").glob("*.safetensors"))
    assert weights
    for path in weights:
        for shipped in (path, path.with_suffix(".md")):  # the model card holds the weights' hash
            relative = shipped.relative_to(ROOT / "models").as_posix()
            assert any(fnmatch(relative, pattern) for pattern in package_data), f"{relative} is not package data"
            assert not dockerignored(shipped.relative_to(ROOT).as_posix()), f"{shipped} left out of the build context"
    copied = {source.strip("/") for stage in dockerfile_stages().values() for source in copy_sources(stage)}
    assert {"pyproject.toml", "models", "node", "worker", "migrations"} <= copied
    for target in set(SPINE_SERVICES.values()):
        runs = " ".join(dockerfile_stages()[target].args("RUN"))
        assert "Detector.load(" in runs and "GraderModel.load(" in runs, f"target {target} does not check its weights load"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    for stage in dockerfile_stages().values():
        for source in copy_sources(stage):
            path = source.strip("/")
            assert (ROOT / path).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(path), f"COPY {source}: excluded by .dockerignore"
    for path in ("README.md", "migrations/versions", "node/cli.py"):
        assert not dockerignored(path), path
    for path in (".git", ".venv", "tests", "var"):
        assert dockerignored(path), f"{path} should stay out of the build context"


def test_dockerfile_sets_no_secret() -> None:
    for stage in dockerfile_stages().values():
        for instruction, args in stage.instructions:
            if instruction in ("ARG", "ENV"):
                assert not SECRET_NAME.search(args.upper()), f"{instruction} {args}"


# --- docker compose itself, where it is installed -------------------------------------------------------


def docker_compose() -> list[str]:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if version.returncode != 0:
        pytest.skip("the Docker Compose plugin is not installed (docker compose version failed)")
    return ["docker", "compose"]


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    docker = docker_compose()
    shutil.copy(COMPOSE, tmp_path / "compose.yaml")
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy", ignore=shutil.ignore_patterns("spine-node.env"))
    env_file = tmp_path / ENV_FILE
    env_file.write_text("".join(f"{key}='{value}'\n" for key, value in deployment_variables().items()))
    clean_env = {k: v for k, v in os.environ.items() if k not in deployment_variables() and not k.startswith("COMPOSE_")}

    def config(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*docker, *args, "config", "--format", "json"], cwd=tmp_path, env=clean_env,
                              capture_output=True, text=True, timeout=60)

    result = config("--env-file", ENV_FILE, "-f", "compose.yaml")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert set(SPINE_SERVICES) | set(INFRASTRUCTURE) <= set(resolved["services"])
    assert resolved["services"]["grade-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    cpu = config("--env-file", ENV_FILE, "-f", "compose.yaml", "-f", "deploy/compose.cpu.yaml")
    assert cpu.returncode == 0, cpu.stderr
    assert not json.loads(cpu.stdout)["services"]["grade-worker"].get("deploy")
    missing = config("-f", "compose.yaml")
    assert missing.returncode != 0 and ENV_FILE in missing.stderr, missing.stderr
