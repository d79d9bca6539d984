"""pytest-benchmark suite: eager forward (raw input -> score, what export traces) of each
model family at a small config, batch 1, CPU.

    pytest benchmarks/bench_models.py --benchmark-only

Each benchmark records the model's parameters and FLOPs (``edgediag.measure.cost``, selective
scan by its formula) in ``extra_info``, so a saved run (--benchmark-json) carries the
cost beside the time (counted as every verb counts: ``scoring_costs``). ``python -m edgediag.bench`` is the full report (ONNX Runtime,
batches, memory, accuracy); this suite is for tracking regressions of the eager path.
"""

from __future__ import annotations

import pytest
import torch

from edgediag.measure.bench import scoring_module
from edgediag.measure.cost import scoring_costs
from edgediag.models import create_model, list_models

# One small variant per family (the first registered of each list), and config changes a
# bare (untrained) model needs to run: AEGAN-AD scores in its log-mel range, normally fitted
# from the training clips, with a generator score (D-* scores need fit_normal()).
FAMILIES = {
    "tastgram_mfn": (["tastgram_mfn_small", "tastgram_mfn"], {}),
    "aegan_ad": (["aegan_ad_small", "aegan_ad"], {"input_min": -80.0, "input_max": 0.0, "score": "G-x-L2-mean"}),
    "memorymamba": (["memorymamba_nano", "memorymamba_micro", "memorymamba"], {}),
    "ldmamba": (["ldmamba_small", "ldmamba"], {}),
    "image_cnn": (["image_cnn_small", "image_cnn"], {}),
    "seq_cnn": (["seq_cnn"], {}),
}
_REGISTERED = set(list_models())
MODELS = {next((n for n in names if n in _REGISTERED), names[0]): changes for names, changes in FAMILIES.values()}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_forward(benchmark, name):
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one pinned thread: comparable across loaded machines
    model = create_model(name, **MODELS[name]).eval()
    module = scoring_module(model)
    x = model.example_input(1).float()
    counted = scoring_costs(model, x)  # as every verb counts (the deployed scoring graph)
    cost = counted["flops"]
    benchmark.extra_info.update(model=name, threads=1, batch=1, input_shape=list(x.shape),
                                params=counted["params"]["total"], mflops=cost["flops"] / 1e6,
                                scan_mflops=cost["scan_flops"] / 1e6)

    def forward():
        with torch.inference_mode():
            return module(x)

    out = benchmark(forward)
    score = out[0] if isinstance(out, (tuple, list)) else out
    assert score.shape[0] == 1 and torch.isfinite(score).all()
