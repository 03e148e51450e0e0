"""Blind side-by-side human review of an evaluation's answers, in the browser (``python -m orpolab.evaluate.review``).

:mod:`.source` reads what the evaluation saved, :mod:`.ratings` keeps each reviewer's ratings file,
:mod:`.server` serves the page; :mod:`orpolab.evaluate.human` turns the ratings into the report's figures.
"""
