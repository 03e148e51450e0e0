"""Every job of a sweep checked before the first one starts.

Hydra composes a multirun's config once, without the sweep's values (``orpo.beta=0.05,0.1`` is not
in it), and each job's own config only when the launcher starts that job. So a bad value in the
third job (``orpo.beta=0.1,-1``), or a sweep value of the wrong type (``optim.lr=abc,1e-4``), would
otherwise stop the sweep after the first jobs have trained, and leave their runs behind.

When the multirun starts (``SweepCallback.on_multirun_start``), :func:`check_sweep` therefore
expands the sweep into the jobs' override lists exactly as Hydra's basic sweeper will
(``BasicSweeper.split_arguments`` over ``hydra.sweeper.params`` and the command line), composes
each job's config with Hydra's own config loader (``load_sweep_config``, which the launchers call
for each job), and runs :func:`orpolab.core.validate.validate` on it. Composing takes about 0.2 s
a job. Checking each sweep value alone against the shared config would be cheaper but wrong where
values interact: ``method=orpo,dpo`` with ``optim.lr: ${lr_per_method.${method.name}}``, or
``data.max_length`` swept against ``data.max_prompt_length``.

Other sweepers (Optuna, Nevergrad, ...) choose their values while the sweep runs: for them only
the shared config is checked here.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from orpolab.core.config import describe
from orpolab.core.errors import OrpolabError
from orpolab.core.validate import problems_of

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def stop_unless_valid(config: DictConfig) -> None:
    """Print the sweep's problems as one line and exit with status 1, before any job or MLflow run exists.

    Exits rather than raises: Hydra turns an exception in a callback into a warning and goes on.
    """
    try:
        check_sweep(config)
    except OrpolabError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def check_sweep(config: DictConfig) -> None:
    """Raise an :class:`OrpolabError` naming each problem and the first job that has it (see module doc)."""
    refuse_swept_post_training(config)
    jobs = job_overrides(config)
    if jobs is None:
        problems = problems_of(config)
        if problems:
            raise OrpolabError("; ".join(problems))
        return
    loader = GlobalHydra.instance().config_loader()
    found: dict[str, list[int]] = defaultdict(list)  # problem -> the jobs that have it
    for num, overrides in enumerate(jobs):
        try:
            problems = problems_of(loader.load_sweep_config(config, list(overrides)))
        except (HydraException, OmegaConfBaseException) as err:
            problems = [composition_error(err)]
        for problem in problems:
            found[problem].append(num)
    if found:
        raise OrpolabError("; ".join(f"{problem}, in {where(nums, jobs)}" for problem, nums in found.items()))


def refuse_swept_post_training(config: DictConfig) -> None:
    """Export and evaluation settings act after training, once per sweep: a list of them is no sweep of jobs."""
    from orpolab.core.stage_config import is_post_training, is_sweep_override

    swept = [str(o) for o in config.hydra.overrides.task if is_post_training(str(o)) and is_sweep_override(str(o))]
    if swept:
        raise OrpolabError(f"{' '.join(swept)}: export and evaluation settings cannot be swept (they act after "
                           "training, once per sweep); evaluate the sweep again with other settings instead: "
                           "python -m orpolab.evaluate <sweep folder> key=value ...")


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides in launch order, as the basic sweeper splits them (None for another sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    sweeper = config.hydra.sweeper
    if sweeper._target_ != BASIC_SWEEPER:
        return None
    arguments = [f"{key}={value}" for key, value in (sweeper.params or {}).items()]
    arguments += list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [job for batch in batches for job in batch]


def composition_error(err: Exception) -> str:
    """Hydra's composition error (``Error merging override optim.lr=abc``) with its cause, in one line."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
    text = " ".join(str(err).split())
    return f"{text}: {describe(cause)}" if cause is not None else text


def where(nums: list[int], jobs: list[list[str]]) -> str:
    """Which jobs have a problem: all of them, or the first by the values the sweep varies, and how many more."""
    if len(nums) == len(jobs):
        return "every job" if len(jobs) > 1 else "the job"
    varied = {o.split("=", 1)[0] for o in jobs[0]} - {o.split("=", 1)[0] for o in set.intersection(*map(set, jobs))}
    first = " ".join(o for o in jobs[nums[0]] if o.split("=", 1)[0] in varied)
    more = f" and {len(nums) - 1} more" if len(nums) > 1 else ""
    return f"job {nums[0]} ({first}){more}"
