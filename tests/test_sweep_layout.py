"""A sweep folder written by an older layout of orpolab is refused with the version that wrote it and what to do."""

from __future__ import annotations

import json
import pickle
import pickletools

import pytest

from orpolab.core import sweep_layout
from orpolab.core.errors import OrpolabError

RETRY = "start a new sweep"


def stack_global_pickle(module: str, name: str) -> bytes:
    """A protocol-4 pickle referring to ``module.name`` as cloudpickle writes a function by reference
    (STACK_GLOBAL), built by hand: the module need not exist here, and nothing is ever unpickled."""
    def text(s: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()

    body = text(module) + pickle.MEMOIZE + text(name) + pickle.MEMOIZE + pickle.STACK_GLOBAL + pickle.STOP
    return pickle.PROTO + bytes([4]) + body


def test_hand_built_pickles_are_well_formed():
    ops = [op.name for op, _, _ in pickletools.genops(stack_global_pickle("orpolab.train", "main"))]
    assert ops == ["PROTO", "SHORT_BINUNICODE", "MEMOIZE", "SHORT_BINUNICODE", "MEMOIZE", "STACK_GLOBAL", "STOP"]


OLD_PICKLES = [stack_global_pickle("orpolab.train", "main"), b"corpolab.callbacks\nrun_post_stages\n."]


def hydra_callback(target: str) -> str:
    return f"hydra:\n  callbacks:\n    sweep:\n      _target_: {target}\n"


@pytest.mark.parametrize("data", OLD_PICKLES)
def test_a_sweep_whose_pickled_jobs_name_old_modules_is_refused(tmp_path, data):
    (tmp_path / ".submitit" / "123").mkdir(parents=True)
    (tmp_path / ".submitit" / "123" / "123_submitted.pkl").write_bytes(data)
    with pytest.raises(OrpolabError) as err:
        sweep_layout.check_sweep(tmp_path, RETRY)
    message = str(err.value)
    assert "before its stage packages (before commit 5122ee5)" in message
    assert ".submitit/123/123_submitted.pkl" in message
    assert message.endswith(f"finish it with that version (git checkout 5122ee5~1), or {RETRY}")


def test_a_sweep_whose_hydra_files_name_old_modules_is_refused(tmp_path):
    (tmp_path / "multirun.yaml").write_text(hydra_callback("orpolab.callbacks.SweepCallback"))
    with pytest.raises(OrpolabError, match=r"multirun.yaml names orpolab.callbacks, which no longer exists"):
        sweep_layout.check_sweep(tmp_path, RETRY)


def test_a_sweep_of_this_layout_passes_and_is_stamped_once(tmp_path):
    (tmp_path / "multirun.yaml").write_text(hydra_callback("orpolab.sweep.callbacks.SweepCallback"))
    (tmp_path / ".submitit" / "1").mkdir(parents=True)
    (tmp_path / ".submitit" / "1" / "1_submitted.pkl").write_bytes(stack_global_pickle("orpolab.train.job", "main"))
    sweep_layout.check_sweep(tmp_path, RETRY)  # unstamped (started before stamps) and no old module: accepted
    sweep_layout.stamp(tmp_path, "abc123")
    sweep_layout.stamp(tmp_path, "def456")  # a later command leaves the first stamp
    stamped = json.loads((tmp_path / sweep_layout.STAMP).read_text())
    assert stamped["layout"] == sweep_layout.LAYOUT and stamped["commit"] == "abc123"
    sweep_layout.check_sweep(tmp_path, RETRY)


def test_a_stamp_of_another_layout_names_the_version_that_wrote_it(tmp_path):
    stamp = tmp_path / sweep_layout.STAMP
    stamp.write_text(json.dumps({"layout": sweep_layout.LAYOUT - 1, "orpolab": "0.0.9", "commit": "abc123"}))
    with pytest.raises(OrpolabError) as err:
        sweep_layout.check_sweep(tmp_path, RETRY)
    assert str(err.value) == (f"sweep folder {tmp_path} was written by orpolab 0.0.9 (commit abc123, layout "
                              f"{sweep_layout.LAYOUT - 1}), whose files this version does not read: finish it with "
                              f"that commit, or {RETRY}")
    stamp.write_text(json.dumps({"layout": sweep_layout.LAYOUT + 1, "orpolab": "9.0", "commit": "fff"}))
    with pytest.raises(OrpolabError, match="a newer version than this one: update this checkout"):
        sweep_layout.check_sweep(tmp_path, RETRY)


def test_an_export_without_the_winners_job_folder_says_to_export_again(tmp_path):
    expected = rf"before commit 86983ec\); export it again: python -m orpolab.export {tmp_path}$"
    with pytest.raises(OrpolabError, match=expected):
        sweep_layout.check_export(tmp_path, {"winner": {"best_checkpoint": "/old/0/checkpoints/best.ckpt"}})
    sweep_layout.check_export(tmp_path, {"winner": {"job_dir": "0"}})
