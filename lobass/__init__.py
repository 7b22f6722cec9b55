"""lobass: choose supervised fine-tuning data by learnability (LoBaSS, arXiv 2310.13008)."""

from lobass import config as _config  # noqa: F401  (registers the ${pkg_data:...} resolver)
from lobass.data import DataError, Example, read_examples
from lobass.pipeline import run
from lobass.scoring import SCORERS, compute_response_losses, get_scorer
from lobass.selection import SelectionRule, choose_rows, selection_size

__all__ = [
    "SCORERS",
    "DataError",
    "SelectionRule",
    "Example",
    "compute_response_losses",
    "choose_rows",
    "get_scorer",
    "read_examples",
    "run",
    "selection_size",
]
__version__ = "0.1.0"
