"""The review page's server: Flask (MLflow's own dependency), its page and a small JSON API.

It serves its own page (``static/``) and the review's items, nothing else from disk. The model names
never reach the page before the reviewer has rated every item: the server draws the A/B order, so
the page only sends which item it rated and the choice.

    GET  /             the page
    GET  /api/state    progress, and the next item to rate (prompt, reference, answers A and B)
    POST /api/rate     {prompt, pair (its code), choice, tags: {A: [...], B: [...]}, note}: saved before the answer
    GET  /api/reveal   once every item is rated: each rating with the models' names
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, jsonify, request, send_from_directory

from orpolab.evaluate.review.ratings import CHOICES, MAX_NOTE, TAGS, RatingError, RatingLog, validate
from orpolab.evaluate.review.source import ReviewSet

STATIC = Path(__file__).resolve().parent / "static"


def create_app(review: ReviewSet, log: RatingLog, reviewer: str) -> Flask:
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024  # a rating is a few hundred bytes

    def state() -> dict:
        todo = [item for item in review.items if item not in log.given]
        out = {"reviewer": reviewer, "evaluation": review.evaluation, "total": len(review.items),
               "done": len(review.items) - len(todo), "choices": list(CHOICES), "tags": list(TAGS.items()),
               "max_note": MAX_NOTE, "finished": not todo, "item": None}
        if todo:
            prompt, pair = todo[0]
            a, b, _ = review.order(reviewer, prompt, pair)
            p = review.prompts[prompt]
            reference = p.get("reference")
            out["item"] = {"prompt": prompt, "pair": review.pair_code(pair), "question": p["prompt"],
                           "reference": None if reference is None else str(reference),
                           "A": review.answers[a][prompt], "B": review.answers[b][prompt]}
        return out

    @app.get("/")
    def page():
        return send_from_directory(STATIC, "index.html")

    @app.get("/api/state")
    def get_state():
        return jsonify(state())

    @app.post("/api/rate")
    def rate():
        try:
            log.add(validate(request.get_json(silent=True), review, reviewer))
        except RatingError as err:
            return jsonify({"error": str(err)}), 400
        return jsonify(state())

    @app.get("/api/reveal")
    def reveal():
        if any(item not in log.given for item in review.items):
            return jsonify({"error": "the names are shown once every item is rated"}), 403
        rows = [{k: r[k] for k in ("prompt", "pair", "a", "b", "choice", "tags", "note")}
                for r in (log.given[item] for item in review.items)]
        return jsonify({"ratings": rows})

    @app.after_request
    def no_cache(response):
        # A reload must ask again (the next item depends on what is saved), and nothing is framed elsewhere.
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    return app
