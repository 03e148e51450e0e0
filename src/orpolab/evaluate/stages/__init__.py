"""The evaluation's stages, in the order they run; each is ``run(plan)`` over an
:class:`~orpolab.evaluate.plan.EvaluationPlan` and resumes from the files it already wrote."""
