"""A sweep on a local Ray cluster (hydra/launcher=ray_cluster), tracked by an MLflow server over HTTP, as
several machines would: every metric of every job recorded, the winner exported by a Ray task."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from ..helpers import losses
from .helpers import STEPS, SWEEP, start_sweep, stop_group


def test_ray_sweep_logs_every_metric_over_http_and_exports_the_winner(
        ray_cluster, ray_python, mlflow_server, warm_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    sweep_dir = tmp_path / "sweep"
    # What fits this node instead of the preset's 8 CPUs and a GPU per job; the winner's evaluation is
    # left to the Slurm test (same stages), the export runs here as a Ray task.
    args = [*SWEEP, "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_cluster['address']}",
            "hydra.launcher.ray.remote.num_cpus=1", "hydra.launcher.ray.remote.num_gpus=0",
            "evaluation.enabled=false", "export.include_base=false", f"hydra.sweep.dir={sweep_dir}"]
    log = tmp_path / "sweep.log"
    proc = start_sweep(args, log, {"PYTHONPATH": ray_cluster["PYTHONPATH"]}, python=ray_python)
    try:
        proc.wait(timeout=1200)
    finally:
        stop_group(proc)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "2 job(s) finished, 0 failed" in out
    assert "submitted as a Ray task" in out and "Post-sweep task finished." in out

    client = MlflowClient(mlflow_server)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("orpolab").experiment_id])
            if r.data.tags.get("orpolab.role") == "job"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    keys = [set(r.data.metrics) for r in runs]
    assert keys[0] == keys[1] and {"train/loss", "val/loss", "val/chosen_bpb", "data/train_pairs"} <= keys[0]
    for r in runs:
        assert sorted(losses(mlflow_server, r.info.run_id)) == list(range(STEPS))  # every step, over HTTP
        assert sorted(losses(mlflow_server, r.info.run_id, "val/chosen_bpb")) == [0, 29, 59]
        assert r.data.tags["orpolab.output_dir"].startswith(str(sweep_dir))

    # The winner by the selection metric is the model exported and verified.
    metric, mode = runs[0].data.tags["orpolab.selection_metric"], runs[0].data.tags["orpolab.selection_mode"]
    best = (min if mode == "min" else max)(runs, key=lambda r: r.data.metrics[f"best/{metric}"])
    export = json.loads((sweep_dir / "export" / "export.json").read_text())
    assert export["passed"] and export["winner"]["run_id"] == best.info.run_id
    assert all(path.endswith(".gguf") for path in export["gguf"][export["winner"]["label"]].values())
