"""orpolab: ORPO sweeps over LoRA-wrapped small language models, tracked in MLflow."""

__version__ = "0.1.0"
