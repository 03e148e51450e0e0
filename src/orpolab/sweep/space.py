"""A search space written in Hydra's sweep syntax, as Optuna distributions.

The syntax is the one lightning-hydra-template's ``hparams_search`` presets use with Hydra's Optuna
plugin, so presets read the same:

- ``interval(1e-5, 1e-3)``: a float, uniform; ``tag(log, interval(...))`` log-uniform;
  ``tag(int, interval(8, 64))`` an integer (``tag(int, log, ...)`` both);
- ``choice(8, 16, 32)`` or ``8,16,32``: a categorical choice;
- ``range(1, 10, 2)``: an integer with that step.

An override without a sweep (``trainer.max_steps=60``) is a fixed value shared by every trial.
"""

from __future__ import annotations

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from orpolab.core.errors import OrpolabError


def distribution(override: Override):
    """The Optuna distribution of one sweep override (see module doc)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        choices = [v for v in value.list]
        if any(not isinstance(c, (str, int, float, bool)) and c is not None for c in choices):
            raise OrpolabError(f"{key}: a search choice must be a plain value (str, int, float, bool), got {choices}")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            raise OrpolabError(f"{key}: range() in a search takes integers; use interval() for floats")
        # Hydra's range excludes its stop, Optuna's high is included.
        return IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step or 1))
    if isinstance(value, IntervalSweep):
        low, high, log = value.start, value.end, "log" in value.tags
        if not low < high:
            raise OrpolabError(f"{key}: interval({low}, {high}) needs its low end below its high end")
        if log and low <= 0:
            raise OrpolabError(f"{key}: a log-uniform interval needs a positive low end, got {low}")
        if "int" in value.tags:
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise OrpolabError(f"{key}: {override.input_line} is not a search range (interval, choice or range)")


def split(arguments: list[str], params: dict | None = None) -> tuple[list[str], dict]:
    """(fixed overrides, {key: distribution}) from the command line and the sweeper's ``params``.

    ``params`` come first, so a range given on the command line replaces the preset's for that key.
    """
    parser = OverridesParser.create()
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    fixed: dict[str, str] = {}
    space: dict = {}
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        fixed.pop(key, None)
        space.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.input_line
    if not space:
        raise OrpolabError("the search has nothing to search: give ranges in hydra.sweeper.params or on the "
                           "command line (orpo.beta='tag(log, interval(0.01, 1))'), or use hparams_search=...")
    return list(fixed.values()), space


def as_override(key: str, value) -> str:
    """``key=value`` for a sampled value, in the override grammar (strings quoted when they need it)."""
    if isinstance(value, str) and not all(ch.isalnum() or ch in "_-./" for ch in value):
        return f"{key}='{value}'"
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}"
