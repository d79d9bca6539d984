"""MemoryMamba: a memory-augmented 2D state-space backbone for defect images."""

from edgediag.models.memorymamba.model import (  # noqa: F401 - importing registers the family
    MemoryMambaConfig,
    DropPath,
    Mlp,
    MemoryNetwork,
    similarity,
    MemSSMBlock,
    ConvStem,
    ConvBNStem,
    PatchMerging,
    MemoryMamba,
)
