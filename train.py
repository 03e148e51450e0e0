"""Train with ORPO: ``python train.py`` (one job) or ``python train.py -m key=a,b ...`` (a sweep).

Configuration lives in ``conf/``; see README.md for the config groups and examples.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("ORPOLAB_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing, too

from orpolab.core import console  # noqa: E402

console.quiet_libraries()  # before the libraries are imported: their notices go to the log files

from orpolab.core.config import register_schemas  # noqa: E402
from orpolab.sweep import callbacks as sweep_callbacks  # noqa: E402
from orpolab.sweep import sweep_id  # noqa: E402
from orpolab.train.job import main as run_job  # noqa: E402

register_schemas()  # conf/train.yaml names its schema (base_train): keys and types are checked as Hydra composes
sweep_id.register()  # hydra.sweep.dir names the sweep by its derived id


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    main()
    # A sweep (-m) returns here also when a job or a post-sweep stage failed: a job's error is caught so
    # the other jobs run, and Hydra turns errors in callbacks into warnings. The sweep callback recorded
    # what failed; the exit status says it. (A single run has already exited with 1 on an error.)
    sys.exit(sweep_callbacks.exit_status())
