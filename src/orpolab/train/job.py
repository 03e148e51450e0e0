"""One training job, top to bottom: config -> MLflow run -> data -> model -> fit -> best value.

``train.py`` at the project root is the Hydra entry point and calls :func:`run`.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from orpolab.core import console, tracking
from orpolab.core.config import DataConfig, LoraSettings, MethodConfig, ModelConfig, OptimConfig, settings
from orpolab.core.errors import OrpolabError
from orpolab.core.files import relative_to, write_json_atomic
from orpolab.core.machine import available_cores
from orpolab.core.validate import validate
from orpolab.train.checkpoints import AtomicCheckpointIO, remove_partial_saves
from orpolab.train.data import PreferenceDataModule, prepare
from orpolab.train.logps import packing_blocker
from orpolab.train.model import apply_lora, load_model, load_tokenizer
from orpolab.train.module import PreferenceModule
from orpolab.train.trial import PruningReporter, TrialPruned, load_trial, trial_of_job

log = logging.getLogger(__name__)


def job_context(cfg: DictConfig, create_parent: bool = True) -> dict:
    """Where this job writes and how it sits in a sweep (works with and without Hydra's runtime)."""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        return {
            "output_dir": hc.runtime.output_dir,
            "multirun": multirun,
            "sweep_dir": str(Path(hc.sweep.dir).resolve()) if multirun else None,
            "job_num": str(hc.job.num) if multirun else "0",
            "overrides": " ".join(hc.overrides.task),
            "parent_run_id": tracking.ensure_sweep_run(
                cfg.logger.mlflow.tracking_uri, cfg.logger.mlflow.experiment_name,
                str(Path(hc.sweep.dir).resolve()), list(hc.overrides.task)) if multirun and create_parent else None,
        }
    return {"output_dir": cfg.paths.output_dir, "multirun": False, "sweep_dir": None, "job_num": "0",
            "overrides": "", "parent_run_id": None}


