"""orpolab's Optuna search as a Hydra sweeper (``hydra/sweeper=orpolab_optuna``).

Hydra instantiates sweepers only from classes defined in the ``hydra_plugins`` namespace package,
so this module defines the class Hydra sees; everything it does is ``orpolab.sweep.search``'s.
"""

from orpolab.sweep.search import SearchSweeper


class OptunaSearchSweeper(SearchSweeper):
    """See :mod:`orpolab.sweep.search`."""
