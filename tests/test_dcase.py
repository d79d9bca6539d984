"""DCASE file names and scores against direct scikit-learn computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from edgediag.data import dcase_names
from edgediag.engine import dcase


@pytest.mark.parametrize("name, expect", [
    ("normal_id_00_00000012.wav", {"section": "id_00", "anomaly": 0, "domain": "", "format": "2020"}),
    ("anomaly_id_06_00000003.wav", {"section": "id_06", "anomaly": 1, "format": "2020"}),
    ("section_00_source_train_normal_0003_pat_00.wav",
     {"section": "section_00", "domain": "source", "split": "train", "anomaly": 0, "attributes": "pat_00"}),
    ("section_02_target_test_anomaly_0049_car_A1_spd_28V_mic_1.wav",
     {"section": "section_02", "domain": "target", "split": "test", "anomaly": 1,
      "attributes": "car_A1_spd_28V_mic_1"}),
    ("section_01_source_test_normal_0007.wav", {"section": "section_01", "attributes": "", "anomaly": 0}),
    ("section_00_0012.wav", {"section": "section_00", "anomaly": -1, "domain": ""}),
    ("section_00_test_0012.wav", {"section": "section_00", "anomaly": -1, "split": "test"}),
])
def test_parse_name(name, expect):
    meta = dcase_names.parse_name(name)
    assert meta is not None
    for key, value in expect.items():
        assert meta[key] == value, key


@pytest.mark.parametrize("name", ["ON_20200318T204454_6.wav", "normal_00000012.wav", "section_x_source.wav"])
def test_parse_name_rejects_other_names(name):
    assert dcase_names.parse_name(name) is None


def _fake_section(rng, shift_target=0.0):
    """20 normals and 10 anomalies per domain; anomalies score higher on average."""
    dom = np.array(["source"] * 30 + ["target"] * 30)
    anomaly = np.array(([0] * 20 + [1] * 10) * 2)
    scores = rng.normal(size=60) + 1.2 * anomaly + shift_target * (dom == "target")
    return dom, anomaly, scores


def test_section_scores_follow_the_official_protocol():
    rng = np.random.default_rng(0)
    dom, a, s = _fake_section(rng, shift_target=0.8)
    out = dcase.section_scores(a, s, dom)
    for d in ("source", "target"):
        pick = (dom == d) | (a == 1)  # this domain's normals vs ALL anomalies of the section
        assert out[f"auc_{d}"] == pytest.approx(roc_auc_score(a[pick], s[pick]))
    assert out["pauc"] == pytest.approx(roc_auc_score(a, s, max_fpr=0.1))
    assert out["auc_all"] == pytest.approx(roc_auc_score(a, s))
    # Target normals score higher (domain shift), so target AUC is the worse one.
    assert out["auc_target"] < out["auc_source"]


def test_official_score_is_the_harmonic_mean_over_machines_and_sections():
    rng = np.random.default_rng(1)
    machines, sections, domains, anomaly, scores = [], [], [], [], []
    for m in ("fan", "valve"):
        for sec in ("section_00", "section_01"):
            d, a, s = _fake_section(rng, shift_target=rng.uniform(0, 1))
            machines += [m] * 60
            sections += [sec] * 60
            domains += d.tolist()
            anomaly += a.tolist()
            scores += s.tolist()
    out = dcase.dcase_scores(machines, sections, domains, anomaly, scores)
    assert len(out["table"]) == 4
    values = [r["auc_source"] for r in out["table"]] + [r["auc_target"] for r in out["table"]] + \
             [r["pauc"] for r in out["table"]]
    assert out["official_score"] == pytest.approx(stats.hmean(values))
    assert min(values) <= out["official_score"] <= max(values)


def test_precision_recall_f1_per_domain_at_a_threshold():
    dom = np.array(["source"] * 4 + ["target"] * 4)
    a = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    s = np.array([0.1, 0.9, 0.8, 0.2, 0.1, 0.2, 0.8, 0.9])
    out = dcase.dcase_scores(["m"] * 8, ["section_00"] * 8, dom, a, s, threshold=0.5)
    row = out["table"][0]
    assert row["precision_source"] == pytest.approx(0.5) and row["recall_source"] == pytest.approx(0.5)
    assert row["precision_target"] == pytest.approx(1.0) and row["f1_target"] == pytest.approx(1.0)


def test_dcase2020_ids_and_mauc():
    rng = np.random.default_rng(2)
    ids, anomaly, scores = [], [], []
    for i, sep in (("id_00", 2.0), ("id_02", 0.3)):
        a = np.array([0] * 30 + [1] * 15)
        ids += [i] * 45
        anomaly += a.tolist()
        scores += (rng.normal(size=45) + sep * a).tolist()
    out = dcase.dcase_scores(["fan"] * 90, ids, [""] * 90, anomaly, scores)
    aucs = {r["section"]: r["auc"] for r in out["table"]}
    assert set(aucs) == {"id_00", "id_02"}
    assert out["mauc"] == pytest.approx(min(aucs.values()))
    assert out["auc_mean"] == pytest.approx(np.mean(list(aucs.values())))
    assert "official_score" not in out


def test_anomaly_report_labels_table_and_roc(tmp_path):
    labels = ["ON"] * 6 + ["TAPPING"] * 3 + ["OFF"] * 3
    anomaly = [0] * 6 + [1] * 3 + [-1] * 3
    scores = [0.1, 0.2, 0.15, 0.3, 0.25, 0.2, 0.9, 0.8, 0.7, 0.05, 0.95, 0.5]
    out = dcase.anomaly_report(scores, anomaly, labels=labels, threshold=0.5, out_dir=tmp_path)
    assert out["auc"] == 1.0  # OFF (anomaly -1) is left out of the AUC
    rows = {r["label"]: r for r in out["table"]}
    assert rows["OFF"]["role"] == "excluded" and rows["OFF"]["flagged"] == pytest.approx(1 / 3)
    assert rows["TAPPING"]["auc_vs_normal"] == 1.0 and rows["ON"]["role"] == "normal"
    assert out["recall"] == 1.0 and out["precision"] == 1.0
    assert (tmp_path / "roc.png").stat().st_size > 1000


def test_anomaly_report_scores_files_by_their_segments_mean():
    """data.segments items (file#k): per-segment AUC, and per file the segments' mean - an
    intermittent fault (one loud segment of three) ranks above every normal file."""
    keys = ["n1#0", "n1#1", "n1#2", "n2#0", "n2#1", "n2#2", "tap#0", "tap#1", "tap#2", "off#0", "off#1", "off#2"]
    anomaly = [0] * 6 + [1] * 3 + [-1] * 3
    scores = [0.3, 0.2, 0.25, 0.35, 0.1, 0.2, 0.9, 0.2, 0.3, 5.0, 5.0, 5.0]
    out = dcase.anomaly_report(scores, anomaly, keys=keys)
    assert out["auc"] < 1.0 and out["n_files"] == 4
    assert out["auc_file"] == 1.0  # OFF (anomaly -1) is left out here too
    plain = dcase.anomaly_report(scores, anomaly, keys=[k.replace("#", "_") for k in keys])
    assert "auc_file" not in plain and "auc_file" not in dcase.anomaly_report(scores, anomaly)


def test_single_class_gives_nan_not_an_error():
    out = dcase.anomaly_report([0.1, 0.2, 0.3], [0, 0, 0])
    assert np.isnan(out["auc"])
