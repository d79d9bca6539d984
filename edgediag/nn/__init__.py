"""Neural-network building blocks (Mamba mixers, VMamba SS2D), and what compression asks of
layers: the pruning registry, screening gates, removed blocks."""

from edgediag.nn import mamba_pruning  # noqa: F401 - registers the mixers' pruners with nn.pruning
from edgediag.nn.mamba import SS2D, BiMambaMixer, MambaMixer

__all__ = ["MambaMixer", "BiMambaMixer", "SS2D"]
