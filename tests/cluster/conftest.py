"""Engines that run on one machine, for `make test-cluster`: a single-node Slurm cluster, a local Ray
cluster, an MLflow server; each started for the session and stopped at its end, even on failure.

Only addresses on this machine (127.0.0.1); every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers import ROOT
from .helpers import SLURM_SCRIPT, free_port, healthy, stop_group, wait_until


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A single-node Slurm cluster (scripts/slurm-local.sh): installed if missing, started, stopped at the end."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (it installs Debian's slurm-wlm and munge and starts daemons)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state / "cluster")}
    subprocess.run(["bash", str(SLURM_SCRIPT), "install"], env=env, check=True, timeout=900)
    try:
        subprocess.run(["bash", str(SLURM_SCRIPT), "start"], env=env, check=True, timeout=180)
        yield {"SLURM_CONF": str(state / "cluster" / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop"], env=env, check=True, timeout=120)


@pytest.fixture(scope="session")
def ray_python() -> str:
    """The Python of the Ray environment (scripts/ray-venv.sh: built once, beside the project's venv)."""
    venv = ROOT / ".cache" / "ray-venv"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "ray-venv.sh"), str(Path(sys.prefix)), str(venv)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(venv / "bin" / "python")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (SQLite and artifacts in a temporary folder); its http:// address."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server",
                                 "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                                 "--artifacts-destination", str(folder / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url) or proc.poll() is not None, 180, "mlflow server", interval=1)
        assert proc.poll() is None, (folder / "server.log").read_text()[-3000:]
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="session")
def ray_cluster(ray_python) -> Iterator[dict[str, str]]:
    """``ray start --head`` on 127.0.0.1 with 2 CPUs, in its own session; the address and the environment
    its workers and drivers need (this checkout's orpolab first on the path)."""
    import tempfile

    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(Path(ray_python).with_name("ray"))
    with open(Path(temp) / "head.log", "w") as log:
        proc = subprocess.Popen([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                                 "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
                                 "--disable-usage-stats", "--temp-dir", temp, "--block"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                return True
            return subprocess.run([ray, "status", "--address", address], env=env, capture_output=True,
                                  timeout=60).returncode == 0

        wait_until(up, 180, "the Ray head node", interval=2)
        assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
        yield {"address": address, "PYTHONPATH": env["PYTHONPATH"], "RAY_USAGE_STATS_ENABLED": "0"}
    finally:
        stop_group(proc, grace=30)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
