"""Training one job: data, model and LoRA, losses, the LightningModule, checkpoints, the job itself."""


def __getattr__(name: str):
    # ``orpolab.train`` was the job module before the stage packages: older submitit pickles name
    # ``orpolab.train.main``. Resolved lazily, so importing the package stays light.
    if name in ("main", "run"):
        from orpolab.train import job

        return getattr(job, name)
    raise AttributeError(f"module 'orpolab.train' has no attribute {name!r}")
