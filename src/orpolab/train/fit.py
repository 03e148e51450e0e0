"""The training proper of one job, as steps: setup (data, model, module) -> trainer -> fit -> result.

:func:`fit` raises on any problem; ``orpolab.train.job`` records it on the job's MLflow run. The
``job`` argument is the job's run (``tracking.JobRun``), or on ranks other than 0 a stand-in that
records nothing (``orpolab.train.job.NullJob``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from orpolab.core import launcher, records, tracking
from orpolab.core.config import DataConfig, LoraSettings, MethodConfig, ModelConfig, OptimConfig, settings
from orpolab.core.errors import OrpolabError
from orpolab.core.files import relative_to, write_json_atomic
from orpolab.core.machine import available_cores
from orpolab.train.checkpoints import AtomicCheckpointIO, remove_partial_saves
from orpolab.train.data import PreferenceDataModule, prepare
from orpolab.train.data.tokenize import PreparedData
from orpolab.train.logps import packing_blocker
from orpolab.train.model import apply_lora, load_model, load_tokenizer
from orpolab.train.module import PreferenceModule
from orpolab.train.trial import PruningReporter, load_trial, trial_of_job

log = logging.getLogger(__name__)

# The two checkpoints every job keeps (conf/callbacks/default.yaml): the best by the selection metric,
# which the export uses, and the latest, which a resumed job continues.
BEST_CHECKPOINT, LAST_CHECKPOINT = "model_checkpoint", "last_checkpoint"


@dataclass(frozen=True)
class Setup:
    """What :func:`fit` trains: the module (model, LoRA, loss) and the data."""

    module: PreferenceModule
    datamodule: PreferenceDataModule
    data: PreparedData
    model_name: str


@dataclass(frozen=True)
class Checkpoints:
    """The job's two checkpoint callbacks: the best by the selection metric and the latest (``last.ckpt``)."""

    best: ModelCheckpoint
    last: ModelCheckpoint


def fit(cfg: DictConfig, job: tracking.JobRun, output_dir: Path, resume: str | None = None) -> float:
    """The training proper; raises on any problem (``run`` records it).

    ``resume``: a checkpoint to continue from (a resumed sweep job); else ``resume_from`` decides.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    threads = torch_threads(cfg)
    torch.set_num_threads(threads)
    job.set_tags({records.TORCH_THREADS: str(threads)})
    parts = setup(cfg, job)
    trainer, checkpoints = build_trainer(cfg, job, output_dir)
    ckpt_path = resume or resolve_resume(cfg.resume_from, output_dir / "checkpoints")
    if cfg.eval_before_training and ckpt_path is None:
        trainer.validate(parts.module, datamodule=parts.datamodule, verbose=False)
    # weights_only: a checkpoint holds tensors and plain values; unpickling anything else could run code.
    trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True)
    return record_result(cfg, job, trainer, checkpoints, parts, output_dir)


def setup(cfg: DictConfig, job: tracking.JobRun) -> Setup:
    """Tokenizer, data (its figures logged), base model with LoRA, and the module with its loss."""
    model_cfg = settings(ModelConfig, cfg.model, "model")
    lora_cfg = settings(LoraSettings, cfg.lora, "lora")
    data_cfg = settings(DataConfig, cfg.data, "data")
    method_cfg = settings(MethodConfig, cfg.method, "method")
    optim_cfg = settings(OptimConfig, cfg.optim, "optim")

    tokenizer = load_tokenizer(model_cfg)
    log.info("tokenizer: %s (%d tokens)", model_cfg.name_or_path, len(tokenizer))
    data = prepare(data_cfg, tokenizer)
    log.info("data: %d train and %d held-out pairs from %s (hash %s)", data.stats["train_pairs"],
             data.stats["eval_pairs"], data_cfg.path, data.data_hash)
    log_data(job, data)

    base = load_model(model_cfg, lora_cfg, bool(cfg.trainer.gradient_checkpointing))
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
    return Setup(module, datamodule, data, model_cfg.name_or_path)


def log_data(job: tracking.JobRun, data: PreparedData) -> None:
    """The data's hash and figures on the job's run (what was kept, skipped, truncated)."""
    stats = data.stats
    job.set_tags({records.DATA_HASH: data.data_hash})
    job.log_metrics({"data/train_pairs": stats["train_pairs"], "data/eval_pairs": stats["eval_pairs"],
                     "data/train_skipped": sum(stats["train_skipped"].values()),
                     "data/eval_skipped": sum(stats["eval_skipped"].values()),
                     "data/train_truncated": stats["train_truncated"],
                     "data/test_rows": stats.get("test_rows", 0),
                     "data/test_prompts_in_train": stats.get("test_prompts_in_train", 0)})
    job.log_dict(stats, "data_stats.json")


def build_trainer(cfg: DictConfig, job: tracking.JobRun,
                  output_dir: Path) -> tuple[L.Trainer, Checkpoints]:
    """Lightning's trainer with the job's callbacks (a search trial's pruning reporter too) and its logger."""
    from hydra.utils import instantiate

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True, enum_to_str=True)
    trainer_cfg.pop("gradient_checkpointing", None)  # not a Trainer argument: applied to the model
    remove_partial_saves(output_dir / "checkpoints")
    callbacks = build_callbacks(cfg, output_dir / "checkpoints", trainer_cfg["enable_progress_bar"])
    checkpoints = checkpoints_of(callbacks, cfg.selection.metric)
    extra = trial_callbacks(cfg, job)
    log.info("callbacks: %s", ", ".join(type(c).__name__ for c in [*callbacks.values(), *extra]))
    logger = instantiate(cfg.logger.mlflow, run_id=job.run_id)  # into the job's own run, created before
    log.info("logger: %s, run %s", type(logger).__name__, job.run_id)
    # The datamodule's sampler shards the data across ranks itself and counts the samples done over all
    # of them, so a resumed DDP job continues the global order exactly; Lightning's own distributed
    # sampler would shard a second time.
    trainer = instantiate(trainer_cfg, callbacks=[*callbacks.values(), *extra], logger=logger,
                          default_root_dir=str(output_dir), plugins=trainer_plugins(), use_distributed_sampler=False)
    log.info("trainer: %s, %s steps, precision %s", trainer.accelerator.__class__.__name__, trainer.max_steps,
             trainer.precision)
    job.set_tags({records.WORLD_SIZE: str(trainer.world_size)})
    return trainer, checkpoints


