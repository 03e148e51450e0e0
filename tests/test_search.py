"""Hyperparameter search (hydra/sweeper=orpolab_optuna): trials as Hydra jobs, resumable, pruned, tracked."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from orpolab.core.errors import OrpolabError
from orpolab.sweep import space

from .helpers import RANDOM_TINY, ROOT, compose, job_runs, run_train, runs

# A search over the learning rate alone, trials of 6 steps validated at steps 3 and 6 on 10 held-out pairs.
SEARCH = ["-m", "hydra/sweeper=orpolab_optuna", "optim.lr=tag(log, interval(1e-4, 1e-2))", "experiment=demo",
          RANDOM_TINY, "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.enable_progress_bar=false",
          "data.max_eval_rows=10", "eval_before_training=false", "threads=1", "evaluation.enabled=false"]


def study_of(sweep: Path) -> optuna.Study:
    return optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{sweep / 'optuna.db'}")


def test_search_space_reads_hydras_sweep_syntax():
    fixed, dists = space.split(["trainer.max_steps=6", "lora.r=8,16", "optim.lr=interval(1e-4, 1e-2)"],
                               {"orpo.beta": "tag(log, interval(0.01, 1))", "optim.lr": "choice(1, 2)",
                                "data.batch_size": "range(2, 5)", "lora.alpha": "tag(int, interval(8, 64))"})
    assert fixed == ["trainer.max_steps=6"]
    beta, lr, r = dists["orpo.beta"], dists["optim.lr"], dists["lora.r"]
    assert (beta.low, beta.high, beta.log) == (0.01, 1.0, True)
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-2, False)  # the command line replaces the preset's range
    assert r.choices == (8, 16)
    assert (dists["data.batch_size"].low, dists["data.batch_size"].high) == (2, 4)  # range's stop is excluded
    assert isinstance(dists["lora.alpha"], optuna.distributions.IntDistribution)
    with pytest.raises(OrpolabError, match="positive low end"):
        space.split(["orpo.beta=tag(log, interval(0, 1))"])
    with pytest.raises(OrpolabError, match="nothing to search"):
        space.split(["orpo.beta=0.1"])


@pytest.mark.subprocess
def test_search_prunes_fails_and_exports_the_best_unpruned_trial(tiny_models, tracking_uri, tmp_path):
    # Trials 0 and 1 learn; trial 2's loss turns NaN; trial 3's rate is far too low to learn in 3 steps, so at
    # step 3 it is worse than the median of trials 0 and 1 (the pruner starts after 2 complete trials, from step 1).
    sweep = tmp_path / "sweep"
    proc = run_train([*SEARCH, "hydra.sweeper.n_trials=4",
                      "hydra.sweeper.enqueue=[{optim.lr:2e-3},{optim.lr:3e-3},{optim.lr:1e30},{optim.lr:1e-7}]",
                      "export.quant_types=[]", "export.include_base=false", "export.verify.num_texts=2",
                      f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    trials = {t.number: t for t in study_of(sweep).trials}
    jobs = {int(r.data.tags["orpolab.job_num"]): r for r in job_runs(tracking_uri)}
    # One MLflow run per trial, numbered as the trial, with its sampled value.
    assert sorted(trials) == sorted(jobs) == [0, 1, 2, 3]
    for number, trial in trials.items():
        assert float(jobs[number].data.params["optim.lr"]) == trial.params["optim.lr"]
        assert jobs[number].data.tags["orpolab.trial"] == str(number)
    states = {n: t.state.name for n, t in trials.items()}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "FAIL", 3: "PRUNED"}
    # The objective is each trial's best selection value, as MLflow and the job's result.json hold it.
    for number in [n for n, s in states.items() if s == "COMPLETE"]:
        assert trials[number].value == pytest.approx(jobs[number].data.metrics["best/val/chosen_bpb"], rel=1e-9)
        result = json.loads((sweep / str(number) / "result.json").read_text())
        assert trials[number].value == pytest.approx(result["best_value"], rel=1e-9)
    # Pruned at step 3, worse than the median of the complete trials there: KILLED in MLflow, with the step.
    pruned = trials[3]
    assert sorted(pruned.intermediate_values) == [3]
    assert pruned.intermediate_values[3] > statistics.median([trials[n].intermediate_values[3] for n in (0, 1)])
    assert jobs[3].info.status == "KILLED" and jobs[3].data.tags["orpolab.pruned_at_step"] == "3"
    assert not (sweep / "3" / "result.json").exists()
    # NaN: failed in both, with the reason, and the search went on to trial 3.
    assert jobs[2].info.status == "FAILED" and "nan" in jobs[2].data.tags["orpolab.error"]
    assert "nan" in trials[2].user_attrs["error"]
    # The winner is the best complete trial, and it was exported.
    complete = [t for t in trials.values() if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value)
    parent = next(r for r in runs(tracking_uri) if r.data.tags.get("orpolab.role") == "sweep")
    assert parent.data.tags["orpolab.winner_job"] == str(best.number)
    export = json.loads((sweep / "export" / "export.json").read_text())
    assert export["passed"] and (sweep / "export" / "gguf" / "winner-f16.gguf").is_file()
    summary = json.loads((sweep / "search.json").read_text())
    assert summary["best"]["number"] == best.number
    assert f"optim.lr={best.params['optim.lr']!r}" in summary["best"]["command"]
    assert "Search sweep: 4 trial(s): 2 complete, 1 pruned, 1 fail." in proc.stdout

    # Run again: every trial is final, so nothing trains; the pruned and the failed trial are not resumed.
    again = run_train([*SEARCH, "hydra.sweeper.n_trials=4", "export.enabled=false", f"hydra.sweep.dir={sweep}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" not in again.stdout and "Launching" not in again.stdout
    assert {t.number: t.state.name for t in study_of(sweep).trials} == states
    rerun = {int(r.data.tags["orpolab.job_num"]): r for r in job_runs(tracking_uri)}
    assert sorted(rerun) == [0, 1, 2, 3] and rerun[3].info.status == "KILLED"
    assert "orpolab.attempts" not in rerun[3].data.tags

    # The report's search section: Optuna's plots and a row per trial, the best one marked.
    from orpolab.evaluate import search_report

    md = search_report.write(sweep, tmp_path / "report").read_text()
    for png in ("search_history.png", "search_importances.png", "search_slice.png"):
        assert f"]({png})" in md and (tmp_path / "report" / png).stat().st_size > 1000
    assert f"| **{best.number}** | complete |" in md and "| 3 | pruned | 1e-07 |" in md
    command = json.loads((sweep / "search.json").read_text())["best"]["command"]  # the latest command's
    assert f"**Best trial {best.number}**" in md and command in md and "export.enabled=false" in command


def test_pruned_and_confirmation_runs_never_win():
    from orpolab.core.records import JobRecord
    from orpolab.export.winners import rank

    def cand(job: int, value: float, status: str = "FINISHED", confirm_of: str | None = None) -> JobRecord:
        return JobRecord(run_id=f"r{job}", job_num=job, status=status, value=value, best_checkpoint=None,
                         output_dir=None, overrides="", start_time=job, confirm_of=confirm_of)

    ranking = rank([cand(0, 2.0), cand(1, 0.5, "KILLED"), cand(2, 1.0), cand(3, 0.9, confirm_of="2")], "min")
    assert [c.job_num for c in ranking] == [2, 0]


@pytest.mark.subprocess
def test_a_killed_search_resumes_its_trial_and_ends_with_exactly_n_trials(tiny_models, tracking_uri, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*SEARCH, "hydra.sweeper.n_trials=3", "hydra/sweeper/pruner=none", "export.enabled=false",
            f"hydra.sweep.dir={sweep}"]
    # Killed once trial 1 has its first checkpoint (step 3 of 6).
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = sweep / "1" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_file()
    assert {t.number: t.state.name for t in study_of(sweep).trials} == {0: "COMPLETE", 1: "RUNNING"}

    again = run_train(args)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    assert "resuming 1 interrupted trial(s): 1" in again.stdout
    trials = study_of(sweep).trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    jobs = job_runs(tracking_uri)
    assert sorted(int(r.data.tags["orpolab.job_num"]) for r in jobs) == [0, 1, 2]  # no duplicates
    by_num = {int(r.data.tags["orpolab.job_num"]): r for r in jobs}
    assert by_num[1].data.tags["orpolab.attempts"] == "2"
    assert by_num[1].data.tags["orpolab.resumed_from"] == str(checkpoint)
    assert by_num[0].data.tags.get("orpolab.attempts", "1") == "1"  # finished: not run again
    # The resumed command's sampler did not start its seeded sequence again: no trial repeats another's values.
    assert len({t.params["optim.lr"] for t in trials}) == 3
    for t in trials:  # each trial kept its own values and got its own job's value
        assert float(by_num[t.number].data.params["optim.lr"]) == t.params["optim.lr"]
        assert t.value == pytest.approx(by_num[t.number].data.metrics["best/val/chosen_bpb"], rel=1e-9)


@pytest.mark.subprocess
def test_a_range_reaching_an_invalid_value_stops_the_search_before_any_trial(tiny_models, tracking_uri, tmp_path):
    proc = run_train(["-m", "hydra/sweeper=orpolab_optuna", "orpo.beta=interval(-1, 1)", "experiment=demo",
                      RANDOM_TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("error: orpo.beta must be positive, got -1.0 (method orpo), in "
                                                    "the search's range (orpo.beta=-1.0)")
    assert not (tmp_path / "sweep" / "optuna.db").exists() and not (tmp_path / "sweep" / "0").exists()
    assert runs(tracking_uri) == []


def test_the_benchmark_counts_a_search_by_the_steps_its_trials_trained():
    sys.path.insert(0, str(ROOT / "bench"))
    from search_vs_grid import best_within_budget

    trials = [{"number": 0, "state": "COMPLETE", "value": 0.5, "last_step": 30},
              {"number": 1, "state": "PRUNED", "value": 0.9, "last_step": 10},   # costs the 10 steps it trained
              {"number": 2, "state": "FAIL", "value": None, "last_step": None},  # failed at once: no steps
              {"number": 3, "state": "COMPLETE", "value": 0.4, "last_step": 30},
              {"number": 4, "state": "COMPLETE", "value": 0.1, "last_step": 30}]  # past the budget
    assert best_within_budget(trials, budget=75, steps=30) == {"best": 0.4, "steps": 70, "trials": 4, "pruned": 1}
    assert best_within_budget(trials, budget=20, steps=30)["best"] is None


def test_presets_compose_into_an_optuna_search_of_one_method(tmp_path):
    orpo = compose(["hparams_search=orpo_optuna"], tmp_path)
    assert orpo.hydra.sweeper._target_ == "hydra_plugins.orpolab_search.OptunaSearchSweeper"
    assert orpo.method.name == "orpo" and set(orpo.hydra.sweeper.params) == {"orpo.beta", "optim.lr", "lora.r"}
    assert orpo.hydra.sweeper.confirm_seeds == 3 and orpo.hydra.sweeper.sampler.n_startup_trials < 10
    assert orpo.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    dpo = compose(["hparams_search=dpo_optuna", "hydra/sweeper/pruner=hyperband"], tmp_path)
    assert dpo.method.name == "dpo" and "method.beta" in dpo.hydra.sweeper.params
    assert dpo.hydra.sweeper.pruner._target_ == "optuna.pruners.HyperbandPruner"
    demo = compose(["experiment=demo_search"], tmp_path)
    assert demo.hydra.sweeper.n_trials == 8 and demo.task_name == "demo_search"
