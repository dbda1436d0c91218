"""The README's "Everyday commands", in order, exactly as written, after `make run` (the session's
`made_run`), each as a subprocess in a newcomer's shell (no tracking URI, no cluster, no S3).

Each line either works and prints what the README says, or, where it needs what this machine has
not got (an S3 bucket, a GPU cluster at http://HEAD:8265, Kubernetes), fails within seconds with
the cause first; for those the closest real check runs too (`--dry-run`, `--help`, `helm template`).
The only edits to a line: the serving port (a free one instead of 8000) and `chat --url` to match.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.platform.conftest import REPO, free_port, user_env

README = REPO / "README.md"
# Commands that need a remote cluster or credentials fail at once: this is "at once" on a loaded CI box.
FAST_S = 90


def readme_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Everyday commands"):]
    block = section[section.index("```bash") + len("```bash"):section.index("```", section.index("```bash") + 7)]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def argv_of(line: str) -> list[str]:
    argv = shlex.split(line, comments=True)
    if argv[0] == "llavactl":
        return [sys.executable, "-m", "llava_platform.cli", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


class Shell:
    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.env = user_env()

    def run(self, argv: list[str], timeout: float = 600) -> tuple[int, str, str, float]:
        started = time.monotonic()
        proc = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def first_line(text: str) -> str:
    """The first line a user reads, past the one-line note on which MLflow store is in use."""
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith("[llava] no MLflow tracking URI")]
    return lines[0] if lines else ""


def version_tags(workdir: Path) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return dict(client.get_model_version_by_alias("llava-tiny", "champion").tags)


def descendants(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def serve_then_chat(sh: Shell, serve_line: str, chat_line: str) -> None:
    """`llavactl serve` until SIGTERM, `llavactl chat` against it; then nothing it started is left."""
    import psutil

    port = free_port()
    argv = [a if a != "8000" else str(port) for a in argv_of(serve_line)]
    proc = subprocess.Popen(argv, cwd=sh.cwd, env=sh.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving models:/llava-tiny@champion"):
                break
        assert proc.poll() is None, "".join(lines[-40:])
        started = descendants(proc.pid)
        assert started, "serve started no Ray processes?"
        rc, out, err, _ = sh.run([*argv_of(chat_line), "--url", f"http://127.0.0.1:{port}"], timeout=300)
        assert rc == 0, err[-3000:]  # (a tiny model trained minutes on CPU may answer with nothing)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("llavactl serve did not stop on SIGTERM")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in started):
        time.sleep(1)
    left = [psutil.Process(p).cmdline()[:3] for p in started
            if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not left, f"still running after SIGTERM: {left}"


@pytest.mark.slow
def test_readme_everyday_commands_in_order_after_make_run(made_run):
    assert made_run.returncode == 0, made_run.output[-4000:]
    sh, work = Shell(made_run.checkout), made_run.workdir
    lines = iter(readme_commands())
    gpu = __import__("torch").cuda.is_available()

    line = next(lines)  # data synth
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 0 and out.startswith("wrote "), err
    assert (work / "shapes" / "stage2.json").is_file()

    line = next(lines)  # data show-sample
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 0 and "--- prompt (supervised text" in out, err
    rc, _, err, took = sh.run(argv_of(line.replace(".llava/models/stage2", ".llava/models/nope")))
    assert rc == 2 and first_line(err) == "llavactl data show-sample: --model: model directory .llava/models/nope does not exist"

    line = next(lines)  # data preprocess, on the config's defaults
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 0, err[-3000:]
    assert (work / "data" / "processed" / "stage2" / "manifest.json").is_file()

    line = next(lines)  # data preprocess from S3: no bucket, no credentials here
    rc, out, err, took = sh.run(argv_of(line))
    assert rc == 2 and "s3://bucket/raw/" in first_line(err) and took < FAST_S, (rc, err[-2000:])

    line = next(lines)  # one tiny stage on this machine, tracked in the embedded store
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 0, err[-3000:]
    assert '"run_id"' in out and (work / "models" / "stage2-short" / "config.json").is_file()
    assert f"using the embedded store sqlite:///{work / 'mlflow.db'}" in err

    line = next(lines)  # the 7B recipe: a GPU cluster's job
    if gpu:
        rc, _, err, _ = sh.run([*argv_of(line), "--dry-run"])
        assert rc == 0, err
    else:
        rc, _, err, took = sh.run(argv_of(line))
        assert rc == 2 and first_line(err).startswith("python -m jobs.train: distributed.use_gpu=true but this "
                                                      "machine has no GPU"), err[-2000:]
        assert took < FAST_S

    line = next(lines)  # ray job submit: the entrypoint after `--`, checked with --dry-run
    assert line.startswith("ray job submit --address http://HEAD:8265 -- python -m jobs.train")
    rc, out, err, _ = sh.run([*argv_of(line.split(" -- ", 1)[1]), "--dry-run"])
    assert rc == 0 and "stage: 2" in out, err

    line = next(lines)  # a quick --limit evaluation: its own folder, the champion's metrics untouched
    before, folders = version_tags(work), set((work / "eval").iterdir())
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 0, err[-3000:]
    (new,) = set((work / "eval").iterdir()) - folders
    assert (new / "report.md").is_file() and all((f / "report.md").is_file() for f in folders)
    assert version_tags(work) == before

    line = next(lines)  # models list
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 0 and re.search(r"^llava-tiny: 1 version", out, re.M), out + err
    line = next(lines)  # models show
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 0 and "metrics: " in out and "shapes.accuracy=" in out, out + err
    line = next(lines)  # models promote, through the gate
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 0 and out.startswith("PROMOTED: llava-tiny v1 -> @staging"), out + err
    line = next(lines)  # models rollback: one champion so far, so it refuses and says why
    rc, out, err, _ = sh.run(argv_of(line))
    assert rc == 1 and "no earlier champion" in first_line(err), out + err

    serve_line, chat_line = next(lines), next(lines)
    rc, _, err, took = sh.run([a.replace("@champion", "@nope") for a in argv_of(serve_line)])
    assert rc == 2 and "llava-tiny@nope" in first_line(err) and took < FAST_S, err[-2000:]
    serve_then_chat(sh, serve_line, chat_line)

    line = next(lines)  # llavactl submit: no cluster at HEAD here
    rc, _, err, took = sh.run(argv_of(line))
    assert rc == 3 and "cannot reach the Ray Jobs API at http://HEAD:8265" in first_line(err) and took < FAST_S
    rc, out, _, _ = sh.run([sys.executable, "-m", "llava_platform.cli", "submit", "--help"])
    configs = re.findall(r"jobs/configs/\S+\.yaml", out)
    assert rc == 0 and configs and all((sh.cwd / c).is_file() for c in configs), out

    line = next(lines)  # helm install: the chart renders (installing needs a Kubernetes cluster)
    helm = shutil.which("helm") or str(REPO / ".tools" / "bin" / "helm")
    if Path(helm).is_file():
        rc, out, err, _ = sh.run([helm, "template", *shlex.split(line, comments=True)[2:]])
        assert rc == 0 and "kind: " in out, err[-2000:]
    example = line.split("kubectl apply -f ", 1)[1].strip()
    assert (sh.cwd / example).is_file()
    assert next(lines, None) is None, "a README command this walk does not check"

    # No stray files: everything the commands wrote is under .llava (the links are the checkout).
    assert sorted(p.name for p in sh.cwd.iterdir()) == [".llava", "charts", "jobs", "operators"]
