"""Human review: the figures against hand-computed cases, what the page may send, and ratings that survive a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orpolab.core.errors import OrpolabError
from orpolab.evaluate import human
from orpolab.evaluate.report_human import human_section, human_warnings
from orpolab.evaluate.review import fold, ratings, source
from orpolab.evaluate.review.server import create_app

from .review_fixture import N_PROMPTS, ReviewServer, answer_text, make_evaluation


def rating(prompt: int, pair: str, a: str, b: str, choice: str, tags: dict | None = None, note: str = "") -> dict:
    return {"prompt": prompt, "pair": pair, "a": a, "b": b, "choice": choice, "tags": tags or {"A": [], "B": []},
            "note": note}


# ------------------------------------------------------------------ the figures, by hand


def test_cohen_kappa_against_hand_computed_values():
    # human +1 0 -1 +1, judge +1 0 +1 0: observed 2/4; marginals (-1, 0, +1) = (1, 1, 2) and (0, 2, 2),
    # chance (1·0 + 1·2 + 2·2) / 16 = 0.375; kappa = (0.5 - 0.375) / 0.625 = 0.2.
    k = human.cohen_kappa([1, 0, -1, 1], [1, 0, 1, 0])
    assert k["observed"] == pytest.approx(0.5) and k["chance"] == pytest.approx(0.375)
    assert k["value"] == pytest.approx(0.2)
    # Perfect agreement over two outcomes: 1; always the opposite of a balanced rater: chance 0.5, kappa -1.
    assert human.cohen_kappa([1, -1, 1, -1], [1, -1, 1, -1])["value"] == pytest.approx(1.0)
    assert human.cohen_kappa([1, -1, 1, -1], [-1, 1, -1, 1])["value"] == pytest.approx(-1.0)
    # Both raters give one outcome only: chance agreement is 1, kappa has no value.
    assert "undefined" in human.cohen_kappa([0, 0], [0, 0]) and "value" not in human.cohen_kappa([0, 0], [0, 0])


def test_agreement_with_and_without_ties():
    a = human.agreement([1, 0, -1, 1], [1, 0, 1, 0])
    assert a["with_ties"] == pytest.approx(0.5)  # items 1 and 2 agree
    # Without ties: items where neither called a tie are 1 (+1, +1) and 3 (-1, +1): 1 of 2.
    assert a["n_without_ties"] == 2 and a["without_ties"] == pytest.approx(0.5)


def test_win_rate_counts_ties_as_half():
    w = human.win_rate([1, 1, 0, -1], n_resamples=500, seed=3)
    assert (w["wins"], w["ties"], w["losses"]) == (2, 1, 1)
    assert w["value"] == pytest.approx((2 + 0.5) / 4)
    assert 0.0 <= w["ci_low"] <= w["value"] <= w["ci_high"] <= 1.0
    assert human.win_rate([0, 0, 0])["value"] == pytest.approx(0.5)
    assert "undefined" in human.win_rate([])


def test_outcomes_from_ratings_and_scores_are_seen_from_the_second_model():
    assert human.human_outcome(rating(0, "base~winner", "winner", "base", "A"), "base", "winner") == 1
    assert human.human_outcome(rating(0, "base~winner", "winner", "base", "B"), "base", "winner") == -1
    assert human.human_outcome(rating(0, "base~winner", "base", "winner", "tie"), "base", "winner") == 0
    assert human.human_outcome(rating(0, "base~winner", "base", "winner", "skip"), "base", "winner") is None
    assert human.judge_outcome(3, 5) == 1 and human.judge_outcome(4, 4) == 0 and human.judge_outcome(5, 1) == -1
    assert human.judge_outcome(-1, 4) is None and human.judge_outcome(None, 4) is None  # unparsable, missing


def test_two_reviewers_agreement_position_and_tags_by_hand():
    pair = "base~winner"
    alice = [rating(0, pair, "winner", "base", "A", {"A": [], "B": ["no_stop"]}),  # winner
             rating(1, pair, "base", "winner", "A"),  # base
             rating(2, pair, "base", "winner", "tie"),
             rating(3, pair, "winner", "base", "skip")]
    bob = [rating(0, pair, "base", "winner", "B", {"A": ["no_stop", "repeats"], "B": []}),  # winner
           rating(1, pair, "base", "winner", "B"),  # winner
           rating(2, pair, "winner", "base", "tie")]
    summary = human.summarize({"alice": alice, "bob": bob}, [("base", "winner")], {}, n_resamples=200)
    b = summary["between_reviewers"]["alice~bob"]
    # Items both rated (skips out): 0 (+1, +1), 1 (-1, +1), 2 (0, 0): 2 of 3 agree; without ties 1 of 2.
    assert b["n"] == 3 and b["with_ties"] == pytest.approx(2 / 3) and b["without_ties"] == pytest.approx(0.5)
    # kappa: alice (-1, 0, +1) = (1, 1, 1), bob (0, 1, 2); chance (0 + 1 + 2) / 9 = 1/3; (2/3 - 1/3) / (2/3) = 0.5.
    assert b["kappa"]["value"] == pytest.approx(0.5)
    pooled = summary["pairs"][pair]["human"]  # 6 ratings: winner 3, base 1, tie 2
    assert (pooled["wins"], pooled["ties"], pooled["losses"]) == (3, 2, 1)
    assert pooled["value"] == pytest.approx(4 / 6)
    # A chosen: alice 2 of 2, bob 0 of 2.
    assert summary["position"]["value"] == pytest.approx(0.5) and summary["position"]["n"] == 4
    assert summary["tags"] == {"base": {"no_stop": 2, "repeats": 1}}
    assert summary["skipped"] == 1 and summary["reviewers"] == {"alice": 3, "bob": 3}
    assert "judge_agreement_with_ties" not in human.metrics(summary)  # no judge scores given


def test_a_judge_that_disagrees_more_than_chance_is_named_in_the_first_lines():
    pair = "base~winner"
    # B (the winner) better on even prompts, A (the base) on odd ones; the judge says the opposite: kappa -1.
    people = [rating(i, pair, "base", "winner", "A" if i % 2 else "B") for i in range(4)]
    scores = {"base": {0: 5, 1: 2, 2: 5, 3: 2}, "winner": {0: 2, 1: 5, 2: 2, 3: 5}}
    summary = human.summarize({"alice": people}, [("base", "winner")], scores, n_resamples=200)
    assert summary["judge_vs_human"]["kappa"]["value"] == pytest.approx(-1.0)
    assert human.disagrees_beyond_chance(summary)
    assert "disagrees with the human reviewers more often than chance" in human_warnings(summary)[0]
    agreeing = {"base": scores["winner"], "winner": scores["base"]}
    assert human_warnings(human.summarize({"alice": people}, [("base", "winner")], agreeing, n_resamples=200)) == []


# ------------------------------------------------------------------ what the review shows, what it accepts


def test_pairs_are_base_against_each_model_and_each_model_against_its_quantizations():
    models = source.model_order(["winner@F16", "orpo", "base", "dpo"])
    assert models == ["base", "dpo", "orpo", "winner@F16"]
    assert source.pairs_of(["base", "winner", "winner@F16", "winner@Q8_0"]) == [
        ("base", "winner"), ("winner", "winner@F16"), ("winner", "winner@Q8_0")]


@pytest.fixture()
def evaluation(tmp_path):
    return make_evaluation(tmp_path)


def test_review_set_reads_the_evaluation_and_draws_a_recorded_order(evaluation):
    sweep, folder = evaluation
    found, review = source.load(sweep)
    assert found == folder and review.pairs == [("base", "winner")]
    # The base's last answer was skipped: that prompt is no item.
    assert review.items == [(i, "base~winner") for i in range(N_PROMPTS - 1)]
    assert review.prompts[0]["prompt"].startswith("Let ") and review.prompts[0]["reference"].startswith("The correct")
    assert review.answers["winner"][2] == answer_text("winner", 2)
    orders = {review.order("alice", p, "base~winner")[:2] for p in range(N_PROMPTS - 1)}
    assert orders == {("base", "winner"), ("winner", "base")}  # both orders occur over these prompts
    assert review.order("alice", 1, "base~winner") == review.order("alice", 1, "base~winner")
    with pytest.raises(OrpolabError, match="no evaluation 'nosuch'"):
        source.load(sweep, "nosuch")
    (sweep / "evaluation" / "0badc0de").mkdir()
    (sweep / "evaluation" / "0badc0de" / "settings.yaml").write_text("{}")
    both = ", ".join(sorted(["0badc0de", folder.name]))
    with pytest.raises(OrpolabError, match=f"2 evaluations \\({both}\\); name the one"):
        source.load(sweep)
    assert source.load(sweep, folder.name)[1].items == review.items


def test_the_page_may_send_only_known_items_choices_tags_and_a_bounded_note(evaluation):
    sweep, _ = evaluation
    _, review = source.load(sweep)
    good = {"prompt": 1, "pair": "p1", "choice": "tie", "tags": {"A": ["wrong"], "B": []}, "note": " ok "}
    r = ratings.validate(good, review, "alice")
    assert (r["a"], r["b"], r["order_seed"]) == review.order("alice", 1, "base~winner")
    assert r["note"] == "ok" and r["tags"] == {"A": ["wrong"], "B": []} and r["reviewer"] == "alice"
    bad = [({**good, "prompt": 99}, "not an item"), ({**good, "prompt": N_PROMPTS - 1}, "not an item"),
           ({**good, "prompt": True}, "not an item"), ({**good, "prompt": "1"}, "not an item"),
           ({**good, "pair": "base~winner"}, "not an item"), ({**good, "pair": "p2"}, "not an item"),
           ({**good, "choice": "C"}, "choice must be"),
           ({**good, "tags": {"A": ["rude"]}}, "tags of A"), ({**good, "tags": {"C": []}}, "tags are"),
           ({**good, "note": "x" * (ratings.MAX_NOTE + 1)}, "at most"), ({**good, "a": "winner"}, "unknown fields"),
           ([1, 2], "JSON object"), (None, "JSON object")]
    for payload, words in bad:
        with pytest.raises(ratings.RatingError, match=words):
            ratings.validate(payload, review, "alice")
    for name in ("../x", "a/b", ".hidden", "", "x" * 41, "me.jsonl", "a b"):
        with pytest.raises(OrpolabError, match="not a plain file name"):
            ratings.check_reviewer(name)
    assert ratings.check_reviewer("Ann_B.-2") == "Ann_B.-2"


def test_names_stay_hidden_until_every_item_is_rated(evaluation):
    sweep, folder = evaluation
    _, review = source.load(sweep)
    log = ratings.RatingLog(ratings.ratings_file(folder, "alice"))
    client = create_app(review, log, "alice").test_client()
    assert client.get("/").status_code == 200 and b"review.js" in client.get("/").data
    assert client.get("/static/review.js").status_code == 200
    assert client.get("/static/../ratings.py").status_code == 404  # only its own files
    for _ in review.items:
        state = client.get("/api/state").get_json()
        assert "winner" not in json.dumps(state) and "base" not in json.dumps(state)
        assert client.get("/api/reveal").status_code == 403
        item = state["item"]
        assert {item["A"], item["B"]} == {answer_text(m, item["prompt"]) for m in ("base", "winner")}
        response = client.post("/api/rate", json={"prompt": item["prompt"], "pair": item["pair"], "choice": "A"})
        assert response.status_code == 200
    again = client.post("/api/rate", json={"prompt": 0, "pair": "p1", "choice": "B"})
    assert again.status_code == 400 and "already rated" in again.get_json()["error"]
    assert client.post("/api/rate", data="not json").status_code == 400
    revealed = client.get("/api/reveal").get_json()["ratings"]
    assert [(r["prompt"], r["choice"]) for r in revealed] == [(p, "A") for p in range(N_PROMPTS - 1)]
    assert len(ratings.read_ratings(log.path)) == N_PROMPTS - 1


def test_a_torn_last_line_is_left_out_and_cut_before_the_next_rating(tmp_path):
    path = tmp_path / "review" / "alice.jsonl"
    path.parent.mkdir()
    whole = json.dumps(rating(0, "base~winner", "base", "winner", "A"))
    path.write_text(whole + "\n" + whole[:20])
    assert len(ratings.read_ratings(path)) == 1
    log = ratings.RatingLog(path)
    log.add(rating(1, "base~winner", "base", "winner", "B"))
    assert [r["prompt"] for r in ratings.read_ratings(path)] == [0, 1]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 2
    path.write_text("{broken\n" + whole + "\n")
    with pytest.raises(OrpolabError, match="line 1, is not a rating"):
        ratings.read_ratings(path)


# ------------------------------------------------------------------ a killed server loses nothing


@pytest.mark.subprocess
def test_a_killed_server_loses_no_rating_given_before(evaluation):
    sweep, folder = evaluation
    path = ratings.ratings_file(folder, "alice")
    given = []
    # The prompts are composed here once (review/prompts.json), so the server starts without the training stack.
    source.load(sweep)
    server = ReviewServer(sweep, "alice")
    try:
        for choice in ("A", "tie"):
            item = server.call("/api/state")[1]["item"]
            status, _ = server.call("/api/rate", {"prompt": item["prompt"], "pair": item["pair"], "choice": choice,
                                                  "note": f"note {choice}"})
            assert status == 200
            given.append((item["prompt"], choice))
    finally:
        server.kill()  # between the second rating and the third
    assert [(r["prompt"], r["choice"]) for r in ratings.read_ratings(path)] == given
    server = ReviewServer(sweep, "alice")  # reopening continues where the reviewer stopped
    try:
        assert any("2 of 5 rated" in line for line in server.lines)
        state = server.call("/api/state")[1]
        assert state["done"] == 2 and state["item"]["prompt"] == 2
        assert server.call("/api/rate", {"prompt": 2, "pair": "p1", "choice": "B"})[0] == 200
        given.append((2, "B"))
        bad = server.call("/api/rate", {"prompt": 3, "pair": "p1", "choice": "maybe"})
        assert bad[0] == 400 and "choice must be" in bad[1]["error"]
    finally:
        server.kill()
    assert [(r["prompt"], r["choice"]) for r in ratings.read_ratings(path)] == given
    assert [r["note"] for r in ratings.read_ratings(path)] == ["note A", "note tie", ""]


def test_the_report_section_from_the_ratings_files(evaluation):
    sweep, folder = evaluation
    _, review = source.load(sweep)
    log = ratings.RatingLog(ratings.ratings_file(folder, "alice"))
    for prompt, preferred in ((0, "winner"), (1, "tie"), (2, "base")):
        a, _, _ = review.order("alice", prompt, "base~winner")
        choice = "tie" if preferred == "tie" else ("A" if a == preferred else "B")
        log.add(ratings.validate({"prompt": prompt, "pair": "p1", "choice": choice,
                                  "note": "stops | early" if prompt == 2 else ""}, review, "alice"))
    scores = {"base": {0: 1, 1: 3, 2: 5}, "winner": {0: 4, 1: 3, 2: 1}}  # agrees on all three
    h = fold.gather(folder, ("base", "winner"), scores, n_resamples=200)
    text = "\n".join(human_section(h))
    # 1 win, 1 tie, 1 loss: (1 + 0.5) / 3 = 0.5; agreement 3 of 3; kappa 1.
    assert "| base vs winner | 1 / 1 / 1 | 0.500 [" in text
    assert "| 100% of 3 | 100% of 2 | 1.000 (observed 1.000, chance 0.333) |" in text
    assert h["per_prompt"][2] == [{"reviewer": "alice", "pair": "base~winner", "preferred": "base",
                                   "note": "stops | early"}]
    assert fold.gather(folder.parent / "nothing", ("base", "winner"), scores) == {}


# ------------------------------------------------------------------ on a real evaluated sweep


@pytest.mark.subprocess
def test_report_stage_folds_new_ratings_in_without_judging_again(own_sweep, tmp_path):
    """On the demo sweep: the review composes the evaluation's prompts as the evaluation did, and
    ``--stage report`` adds the Human review section and ``human/*`` on the evaluation's MLflow run."""
    from mlflow.tracking import MlflowClient

    from .helpers import evaluation_dir

    folder = evaluation_dir(own_sweep["dir"])
    judged = {f.name: f.read_bytes() for f in folder.glob("verdicts-*.jsonl")}
    found, review = source.load(own_sweep["dir"], folder.name)
    assert found == folder and ("base", "winner") in review.pairs and ("winner", "winner@F16") in review.pairs
    log = ratings.RatingLog(ratings.ratings_file(folder, "alice"))
    for prompt, pair in review.items[:3]:
        log.add(ratings.validate({"prompt": prompt, "pair": review.pair_code(pair), "choice": "A",
                                  "note": "checked by hand"},
                                 review, "alice"))
    reports = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "orpolab.evaluate", str(own_sweep["dir"]), "--stage", "report",
                           "--report-dir", str(reports)], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": own_sweep["uri"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (reports / own_sweep["dir"].name / folder.name / "report.md").read_text()
    assert "## Human review" in text and "by alice (3)" in text and "alice: " in text and "(checked by hand)" in text
    assert {f.name: f.read_bytes() for f in folder.glob("verdicts-*.jsonl")} == judged  # nothing judged again
    export = json.loads((own_sweep["dir"] / "export" / "export.json").read_text())
    client = MlflowClient(own_sweep["uri"])
    (run,) = client.search_runs(["1"], filter_string=f"tags.`mlflow.parentRunId` = '{export['parent_run_id']}' "
                                                      f"and tags.`orpolab.evaluation_id` = '{folder.name}'")
    assert run.data.metrics["human/ratings"] == 3
