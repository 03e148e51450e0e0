"""Training one job: data, model and LoRA, losses, the LightningModule, checkpoints, the job itself."""
