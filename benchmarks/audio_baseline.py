"""Simple machine-sound anomaly baselines, to compare models with.

Each clip becomes one vector from its log-mel spectrogram (librosa, n_fft 2048, hop 512,
128 mels, dB), standardised with the training clips' statistics; a test clip's anomaly
score is the Euclidean distance to its nearest normal training clip (scikit-learn
NearestNeighbors). Features (``--features``):

* ``meanstd``: mean and standard deviation over time of every mel band (clip statistics);
* ``max``: the maximum over time of every mel band (the loudest moment of each band:
  transients such as a valve's clicks, which means wash out);
* ``frames``: frame kNN - every frame of a test clip against every frame of the normal
  training clips, the clip scored by its frames' mean distance.

The decision threshold is calibrated like the models' (``--target-far``, default 0.1): the
empirical quantile of the training clips' leave-one-out distances (each clip against the
others), so FPR/TPR at that threshold are reported too. Scored with the same DCASE code
as the models (edgediag.engine.dcase).

    python benchmarks/audio_baseline.py ../shared/data/dcase2023_valve
    python benchmarks/audio_baseline.py ../shared/data/dcase2023_valve --features max
    python benchmarks/audio_baseline.py ../shared/data/fan_sensiml --normal ON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import librosa
import numpy as np
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediag import cli  # noqa: E402
from edgediag.data import DataConfig, build_data  # noqa: E402
from edgediag.engine.dcase import anomaly_report  # noqa: E402
from edgediag.engine.metrics import calibrate_threshold  # noqa: E402

FEATURES = ("meanstd", "max", "frames")


def log_mel(wave: np.ndarray, sr: int) -> np.ndarray:
    mel = librosa.feature.melspectrogram(y=wave, sr=sr, n_fft=2048, hop_length=512, n_mels=128)
    return librosa.power_to_db(mel)


def clip_features(wave: np.ndarray, sr: int, features: str = "meanstd") -> np.ndarray:
    """(rows, dims): one row per clip for the clip features, one per frame for ``frames``."""
    db = log_mel(wave, sr)
    if features == "meanstd":
        return np.concatenate([db.mean(axis=1), db.std(axis=1)])[None]
    if features == "max":
        return db.max(axis=1)[None]
    return db.T


def run(root: str, normal_labels: list[str], k: int = 1, features: str = "meanstd", target_far: float = 0.1) -> dict:
    cfg = SimpleNamespace(sample_rate=16000, clip_seconds=0.0, pad_mode="wrap", train_normal_only=True)
    bundle = build_data("audio", DataConfig(root=root, normal_labels=normal_labels), cfg)
    if bundle.test is None:
        raise cli.UserError(f"{root} has no test clips")
    sr = bundle.info["sample_rate"]
    train = [clip_features(bundle.train.clips[i], sr, features) for i in range(len(bundle.train))]
    test = [clip_features(bundle.test.clips[i], sr, features) for i in range(len(bundle.test))]
    rows = np.concatenate(train)
    owner = np.concatenate([np.full(len(t), i) for i, t in enumerate(train)])
    mu, sd = rows.mean(axis=0), rows.std(axis=0) + 1e-6
    rows = (rows - mu) / sd

    def distance(bank, clip):
        return float(NearestNeighbors(n_neighbors=min(k, len(bank))).fit(bank).kneighbors((clip - mu) / sd)[0].mean())

    full = NearestNeighbors(n_neighbors=min(k, len(rows))).fit(rows)  # one index for every test clip
    scores = np.asarray([float(full.kneighbors((c - mu) / sd)[0].mean()) for c in test])
    # Leave-one-out distances of the training clips: each clip's score against the others,
    # the threshold the same split-conformal order statistic as the models'.
    loo = [distance(rows[owner != i], c) for i, c in enumerate(train)]
    threshold = calibrate_threshold(loo, "percentile", 1.0 - target_far)
    items = [bundle.test[i] for i in range(len(bundle.test))]
    return anomaly_report(scores, [it["anomaly"] for it in items], machines=[it["machine"] for it in items],
                          sections=[it["section"] for it in items], domains=[it["domain"] for it in items],
                          labels=[it["label"] for it in items], threshold=threshold)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="DCASE machine folder(s) or labelled folder")
    p.add_argument("--normal", action="append", default=[], help="normal label (labelled folders), repeatable")
    p.add_argument("--k", type=int, default=1, help="neighbours averaged")
    p.add_argument("--features", choices=FEATURES, default="meanstd", help="what a clip is compared by (see above)")
    p.add_argument("--target-far", type=float, default=0.1, help="false-alarm rate the threshold is calibrated for")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = p.parse_args(argv)
    report = run(args.data, args.normal, args.k, args.features, args.target_far)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
        return 0
    line = (f"baseline (log-mel {args.features}, {args.k}-NN): AUC {report['auc']:.4f}  pAUC {report['pauc']:.4f}"
            f"  FPR {report['fpr']:.3f}  TPR {report['tpr']:.3f} at the threshold for FAR {args.target_far}")
    if "official_score" in report:
        line += (f"  | AUC source {report['auc_source']:.4f}  target {report['auc_target']:.4f}"
                 f"  official score {report['official_score']:.4f}")
    print(line)
    for row in report.get("table", []):
        if "label" in row and "auc_vs_normal" in row:
            print(f"  {row['label']:<14} n={row['n']:<3} AUC vs normal {row['auc_vs_normal']:.4f} ({row['role']})")
    return 0


if __name__ == "__main__":
    cli.entry(main)
