"""Sweeps at scale: resumed after a kill, parallel jobs, atomic checkpoints, memory between jobs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from orpolab.core.errors import OrpolabError

from .helpers import RANDOM_TINY, ROOT, compose, job_runs, losses, run_train, runs

# 48 training pairs, an epoch of 6 batches: 12 steps resume mid-epoch and cross an epoch boundary twice;
# 10 held-out pairs for each validation (what is compared is the training loss).
STEPS = ["trainer.max_steps=12", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
         "data.max_train_rows=48", "data.max_eval_rows=10"]
QUIET = ["trainer.enable_progress_bar=false", "export.enabled=false"]


def start_and_kill_when(args: list[str], ready, timeout: float = 300) -> None:
    """Start train.py like a user, SIGKILL it (the whole process group) once ``ready()`` is true."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "train.py ended before it could be killed"
            assert time.time() < deadline, "the moment to kill never came"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.subprocess
def test_killed_sweep_resumes_with_one_run_per_job_and_the_same_losses(tiny_models, tracking_uri, tmp_path):
    # The sweep folder is named by the derived sweep id: the same command finds the same sweep again.
    args = ["-m", "experiment=demo", RANDOM_TINY, *STEPS, *QUIET, "orpo.beta=0.05,0.1",
            f"hydra.sweep.dir={tmp_path}/${{orpolab_sweep_id:}}"]
    # Killed once job 1 wrote its first checkpoint (step 4 of 12), in whichever sweep folder the id names.
    start_and_kill_when(args, lambda: any(tmp_path.glob("sweep-*/1/checkpoints/last.ckpt")))
    before = {r.data.tags["orpolab.job_num"]: r for r in job_runs(tracking_uri)}
    assert before["0"].info.status == "FINISHED" and before["1"].info.status == "RUNNING"  # killed mid-job

    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 job(s) finished, 0 failed" in proc.stdout
    sweeps = [p for p in tmp_path.iterdir() if p.name.startswith("sweep-")]
    assert len(sweeps) == 1  # one sweep folder, found again by its id
    after = {r.data.tags["orpolab.job_num"]: r for r in job_runs(tracking_uri)}
    assert len(job_runs(tracking_uri)) == 2  # exactly one MLflow run per job
    assert {j: r.info.run_id for j, r in after.items()} == {j: r.info.run_id for j, r in before.items()}
    assert all(r.info.status == "FINISHED" for r in after.values())
    # Job 0 was not trained again; job 1 continued its own run from its last checkpoint.
    assert after["0"].data.tags.get("orpolab.attempts") is None
    assert after["1"].data.tags["orpolab.attempts"] == "2"
    assert after["1"].data.tags["orpolab.resumed_from"].endswith("last.ckpt")
    resumed = losses(tracking_uri, after["1"].info.run_id)
    assert sorted(resumed) == list(range(12))  # continuous history, steps 0..11
    # Only the configured checkpoints are kept (best + last), and no temporary file survived the kill.
    ckpts = sorted(p.name for p in (sweeps[0] / "1" / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[1] == "last.ckpt" and ckpts[0].startswith("best-step"), ckpts

    # The same job, uninterrupted (in-process, same seed and config): the same loss at every step.
    from orpolab.train.job import run

    run(compose(["experiment=demo", RANDOM_TINY, *STEPS, *QUIET, "orpo.beta=0.1"], tmp_path / "reference"))
    single = next(r for r in job_runs(tracking_uri) if "mlflow.parentRunId" not in r.data.tags)
    reference = losses(tracking_uri, single.info.run_id)
    assert sorted(reference) == list(range(12))
    for step in range(12):  # across the epoch boundaries (6 batches) too
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_changed_config_starts_a_new_sweep_and_sweep_id_names_one(tiny_models, tmp_path):
    from omegaconf import open_dict, read_write

    from orpolab.sweep.sweep_id import derive

    def sweep_of(sweep_list: str, others: list[str]) -> str:
        """The id of `train.py -m experiment=demo <others> <sweep_list>` (Hydra composes the others)."""
        cfg = compose(["experiment=demo", *others], tmp_path)
        with read_write(cfg.hydra.overrides), open_dict(cfg.hydra.overrides):
            cfg.hydra.overrides.task = ["experiment=demo", *others, sweep_list]
        return derive(cfg)

    a = sweep_of("orpo.beta=0.05,0.1", [])
    assert a == sweep_of("orpo.beta=0.05,0.1", []) and a.startswith("sweep-")
    assert a != sweep_of("orpo.beta=0.05,0.2", [])  # another sweep list
    assert a != sweep_of("orpo.beta=0.05,0.1", ["optim.lr=1e-3"])  # another resolved config
    assert sweep_of("orpo.beta=0.05,0.1", ["sweep_id=mine"]) == "mine"


@pytest.mark.subprocess
def test_parallel_jobs_record_every_metric_of_both(tiny_models, tracking_uri, tmp_path):
    proc = run_train(["-m", "experiment=demo", RANDOM_TINY, "trainer.max_steps=10", "trainer.val_check_interval=5",
                      "trainer.log_every_n_steps=1", "data.max_eval_rows=10", *QUIET, "orpo.beta=0.05,0.1",
                      "hydra/launcher=parallel", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_runs(tracking_uri)
    assert len(jobs) == 2 and all(r.info.status == "FINISHED" for r in jobs)
    for r in jobs:
        assert sorted(losses(tracking_uri, r.info.run_id)) == list(range(10))
        assert sorted(losses(tracking_uri, r.info.run_id, "val/chosen_bpb")) == [0, 4, 9]
        assert r.data.tags["orpolab.torch_threads"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    parents = [r for r in runs(tracking_uri) if r.data.tags.get("orpolab.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_a_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    from orpolab.train.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "x": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1  # the old checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OrpolabError, match="out of disk space writing checkpoint .*previous checkpoint is intact"):
        io.save_checkpoint({"step": 3}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


SEQUENTIAL_JOBS = """
import gc, json, sys, weakref
from pathlib import Path
import psutil
sys.path.insert(0, sys.argv[1])
from tests.helpers import RANDOM_TINY, compose
from orpolab.train import fit
from orpolab.train import job as train

alive, rss = [], []
real_apply_lora = fit.apply_lora
def tracked(*args, **kwargs):
    model = real_apply_lora(*args, **kwargs)
    alive.append(weakref.ref(model))
    return model
fit.apply_lora = tracked
for i in range(5):
    train.run(compose(["experiment=demo", RANDOM_TINY, "model=tiny_mistral", "trainer.max_steps=6",
                       "trainer.val_check_interval=3", "trainer.enable_progress_bar=false", "export.enabled=false"],
                      Path(sys.argv[2]) / f"job{i}"))
    gc.collect()
    rss.append(psutil.Process().memory_info().rss / 2**20)
print(json.dumps({"released": [ref() is None for ref in alive], "rss_mib": rss}))
"""


@pytest.mark.subprocess
def test_sequential_jobs_release_their_models(tiny_models, tracking_uri, tmp_path):
    """Jobs one after another in one process, as Hydra's basic launcher runs them (outside pytest's
    warning capture, which keeps references of its own)."""
    import json

    proc = subprocess.run([sys.executable, "-c", SEQUENTIAL_JOBS, str(ROOT), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Every job's model is gone once the job returns, and memory does not grow job after job.
    assert out["released"] == [True] * 5
    assert out["rss_mib"][-1] - out["rss_mib"][1] < 20, out["rss_mib"]  # measured here: +1.4 MiB over 4 jobs


@pytest.mark.subprocess
def test_ddp_with_two_cpu_processes_trains_one_job_with_one_run(tiny_models, tracking_uri, tmp_path):
    proc = run_train(["experiment=demo", RANDOM_TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.max_steps=10", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1",
                      "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = runs(tracking_uri)
    assert len(recorded) == 1  # rank 1 trained too, but only rank 0 talks to MLflow
    r = recorded[0]
    assert r.info.status == "FINISHED" and r.data.tags["orpolab.world_size"] == "2"
    assert sorted(losses(tracking_uri, r.info.run_id)) == list(range(10))
    bpb = losses(tracking_uri, r.info.run_id, "val/chosen_bpb")
    assert sorted(bpb) == [0, 4, 9] and bpb[9] < bpb[0]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.subprocess
def test_ddp_resumed_mid_epoch_sees_the_same_global_order_and_losses(tiny_models, tracking_uri, tmp_path):
    """Two CPU ranks, 100 pairs (7 batches of up to 8 per rank and epoch): the reference run keeps its
    checkpoint of step 3 (mid-epoch, as a kill would have left it), a second run resumes from it to step 10."""
    from .batch_record import recorded

    def ddp(name: str, *extra: str) -> str:
        proc = run_train(["experiment=demo", RANDOM_TINY, "trainer=ddp", "trainer.accelerator=cpu",
                          "trainer.devices=2", "data.max_train_rows=100", "data.max_eval_rows=20",
                          "trainer.max_steps=10", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1",
                          "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / name}",
                          "+callbacks.record._target_=tests.batch_record.RecordBatches",
                          f"+callbacks.record.folder={tmp_path / name / 'batches'}", *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(r.info.run_id for r in runs(tracking_uri)
                    if r.data.tags["orpolab.output_dir"] == str(tmp_path / name))

    reference = ddp("reference", "+callbacks.every_3._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                    "+callbacks.every_3.every_n_train_steps=3", "+callbacks.every_3.save_top_k=-1",
                    "+callbacks.every_3.filename='mid-{step}'")
    mid = tmp_path / "reference" / "checkpoints" / "mid-step=3.ckpt"
    assert torch.load(mid, weights_only=True)["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0
    resumed = ddp("resumed", f"resume_from='{mid}'")

    # The same pairs on each rank at every step after the checkpoint, the epoch boundary (step 7) included ...
    for rank in range(2):
        before = recorded(tmp_path / "reference" / "batches", rank)
        after = recorded(tmp_path / "resumed" / "batches", rank)
        assert sorted(after) == list(range(3, 10)) and all(after[s] == before[s] for s in after), rank
    # ... which together are the one global order: each step a new stretch, each epoch every pair once.
    both = [recorded(tmp_path / "reference" / "batches", r) for r in range(2)]
    epoch0 = [i for step in range(7) for rank in range(2) for i in both[rank][step]]
    assert sorted(epoch0) == list(range(100))
    # ... and the same loss at every step (rank 0's, as logged), to float tolerance.
    ref_loss, res_loss = losses(tracking_uri, reference), losses(tracking_uri, resumed)
    assert sorted(res_loss) == list(range(3, 10))
    for step in res_loss:
        assert res_loss[step] == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-6), step
    assert losses(tracking_uri, resumed, "val/chosen_bpb")[9] == pytest.approx(
        losses(tracking_uri, reference, "val/chosen_bpb")[9], rel=1e-5)


@pytest.mark.subprocess
def test_submitit_local_runs_the_sweep_and_the_post_hook_as_its_own_job(tiny_models, tracking_uri, tmp_path):
    proc = run_train(["-m", "experiment=demo", RANDOM_TINY, "trainer.max_steps=6", "trainer.val_check_interval=3",
                      "trainer.enable_progress_bar=false", "orpo.beta=0.05,0.1", "hydra/launcher=submitit_local",
                      "evaluation.enabled=false", "export.include_base=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 job(s) finished, 0 failed" in proc.stdout
    assert "submitted as local job" in proc.stdout and "finished." in proc.stdout
    # The export ran inside the submitted job (its log is there), and wrote the verified GGUFs.
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit" / "post").glob("*_log.out"))
    assert "verification (GGUF vs merged PyTorch model" in logs
    assert json.loads((tmp_path / "sweep" / "export" / "export.json").read_text())["passed"]


def test_on_slurm_only_submitit_requeues_and_another_world_size_cannot_resume_mid_epoch(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from orpolab.core.defaults import default_settings
    from orpolab.train.data import PreferenceDataModule, PreparedData
    from orpolab.train.fit import trainer_plugins

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert not any(isinstance(p, SLURMEnvironment) for p in trainer_plugins())
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    slurm = [p for p in trainer_plugins() if isinstance(p, SLURMEnvironment)]
    assert len(slurm) == 1 and slurm[0].auto_requeue is False  # Lightning's requeue off: submitit's acts

    pair = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "chosen_bytes": 1, "rejected_bytes": 1}
    data = PreparedData([pair] * 4, [pair], {}, "h")
    dm = PreferenceDataModule(data, default_settings("data", path="unused", batch_size=2), pad_token_id=0, seed=1)
    dm.trainer = SimpleNamespace(world_size=1)
    with pytest.raises(OrpolabError, match="cannot resume mid-epoch on 1 device.* written by 2; resume with "
                                           "trainer.devices=2"):
        dm.load_state_dict({"epoch": 0, "samples_done": 2, "world_size": 2})
    dm.load_state_dict({"epoch": 0, "samples_done": 4, "world_size": 2})  # at the epoch's end: nothing to skip
    assert (dm.sampler.resume_epoch, dm.sampler.resume_offset) == (0, 4)
