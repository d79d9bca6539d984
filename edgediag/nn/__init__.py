"""Neural-network building blocks (Mamba mixers, VMamba SS2D)."""

from edgediag.nn.mamba import SS2D, BiMambaMixer, MambaMixer

__all__ = ["MambaMixer", "BiMambaMixer", "SS2D"]