def build_callbacks(cfg: DictConfig, checkpoint_dir: Path, show_progress: bool) -> dict[str, Callback]:
    """``cfg.callbacks`` by name, each complete as instantiated: checkpoints write into ``checkpoint_dir``,
    and a progress bar exists only when the trainer shows one (Lightning refuses one it was told not to show).

    The values are plain (``mode: ${selection.mode}`` is an enum in the config): Lightning writes a
    callback's mode into the key of its state in checkpoints, which must be a str to be found again.
    """
    from hydra.utils import get_class, instantiate

    callbacks: dict[str, Callback] = {}
    for name, node in OmegaConf.to_container(cfg.callbacks, resolve=True, enum_to_str=True).items():
        if node is None:  # removed by an override (callbacks.early_stopping=null)
            continue
        if "_target_" not in node:
            raise OrpolabError(f"callbacks.{name} names no _target_ (a Lightning callback's class)")
        cls = get_class(node["_target_"])
        if issubclass(cls, ProgressBar) and not show_progress:
            continue
        extra = {"dirpath": str(checkpoint_dir)} if issubclass(cls, ModelCheckpoint) else {}
        callbacks[name] = instantiate(node, **extra)
    return callbacks


def checkpoints_of(callbacks: dict[str, Callback], metric: str) -> Checkpoints:
    """The best and the latest checkpoint callbacks, by their names in ``conf/callbacks/default.yaml``."""
    best, last = callbacks.get(BEST_CHECKPOINT), callbacks.get(LAST_CHECKPOINT)
    if not (isinstance(best, ModelCheckpoint) and best.monitor == metric
            and isinstance(last, ModelCheckpoint) and last.monitor is None):
        raise OrpolabError(f"callbacks.{BEST_CHECKPOINT} must be a ModelCheckpoint monitoring the selection metric "
                           f"and callbacks.{LAST_CHECKPOINT} one without a monitor (conf/callbacks/default.yaml "
                           "has both)")
    return Checkpoints(best, last)


def trial_callbacks(cfg: DictConfig, job: tracking.JobRun) -> list[Callback]:
    """A trial of a hyperparameter search reports to its pruner at every validation (tagged as a trial)."""
    trial = trial_of_job()
    if trial is None:
        return []
    handle = load_trial(trial)
    confirm_of = handle.user_attrs.get("confirm_of")  # a re-run of the best trial with another seed
    job.set_tags({records.TRIAL: str(trial.number), records.STUDY: trial.study,
                  **{f"{records.SEARCH_PARAM}{k}": str(v) for k, v in handle.params.items()},
                  **({records.CONFIRM_OF: str(confirm_of)} if confirm_of is not None else {})})
    return [PruningReporter(handle, cfg.selection.metric, prune=confirm_of is None)]


def record_result(cfg: DictConfig, job: tracking.JobRun, trainer: L.Trainer, checkpoints: Checkpoints,
                  parts: Setup, output_dir: Path) -> float:
    """The best selection value on the run, and ``result.json`` in the job's folder; returns the value."""
    best_ckpt = checkpoints.best
    if best_ckpt.best_model_score is None:
        raise OrpolabError(
            f"no value of the selection metric {cfg.selection.metric} was logged; make sure "
            "trainer.val_check_interval is at most trainer.max_steps"
        )
    best = float(best_ckpt.best_model_score)
    job.log_metrics({records.best_metric(cfg.selection.metric): best}, step=trainer.global_step)
    # Checkpoints relative to the job's folder (the one holding result.json), so a sweep folder can move.
    result = {
        "run_id": job.run_id, "selection_metric": cfg.selection.metric, "selection_mode": str(cfg.selection.mode),
        "best_value": best, "best_checkpoint": relative_to(best_ckpt.best_model_path, output_dir),
        "last_checkpoint": relative_to(checkpoints.last.best_model_path, output_dir),
        "global_step": trainer.global_step, "model": parts.model_name, "data_hash": parts.data.data_hash,
    }
    job.set_tags({records.BEST_CHECKPOINT: best_ckpt.best_model_path})
    if trainer.is_global_zero:
        write_json_atomic(output_dir / "result.json", result)
    return best


def torch_threads(cfg: DictConfig) -> int:
    """``threads``, else the machine's cores shared among the jobs a parallel launcher runs at once.

    Without it, two joblib jobs on two cores each start two threads and slow each other down.
    """
    if cfg.threads:
        return int(cfg.threads)
    parallel = launcher.parallel_jobs(HydraConfig.get().launcher) if HydraConfig.initialized() else 1
    return max(1, available_cores() // parallel)


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


def resolve_resume(resume_from: str | None, checkpoint_dir: Path) -> str | None:
    """``resume_from=last`` continues this job's own last checkpoint; a path resumes that file."""
    if not resume_from:
        return None
    path = checkpoint_dir / "last.ckpt" if resume_from == "last" else Path(resume_from)
    if not path.is_file():
        raise OrpolabError(f"cannot resume: checkpoint {path} does not exist")
    return str(path)
