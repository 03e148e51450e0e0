"""Sweeps: the sweep id that makes a re-run resume, and the Hydra callback around a multirun."""