def torch_threads(cfg: DictConfig) -> int:
    """``threads``, else the machine's cores shared among the jobs a parallel launcher runs at once.

    Without it, two joblib jobs on two cores each start two threads and slow each other down.
    """
    if cfg.get("threads"):
        return int(cfg.threads)
    parallel = 1
    if HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else None
        if n_jobs and int(n_jobs) > 0:
            parallel = int(n_jobs)
    return max(1, available_cores() // parallel)


def global_rank() -> int:
    """This process's rank in a multi-process job (0 when there is only one process).

    Lightning's DDP launcher starts ranks 1..N-1 by re-running the command with ``LOCAL_RANK``
    set; torchrun and Slurm set ``RANK``. Only rank 0 creates and writes the job's MLflow run.
    """
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class NullJob:
    """Stands in for the MLflow run on ranks other than 0, where Lightning's logger is silent too."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def run(cfg: DictConfig) -> float | None:
    """Train one job; returns its best selection value (None for a failed job inside a sweep)."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        # A single run is checked here, before its MLflow run exists; a sweep checked every job's
        # config before its first job started (orpolab.sweep.preflight).
        validate(cfg)
    if global_rank() != 0:
        return fit(cfg, NullJob(), Path(job_context(cfg, create_parent=False)["output_dir"]))
    ctx = job_context(cfg)
    mlcfg = cfg.logger.mlflow
    job: tracking.JobRun | None = None
    resume = None
    try:
        previous = tracking.find_job_run(mlcfg.tracking_uri, ctx["parent_run_id"], ctx["job_num"]) \
            if ctx["multirun"] else None
        if previous is not None:
            done = finished_value(previous, Path(ctx["output_dir"]))
            if done is not None:
                log.info("job %s finished in an earlier run of this sweep (%s); skipped", ctx["job_num"],
                         previous.info.run_id, extra=console.SHOW)
                return done
            if previous.info.status in ("KILLED", "FAILED") and trial_of_job() is not None:
                # A search's pruned and failed trials are final (a grid job's failure is retried).
                log.info("trial %s ended %s in an earlier run of this search; not re-run", ctx["job_num"],
                         previous.info.status, extra=console.SHOW)
                return None
            # Interrupted (killed, preempted) or failed before: continue the same MLflow run, from
            # the job's last checkpoint when it has one.
            job = tracking.JobRun(mlcfg.tracking_uri, previous.info.run_id)
            job.reopen()
            last = Path(ctx["output_dir"]) / "checkpoints" / "last.ckpt"
            resume = str(last) if last.is_file() else None
            attempts = int(previous.data.tags.get("orpolab.attempts", "1")) + 1
            job.set_tags({"orpolab.attempts": str(attempts), "orpolab.resumed_from": resume or "start",
                          "orpolab.error": ""})
            log.info("job %s: resuming run %s from %s", ctx["job_num"], job.run_id, resume or "the start",
                     extra=console.SHOW)
        else:
            job = start_job_run(cfg, ctx)
        best = fit(cfg, job, Path(ctx["output_dir"]), resume)
    except TrialPruned as pruned:  # the search's pruner stopped this trial: final, never resumed
        job.prune(pruned.step, pruned.value)
        log.info("trial %s %s", ctx["job_num"], pruned, extra=console.SHOW)
        return None
    except Exception as err:
        if job is None:  # the config itself failed to resolve: still leave a FAILED run behind
            job = tracking.JobRun.start(mlcfg.tracking_uri, mlcfg.experiment_name, f"job {ctx['job_num']}",
                                        base_tags(ctx), {})
        job.fail(err)
        if not ctx["multirun"]:
            raise
        # A sweep goes on: the failure is on the job's MLflow run and in the closing summary.
        log.error("job %s failed: %s: %s", ctx["job_num"], type(err).__name__, err)
        return None
    finally:
        release_memory()
    job.finish()
    return best


def release_memory() -> None:
    """Between jobs of the basic launcher (one process): free the finished job's model and its cache.

    ``malloc_trim`` hands the freed heap back to the OS on glibc, so the process's memory reflects
    what the next job needs rather than the high-water mark of all earlier ones.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def finished_value(previous, output_dir: Path) -> float | None:
    """The best value of a job that already finished (run FINISHED and its result.json written)."""
    import json

    result = output_dir / "result.json"
    if previous.info.status != "FINISHED" or not result.is_file():
        return None
    value = json.loads(result.read_text()).get("best_value")
    return float(value) if value is not None else None


def base_tags(ctx: dict) -> dict[str, str]:
    tags = {tracking.ROLE_TAG: "job", "orpolab.job_num": ctx["job_num"], "orpolab.overrides": ctx["overrides"],
            "orpolab.output_dir": str(Path(ctx["output_dir"]).resolve())}
    if ctx["sweep_dir"]:
        tags[tracking.SWEEP_TAG] = ctx["sweep_dir"]
        tags[tracking.PARENT_TAG] = ctx["parent_run_id"]
    return tags


def start_job_run(cfg: DictConfig, ctx: dict) -> tracking.JobRun:
    """The job's MLflow run (a child of the sweep's parent run), with params and tags."""
    mlcfg = cfg.logger.mlflow
    tags = {
        **base_tags(ctx), "orpolab.model": str(cfg.model.name_or_path), "orpolab.method": str(cfg.method.name),
        "orpolab.selection_metric": cfg.selection.metric, "orpolab.selection_mode": str(cfg.selection.mode),
        **tracking.reproducibility_tags(cfg.paths.root_dir),
    }
    name = f"job {ctx['job_num']}: {ctx['overrides']}" if ctx["multirun"] else cfg.task_name
    return tracking.JobRun.start(mlcfg.tracking_uri, mlcfg.experiment_name, name, tags, tracking.flatten(cfg))


def fit(cfg: DictConfig, job: tracking.JobRun, output_dir: Path, resume: str | None = None) -> float:
    """The training proper; raises on any problem (``run`` records it).

    ``resume``: a checkpoint to continue from (a resumed sweep job); else ``resume_from`` decides.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    threads = torch_threads(cfg)
    torch.set_num_threads(threads)
    job.set_tags({"orpolab.torch_threads": str(threads)})
    model_cfg = settings(ModelConfig, cfg.model, "model")
    lora_cfg = settings(LoraSettings, cfg.lora, "lora")
    optim_cfg = settings(OptimConfig, cfg.optim, "optim")
    data_cfg = settings(DataConfig, cfg.data, "data")
    method_cfg = settings(MethodConfig, cfg.method, "method")

    tokenizer = load_tokenizer(model_cfg)
    log.info("tokenizer: %s (%d tokens)", model_cfg.name_or_path, len(tokenizer))
    data = prepare(data_cfg, tokenizer)
    log.info("data: %d train and %d held-out pairs from %s (hash %s)", data.stats["train_pairs"],
             data.stats["eval_pairs"], data_cfg.path, data.data_hash)
    job.set_tags({"orpolab.data_hash": data.data_hash})
    job.log_metrics({"data/train_pairs": data.stats["train_pairs"], "data/eval_pairs": data.stats["eval_pairs"],
                     "data/train_skipped": sum(data.stats["train_skipped"].values()),
                     "data/eval_skipped": sum(data.stats["eval_skipped"].values()),
                     "data/train_truncated": data.stats["train_truncated"],
                     "data/test_rows": data.stats.get("test_rows", 0),
                     "data/test_prompts_in_train": data.stats.get("test_prompts_in_train", 0)})
    job.log_dict(data.stats, "data_stats.json")

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True, enum_to_str=True)
    gradient_checkpointing = bool(trainer_cfg.pop("gradient_checkpointing", False))
    base = load_model(model_cfg, lora_cfg, gradient_checkpointing)
    model = apply_lora(base, model_cfg, lora_cfg)
    log.info("model: %s (%s%s), LoRA r=%d on %s", model_cfg.name_or_path, model_cfg.dtype,
             ", 4-bit" if lora_cfg.load_in_4bit else "", lora_cfg.r,
             lora_cfg.target_modules or model_cfg.lora_target_modules)
    module = PreferenceModule(model, method_cfg, optim_cfg, logps_chunk_size=model_cfg.logps_chunk_size)
    log.info("module: %s, lr %g, %s schedule", method_cfg.name, optim_cfg.lr, optim_cfg.schedule)
    packing = data_cfg.packing
    blocker = packing_blocker(model, data_cfg.max_length) if packing else None
    if blocker:
        log.info("data.packing off for this model: %s; one row per sequence instead", blocker)
        packing = False
    datamodule = PreferenceDataModule(data, data_cfg, tokenizer.pad_token_id, cfg.seed, packing=packing)
    log.info("datamodule: batches of %d pairs (held out: %d), %s", data_cfg.batch_size, data_cfg.eval_batch_size,
             "packed rows with shared prompts" if packing else "one row per sequence")

    from hydra.utils import instantiate

    checkpoint_dir = output_dir / "checkpoints"
    remove_partial_saves(checkpoint_dir)
    # Plain values: mode: ${selection.mode} is an enum in the config, and Lightning writes a callback's
    # mode into the key its state has in checkpoints (a str, so resuming finds it again).
    callback_nodes = OmegaConf.to_container(cfg.callbacks, resolve=True, enum_to_str=True)
    callbacks = [instantiate(node) for node in callback_nodes.values()]
    if not trainer_cfg.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    trial = trial_of_job()
    if trial is not None:  # a trial of a hyperparameter search: report to its pruner at every validation
        handle = load_trial(trial)
        confirm_of = handle.user_attrs.get("confirm_of")  # a re-run of the best trial with another seed
        callbacks.append(PruningReporter(handle, cfg.selection.metric, prune=confirm_of is None))
        job.set_tags({"orpolab.trial": str(trial.number), "orpolab.study": trial.study,
                      **{f"orpolab.search.{k}": str(v) for k, v in handle.params.items()},
                      **({"orpolab.confirm_of": str(confirm_of)} if confirm_of is not None else {})})
    log.info("callbacks: %s", ", ".join(type(c).__name__ for c in callbacks))
    checkpoints = [c for c in callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint)]
    for cb in checkpoints:
        cb.dirpath = str(checkpoint_dir)
    checkpoint = next((c for c in checkpoints if c.monitor == cfg.selection.metric), None)
    latest = next((c for c in checkpoints if c.monitor is None), None)
    if checkpoint is None or latest is None:
        raise OrpolabError("callbacks must include a ModelCheckpoint monitoring the selection metric and one "
                           "without a monitor (conf/callbacks/default.yaml has both)")
    logger = instantiate(cfg.logger.mlflow, run_id=job.run_id)  # into the job's own run, created before
    log.info("logger: %s, run %s", type(logger).__name__, job.run_id)

    # The datamodule's sampler shards the data across ranks itself and counts the samples done over all
    # of them, so a resumed DDP job continues the global order exactly; Lightning's own distributed
    # sampler would shard a second time.
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir),
                          plugins=trainer_plugins(), use_distributed_sampler=False)
    log.info("trainer: %s, %s steps, precision %s", trainer.accelerator.__class__.__name__, trainer.max_steps,
             trainer.precision)

    job.set_tags({"orpolab.world_size": str(trainer.world_size)})
    ckpt_path = resume or resolve_resume(cfg.get("resume_from"), checkpoint_dir)
    if cfg.eval_before_training and ckpt_path is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    # weights_only: a checkpoint holds tensors and plain values; unpickling anything else could run code.
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    if checkpoint.best_model_score is None:
        raise OrpolabError(
            f"no value of the selection metric {cfg.selection.metric} was logged; make sure "
            "trainer.val_check_interval is at most trainer.max_steps"
        )
    best = float(checkpoint.best_model_score)
    job.log_metrics({f"best/{cfg.selection.metric}": best}, step=trainer.global_step)
    # Checkpoints relative to the job's folder (the one holding result.json), so a sweep folder can move.
    result = {
        "run_id": job.run_id, "selection_metric": cfg.selection.metric, "selection_mode": str(cfg.selection.mode),
        "best_value": best, "best_checkpoint": relative_to(checkpoint.best_model_path, output_dir),
        "last_checkpoint": relative_to(latest.best_model_path, output_dir),
        "global_step": trainer.global_step, "model": model_cfg.name_or_path, "data_hash": data.data_hash,
    }
    job.set_tags({"orpolab.best_checkpoint": checkpoint.best_model_path})
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "result.json", result)
    return best


