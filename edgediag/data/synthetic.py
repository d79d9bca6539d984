"""The project's own data sets by name: each generator, its arguments, and where its data
lands. Generated once per recipe and reused (the demo and the tests need no download)."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger("edgediag.data")

# name: (generator, its arguments, sub-folder holding the data it writes)
SYNTHETIC = {
    "machine_sound": ("edgediag.data.synth_audio:generate_machine_sounds",
                      {"n_train": 48, "n_test": 32, "seconds": 4.5, "machine": "fan", "target_fraction": 0.5}, "fan"),
    "defects": ("edgediag.data.synth_images:generate_defect_images", {"n_per_class": 40, "size": 128}, ""),
    # NEU's size and shape: 6 classes x 300 grey 200x200 images (MemoryMamba's recipe set).
    "neu_like": ("edgediag.data.synth_neu:generate_neu_like", {"n_per_class": 300, "size": 200}, ""),
    "furnace": ("edgediag.data.synth_sequences:generate", {"kind": "furnace", "n_train": 32, "n_test": 12}, ""),
}


def generate_once(name: str, root: Path, seed: int) -> Path:
    """Generate synthetic set ``name`` under ``root/name`` unless the same recipe already
    did (a stamp file records it); returns the folder to train on."""
    target, kwargs, subdir = SYNTHETIC[name]
    module, fn = target.split(":")
    out = Path(root) / name
    recipe = json.dumps({"generator": target, "seed": seed, **kwargs}, sort_keys=True) + "\n"
    stamp = out / ".complete"
    if not stamp.exists() or stamp.read_text() != recipe:  # new, or made with other settings
        shutil.rmtree(out, ignore_errors=True)
        log.info("generating synthetic %s data in %s", name, out)
        generator = getattr(importlib.import_module(module), fn)
        out_param = "out_dir" if "out_dir" in inspect.signature(generator).parameters else "out"
        generator(**{out_param: out}, seed=seed, **kwargs)
        stamp.write_text(recipe)
    return out / subdir
