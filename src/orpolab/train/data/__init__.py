"""Preference data: loading and checks, tokenizing and its cache, batches and a resumable sampler."""

from orpolab.train.data.datamodule import IndexedPairs, PairCollator, PreferenceDataModule, ResumableSampler
from orpolab.train.data.loading import (
                                        SkipRow,
                                        Splits,
                                        load_rows,
                                        normalize_row,
                                        overlap,
                                        prompt_key,
                                        read_json_rows,
                                        split_rows,
                                        three_splits,
)
from orpolab.train.data.packing import PackedPairCollator
from orpolab.train.data.tokenize import PreparedData, ensure_chat_template, prepare, render, tokenize_pair

__all__ = ["IndexedPairs", "PackedPairCollator", "PairCollator", "PreferenceDataModule", "PreparedData",
           "ResumableSampler", "SkipRow",
           "ensure_chat_template", "load_rows", "normalize_row", "prepare", "read_json_rows", "render",
           "split_rows", "tokenize_pair", "Splits", "overlap", "prompt_key", "three_splits"]
