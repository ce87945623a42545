"""`starling coordinator init|serve|token` and `starling status` as a user runs them:
real processes, real sockets; bad input gives one error line and exit code 2."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from starling.runconfig import RunConfig, RunConfigError

from .conftest import run_cli
from .coordinator_support import CORPUS


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(CORPUS)
    config = root / "run.toml"
    config.write_text(
        f"""
[run]
name = "cli-run"
join_policy = "token"
target_tokens = 1000000

[model]
preset = "tiny"
dim = 32
n_layers = 1
n_heads = 2
n_kv_heads = 2

[data]
source = "{root / "corpus.txt"}"
tokenizer = "bytes"
shard_tokens = 16384
"""
    )
    result = run_cli("coordinator", "init", str(root / "run"), "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["name"] == "cli-run" and summary["data_shards"] >= 4
    return root / "run"


def test_init_writes_a_complete_run_directory(run_dir: Path) -> None:
    for name in ("run.toml", "coordinator.db", "identity.key", "admin_token", "tls/cert.pem"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "000000" / "state.safetensors").is_file()
    assert (run_dir / "data" / "manifest.json").is_file()
    for secret in ("identity.key", "admin_token", "tls/key.pem"):
        assert stat.S_IMODE((run_dir / secret).stat().st_mode) == 0o600, secret
    assert RunConfig.load(run_dir / "run.toml").run.join_policy == "token"
    again = run_cli("coordinator", "init", str(run_dir))
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_serve_prints_the_join_url_and_status_reads_it(run_dir: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "starling",
            "coordinator",
            "serve",
            str(run_dir),
            "--http-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().rstrip("\n")
        assert url.startswith("starling://127.0.0.1:") and " " not in url
        assert (run_dir / "join_url").read_text().strip() == url
        status = run_cli("status", url, "--json", timeout=60)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["run"] == "cli-run" and data["target_tokens"] == 1_000_000
        assert data["peers"] == [] and data["last_commit"] is None
        assert data["latest_checkpoint"]["round"] == 0
        assert len(data["latest_checkpoint"]["sha256"]) == 64
        for key in ("round", "tokens_trained"):
            assert data[key] == 0
        human = run_cli("status", url, timeout=60)
        assert human.returncode == 0 and "cli-run" in human.stdout
        dashboard = process.stdout.readline()
        assert dashboard.startswith("dashboard http://")
        import urllib.request

        with urllib.request.urlopen(dashboard.split()[1] + "api/status", timeout=10) as r:
            assert json.loads(r.read())["run"] == "cli-run"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_tokens_create_list_revoke(run_dir: Path) -> None:
    created = run_cli(
        "coordinator", "token", "create", str(run_dir), "--expires", "2h", "--label", "alice"
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("stk_")
    listed = json.loads(run_cli("coordinator", "token", "list", str(run_dir), "--json").stdout)
    entry = next(t for t in listed if t["label"] == "alice")
    assert token not in json.dumps(listed)  # only hashes are stored
    revoked = run_cli("coordinator", "token", "revoke", str(run_dir), entry["token_id"])
    assert revoked.returncode == 0, revoked.stderr
    listed = json.loads(run_cli("coordinator", "token", "list", str(run_dir), "--json").stdout)
    assert next(t for t in listed if t["label"] == "alice")["revoked"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["coordinator", "serve", "/nonexistent/run"], "not a run directory"),
        (["coordinator", "token", "revoke", "{run}", "nope"], "no token with id"),
        (["coordinator", "token", "create", "{run}", "--expires", "soon"], "bad duration"),
        (["status", "ftp://example.com"], "give the join URL (starling://...) or the dashboard"),
        (["status", "starling://example.com:1"], "no certificate fingerprint"),
        (["status", "starling://127.0.0.1:1", "--timeout", "2"], "coordinator at"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(run_dir: Path, args, message) -> None:
    result = run_cli(*[a.replace("{run}", str(run_dir)) for a in args], timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_bad_run_configs_name_the_key(tmp_path: Path) -> None:
    cases = {
        "[run]\njoin_policy = 'maybe'\n": "join_policy",
        "[round]\ntokens = -1\n": "round.tokens",
        "[outer]\ncodec = 'zip'\n": "codec",
        "[outer]\nfeedback_decay = 1.5\n": "outer.feedback_decay must be in",
        "[round]\nsync_power = 1.0\n": "round.sync_power needs budget rounds",
        "[round]\ntokens = 4096\nsync_power = -1.0\n": "round.sync_power must be in",
        "[membership]\nlease_s = 1.0\nheartbeat_s = 5.0\n": "lease_s",
        "[nonsense]\n": "unknown sections",
        "[round]\nbudget = 3\n": "unknown keys in [round]",
        "[round]\ntokens = 'many'\n": "tokens must be int",
        "[train]\nseed = 3\n": "seed comes from [run]",
        "[train]\nmoment_batches = 0.5\n": "moment batches must be ≥ 1",
        "[train]\nmoment_batches = 'nodes'\n": 'a number ≥ 1 or "contributors"',
        "[train]\nmoment_batches = true\n": 'a number ≥ 1 or "contributors"',
        "[model]\nwidth = 3\n": "unknown keys in [model]",
        "not toml ][": "not valid TOML",
        "[outer]\ncodec = 'hivemind-uint8'\n": "bytes depend on the machine",
    }
    for text, message in cases.items():
        with pytest.raises(RunConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            RunConfig.from_toml(text)
    config = tmp_path / "bad.toml"
    config.write_text("[outer]\ncodec = 'zip'\n")
    result = run_cli("coordinator", "init", str(tmp_path / "run"), "--config", str(config))
    assert result.returncode == 2 and "codec" in result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    # Without verification, nothing compares two reducers' bytes: the codec is allowed.
    trusted = "[outer]\ncodec = 'hivemind-uint8'\n[defences]\nverify_means = false\n"
    assert RunConfig.from_toml(trusted).outer.codec == "hivemind-uint8"


def test_the_run_config_round_trips_through_toml() -> None:
    config = RunConfig.from_toml(
        "[round]\ntokens = 4096\ndeadline_s = 30\n[model]\npreset = 'tiny'\ndim = 64\n"
    )
    assert config.round.tokens == 4096 and config.round.deadline_s == 30.0
    assert RunConfig.from_toml(config.to_toml()) == config
    assert config.model_config(vocab_size=300).dim == 64
    # By default each node's AdamW assumes the batch of the round's contributors (the
    # node sets it each round from 1); a number fixes it; 1 is plain AdamW.
    assert config.follows_contributors() and config.train_config().moment_batches == 1.0
    named = RunConfig.from_toml("[train]\nmoment_batches = 'contributors'\n")
    assert named.follows_contributors() and RunConfig.from_toml(named.to_toml()) == named
    fixed = RunConfig.from_toml("[train]\nmoment_batches = 4.0\n")
    assert fixed.train_config().moment_batches == 4.0 and not fixed.follows_contributors()
    assert RunConfig.from_toml(fixed.to_toml()) == fixed
    # A micro-batch of one sequence has no halves: plain AdamW, not an error.
    single = RunConfig.from_toml("[train]\nmicro_batch_size = 1\nbatch_tokens = 256\n")
    assert not single.follows_contributors()


def test_a_run_warms_up_as_the_simulator_does_from_its_creation(run_dir: Path) -> None:
    """The lr schedule spans the run's target tokens. Unless [train] warmup_steps is
    given, `coordinator init` writes into the run's run.toml a warmup over the first
    quarter of it, as `starling simulate` warms up over a quarter of its steps; a run
    whose run.toml names none (made before) keeps TrainConfig's 50 steps."""
    config = RunConfig.from_toml("[run]\ntarget_tokens = 8_192_000\n[train]\nbatch_tokens = 8192\n")
    assert (config.inner_schedule().steps, config.inner_schedule().warmup_steps) == (1000, 50)
    pinned = config.with_warmup_pinned()
    assert pinned.train["warmup_steps"] == 250 and pinned.inner_schedule().warmup_steps == 250
    assert RunConfig.from_toml(pinned.to_toml()) == pinned
    given = RunConfig.from_toml(
        "[run]\ntarget_tokens = 8_192_000\n[train]\nbatch_tokens = 8192\nwarmup_steps = 40\n"
    )
    assert given.with_warmup_pinned() == given
    # The fixture's run: 1,000,000 target tokens in steps of 8,192 (122), no warmup given.
    written = RunConfig.load(run_dir / "run.toml")
    assert written.inner_schedule().steps == 122 and written.train["warmup_steps"] == 30
