"""Defect-image classifiers: the shared base class and a small CNN baseline."""

from edgediag.models.image_cnn.model import (  # noqa: F401 - importing registers the family
    BasicBlock,
    ImageClassifier,
    ImageClassifierConfig,
    ImageClassifierExport,
    ImageCNN,
    ImageCNNConfig,
)
