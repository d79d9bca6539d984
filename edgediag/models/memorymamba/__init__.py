"""MemoryMamba: a memory-augmented 2D state-space backbone for defect images."""

from edgediag.models.memorymamba import pruning  # noqa: F401 - registers its layers' pruners
from edgediag.models.memorymamba.model import (  # noqa: F401 - importing registers the family
    ConvBNStem,
    ConvStem,
    DropPath,
    MemoryMamba,
    MemoryMambaConfig,
    MemoryNetwork,
    MemSSMBlock,
    Mlp,
    PatchMerging,
    similarity,
)