def trainer_plugins() -> list:
    """Atomic checkpoints; on Slurm also the cluster environment, without Lightning's own requeue.

    A Slurm job started by submitit (``hydra/launcher=slurm``) is checkpointed and requeued by
    submitit when the cluster signals preemption or the time limit (USR2); Lightning's automatic
    requeue (on USR1) would be a second mechanism requeueing the same job.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


class JobLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that the run's end status is the job's to set, not Lightning's.

    Lightning finalizes its loggers at the end of every ``validate()`` and ``fit()``: the step-0
    evaluation would mark the run FINISHED before training starts, and a killed job would then
    look finished. ``run`` sets FINISHED or FAILED itself, once the job really ends.
    """

    def finalize(self, status: str = "success") -> None:
        pass  # log_model is off, so Lightning's finalize would only set the run's status


def resolve_resume(resume_from: str | None, checkpoint_dir: Path) -> str | None:
    """``resume_from=last`` continues this job's own last checkpoint; a path resumes that file."""
    if not resume_from:
        return None
    path = checkpoint_dir / "last.ckpt" if resume_from == "last" else Path(resume_from)
    if not path.is_file():
        raise OrpolabError(f"cannot resume: checkpoint {path} does not exist")
    return str(path)



def main(cfg: DictConfig) -> float | None:
    """Hydra task function: a single run's errors become ``error: ...`` and exit 1 instead of a traceback.

    (In a sweep, ``run`` records a job's error on its MLflow run and the sweep goes on.) The traceback
    still goes to the job's log file; ``ORPOLAB_DEBUG=1`` lets it through to the console.
    """
    try:
        return run(cfg)
    except Exception as err:
        if console.debug():
            raise
        log.error("%s: %s", type(err).__name__, err, exc_info=True, extra=console.HIDE)
        print(console.error_line(err), file=sys.stderr, flush=True)
        sys.exit(1)
