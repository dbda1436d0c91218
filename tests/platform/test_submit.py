"""`llavactl submit` against a real Ray head (dashboard + Jobs API) started by the test, token auth on.

The head runs `ray start --head --block` in its own temp dir and process group; the test stops it by
signalling that process (never `ray stop`, which would take down every Ray on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from llava_platform.commands import submit as submit_cmd
from llava_platform.ray_jobs import JobRequest, SubmitError, find_repo_root

HELLO_JOB = '''
"""A trivial job: prints its argv and an env var, exits with the code given as exit=N."""
import os
import sys

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
print("hello from the job", sys.argv[1:], "GREETING=" + os.environ.get("GREETING", "-"), flush=True)
config = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else None
if config:
    print("config says:", open(config).read().strip(), flush=True)
sys.exit(int(args.get("exit", "0")))
'''


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop only the processes of this head: the `ray start` process, then anything using its temp dir."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.5)
    for pid in subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def ray_head_process(prefix: str, *, num_cpus: int, workers: int, env: dict | None = None,
                     extra_args: tuple[str, ...] = ()):
    """(dashboard URL, token) of a `ray start --head` on 127.0.0.1 with the dashboard and token auth on,
    stopped (with everything it started) on exit."""
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    gcs, dashboard, client_port, agent, min_worker = _free_ports(5)
    token = secrets.token_hex(24)
    run_env = dict(os.environ, **(env or {}), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    run_env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--include-dashboard", "true", "--ray-client-server-port", str(client_port),
           "--dashboard-agent-listen-port", str(agent), "--min-worker-port", str(min_worker),
           "--max-worker-port", str(min_worker + workers), "--num-cpus", str(num_cpus), *extra_args,
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = Path(temp_dir) / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=run_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{address}/api/version", timeout=2,
                             headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head with dashboard did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield address, token
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """(address, token) of a local Ray head with the dashboard on 127.0.0.1 and token auth on."""
    with ray_head_process("rsub", num_cpus=1, workers=40) as head:
        yield head


@pytest.fixture
def job_repo(tmp_path: Path) -> Path:
    (tmp_path / "jobs" / "configs").mkdir(parents=True)
    (tmp_path / "jobs" / "__init__.py").write_text("")
    (tmp_path / "jobs" / "hello.py").write_text(textwrap.dedent(HELLO_JOB))
    (tmp_path / "jobs" / "configs" / "hello.yaml").write_text("greeting: from-config\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big.bin").write_bytes(b"\0" * 1024)
    return tmp_path


def run_submit(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="llavactl")
    submit_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", *argv])
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_submit_follows_logs_and_exits_zero(ray_head, job_repo, capsys, monkeypatch):
    address, token = ray_head
    monkeypatch.setenv("TEST_RAY_TOKEN", token)
    code, out, err = run_submit([
        "hello", "--address", address, "--working-dir", str(job_repo), "--config", "jobs/configs/hello.yaml",
        "--token-env", "TEST_RAY_TOKEN", "--env", "GREETING=hi", "--poll-seconds", "0.3", "lr=0.1",
    ], capsys)
    assert code == 0, err
    assert "hello from the job ['--config', 'jobs/configs/hello.yaml', 'lr=0.1'] GREETING=hi" in out
    assert "config says: greeting: from-config" in out
    assert "SUCCEEDED" in err


def test_failed_job_gives_nonzero_exit(ray_head, job_repo, capsys, monkeypatch):
    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)  # the default token variable
    code, out, err = run_submit(["jobs.hello", "--address", address, "--working-dir", str(job_repo),
                                 "--poll-seconds", "0.3", "exit=3"], capsys)
    assert code == 1
    assert "FAILED" in err and "hello from the job" in out


def test_no_follow_returns_the_job_id(ray_head, job_repo, capsys, monkeypatch):
    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    code, out, _ = run_submit(["hello", "--address", address, "--working-dir", str(job_repo), "--no-follow",
                               "--submission-id", "llava-test-no-follow"], capsys)
    assert code == 0 and out.strip() == "llava-test-no-follow"
    # The same submission id again is refused: re-running a command never starts a duplicate job.
    code, _, err = run_submit(["hello", "--address", address, "--working-dir", str(job_repo), "--no-follow",
                               "--submission-id", "llava-test-no-follow"], capsys)
    assert code == submit_cmd.SUBMIT_ERROR and "refused" in err


def test_missing_or_wrong_token_is_refused(ray_head, job_repo, capsys, monkeypatch):
    address, _ = ray_head
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    code, _, err = run_submit(["hello", "--address", address, "--working-dir", str(job_repo)], capsys)
    assert code == submit_cmd.SUBMIT_ERROR and "Authentication" in err
    monkeypatch.setenv("WRONG_TOKEN", "not-the-token")
    code, _, err = run_submit(["hello", "--address", address, "--working-dir", str(job_repo),
                               "--token-env", "WRONG_TOKEN"], capsys)
    assert code == submit_cmd.SUBMIT_ERROR and "Authentication" in err
    code, _, err = run_submit(["hello", "--address", address, "--working-dir", str(job_repo),
                               "--token-env", "UNSET_TOKEN_VARIABLE"], capsys)
    assert code == submit_cmd.SUBMIT_ERROR and "UNSET_TOKEN_VARIABLE" in err


def test_bad_requests_fail_before_any_network_call(job_repo, capsys):
    unreachable = "http://127.0.0.1:9"
    code, _, err = run_submit(["nosuchjob", "--address", unreachable, "--working-dir", str(job_repo)], capsys)
    assert code == submit_cmd.SUBMIT_ERROR and "no job module jobs.nosuchjob" in err and "hello" in err
    code, _, err = run_submit(["hello", "--address", unreachable, "--working-dir", str(job_repo),
                               "--config", "jobs/configs/missing.yaml"], capsys)
    assert code == submit_cmd.SUBMIT_ERROR and "missing.yaml not found" in err
    code, _, err = run_submit(["hello", "--address", unreachable, "--working-dir", str(job_repo), "oops"], capsys)
    assert code == submit_cmd.SUBMIT_ERROR and "'oops' is not of the form key=value" in err


def test_runtime_env_excludes_local_state(job_repo):
    request = JobRequest(job="hello", working_dir=job_repo)
    env = request.runtime_env()
    assert env["working_dir"] == str(job_repo)
    assert {".venv", ".llava", ".git"} <= set(env["excludes"])
    assert request.entrypoint() == "python -m jobs.hello"
    assert find_repo_root(job_repo / "jobs" / "configs") == job_repo
    with pytest.raises(SubmitError):
        find_repo_root(Path("/"))


def test_submit_is_a_llavactl_command():
    from llava_platform.cli import COMMAND_MODULES

    assert "submit" in COMMAND_MODULES
