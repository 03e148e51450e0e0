"""What the cluster tests share besides fixtures: the sweep they run, starting and stopping process
groups, bounded waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers import EVAL_SMALL, ROOT

SLURM_SCRIPT = ROOT / "scripts" / "slurm-local.sh"
# A 2-job sweep from the warmed-up tiny_llama: a checkpoint every 10 steps to resume from, one thread per
# job (two jobs share the two cores), the winner exported (Q4_K_M) and evaluated with the tiny stand-in judge.
STEPS = 60
SWEEP = ["-m", "experiment=demo", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=30",
         "trainer.log_every_n_steps=1", "callbacks.last_checkpoint.every_n_train_steps=10",
         "trainer.enable_progress_bar=false", "threads=1", *EVAL_SMALL,
         "orpo.beta=0.05,0.1"]


def wait_until(ready: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll ``ready()`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """TERM the process group a daemon was started in (its own session), KILL what is left after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so only live members keep the group
            if not group_alive(proc.pid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    proc.wait(timeout=grace)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def start_sweep(args: list[str], log: Path, env_extra: dict[str, str],
                python: str = sys.executable) -> subprocess.Popen:
    """``train.py`` as a user starts it, in its own session (so a failed test can stop all of it)."""
    env = {**os.environ, **env_extra}
    with open(log, "w") as out:
        return subprocess.Popen([python, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False
