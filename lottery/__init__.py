"""lottery: lottery tickets and pruning experiments in JAX.

Units everywhere: density = fraction of prunable weights kept; fraction = share of the currently
remaining weights removed in one pruning step. Nothing takes percentages.
"""

from lottery import masks

__all__ = ["masks"]
__version__ = "0.1.0"
