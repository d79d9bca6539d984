"""A simple machine-sound anomaly baseline, to compare models with.

Each clip becomes one vector: the mean and standard deviation over time of its log-mel
spectrogram (librosa, n_fft 2048, hop 512, 128 mels, dB). Features are standardised with
the training clips' statistics; a test clip's anomaly score is the Euclidean distance to
its nearest normal training clip (scikit-learn NearestNeighbors). Scored with the same
DCASE code as the models (edgediag.engine.dcase).

    python benchmarks/audio_baseline.py ../shared/data/dcase2023_valve
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


def clip_features(wave: np.ndarray, sr: int) -> np.ndarray:
    mel = librosa.feature.melspectrogram(y=wave, sr=sr, n_fft=2048, hop_length=512, n_mels=128)
    db = librosa.power_to_db(mel)
    return np.concatenate([db.mean(axis=1), db.std(axis=1)])


def run(root: str, normal_labels: list[str], k: int = 1) -> dict:
    cfg = SimpleNamespace(sample_rate=16000, clip_seconds=0.0, pad_mode="wrap", train_normal_only=True)
    bundle = build_data("audio", DataConfig(root=root, normal_labels=normal_labels), cfg)
    if bundle.test is None:
        raise cli.UserError(f"{root} has no test clips")
    sr = bundle.info["sample_rate"]
    train = np.stack([clip_features(bundle.train.clips[i], sr) for i in range(len(bundle.train))])
    test = np.stack([clip_features(bundle.test.clips[i], sr) for i in range(len(bundle.test))])
    mu, sd = train.mean(axis=0), train.std(axis=0) + 1e-6
    nn = NearestNeighbors(n_neighbors=min(k, len(train))).fit((train - mu) / sd)
    dist, _ = nn.kneighbors((test - mu) / sd)
    scores = dist.mean(axis=1)
    items = [bundle.test[i] for i in range(len(bundle.test))]
    report = anomaly_report(scores, [it["anomaly"] for it in items], machines=[it["machine"] for it in items],
                            sections=[it["section"] for it in items], domains=[it["domain"] for it in items],
                            labels=[it["label"] for it in items])
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="DCASE machine folder(s) or labelled folder")
    p.add_argument("--normal", action="append", default=[], help="normal label (labelled folders), repeatable")
    p.add_argument("--k", type=int, default=1, help="neighbours averaged")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = p.parse_args(argv)
    report = run(args.data, args.normal, args.k)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
        return 0
    line = f"baseline (log-mel mean/std, {args.k}-NN): AUC {report['auc']:.4f}  pAUC {report['pauc']:.4f}"
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
