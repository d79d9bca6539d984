"""The "image" data kind (edgediag.data.images) and the synthetic defect images."""

from __future__ import annotations

import csv
import logging
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from edgediag.data import DataConfig, build_data
from edgediag.data.images import decode_image
from edgediag.data.synth_images import CLASSES, defect_image, generate_defect_images
from edgediag.errors import UserError
from tests.conftest import run_cli, shared_data


def model_cfg(size=48, color="auto", **kw):
    return SimpleNamespace(image_size=size, color=color, **kw)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_defect_images(root, n_per_class=8, size=64, seed=0)
    return root


def test_synthetic_images_are_deterministic_per_seed(tmp_path):
    a = generate_defect_images(tmp_path / "a", n_per_class=2, size=48, seed=3)
    b = generate_defect_images(tmp_path / "b", n_per_class=2, size=48, seed=3)
    c = generate_defect_images(tmp_path / "c", n_per_class=2, size=48, seed=4)
    assert list(a) == list(CLASSES) and all(len(v) == 2 for v in a.values())
    for label in CLASSES:
        for pa, pb, pc in zip(a[label], b[label], c[label]):
            assert pa.read_bytes() == pb.read_bytes()
            assert not np.array_equal(cv2.imread(str(pa), 0), cv2.imread(str(pc), 0))


def test_synthetic_texture_is_brushed_metal_and_defects_change_it():
    rng = lambda: np.random.default_rng(7)  # noqa: E731 - the same texture under each defect
    normal = defect_image("normal", 128, rng()).astype(np.float64)
    # Brushed streaks: neighbours along the rolling direction are far more alike than across it.
    along = max(np.corrcoef(normal[:, :-1].ravel(), normal[:, 1:].ravel())[0, 1],
                np.corrcoef(normal[:-1].ravel(), normal[1:].ravel())[0, 1])
    across = min(np.corrcoef(normal[:, :-1].ravel(), normal[:, 1:].ravel())[0, 1],
                 np.corrcoef(normal[:-1].ravel(), normal[1:].ravel())[0, 1])
    assert along > 0.8 and along - across > 0.1
    for label in CLASSES[1:]:
        diff = np.abs(defect_image(label, 128, rng()).astype(np.float64) - normal)
        # A defect is a local change: some pixels move a lot, most do not move at all.
        assert diff.max() > 20 and np.mean(diff > 2) < 0.5, label


def test_folder_layout_gives_a_deterministic_stratified_split(synth):
    cfg = DataConfig(root=str(synth), test_fraction=0.25, val_fraction=0.2, split_seed=0)
    b1, b2 = build_data("image", cfg, model_cfg()), build_data("image", cfg, model_cfg())
    assert b1.classes == sorted(CLASSES) and b1.normal_classes == ["normal"]
    assert b1.info["split"] == b2.info["split"] and b1.info["layout"] == "folders"
    split = b1.info["split"]
    keys = split["train"] + split["val"] + split["test"]
    assert len(keys) == len(set(keys)) == 8 * len(CLASSES)
    for label in CLASSES:  # 25 % of each class in test, 20 % of the rest in val
        assert sum(k.startswith(f"{label}/") for k in split["test"]) == 2
        assert sum(k.startswith(f"{label}/") for k in split["val"]) == 1
    assert b1.info["class_counts"] == [5] * len(CLASSES)
    other = build_data("image", DataConfig(root=str(synth), split_seed=1), model_cfg())
    assert other.info["split"]["test"] != split["test"]
    assert other.info["split_digest"] != b1.info["split_digest"]


def test_items_are_unit_range_and_only_training_items_are_augmented(synth):
    bundle = build_data("image", DataConfig(root=str(synth)), model_cfg(size=40))
    item = bundle.test[0]
    assert set(item) == {"x", "y", "anomaly", "domain", "key"}
    assert item["x"].shape == (1, 40, 40) and item["x"].dtype == torch.float32
    assert 0.0 <= item["x"].min() and item["x"].max() <= 1.0
    assert torch.equal(bundle.test[0]["x"], bundle.test[0]["x"])
    torch.manual_seed(0)
    views = [bundle.train[0]["x"] for _ in range(6)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    # Flips and shifts move pixels around, they do not change the image's brightness much.
    assert all(abs(float(v.mean() - views[0].mean())) < 0.05 for v in views)
    stack = torch.stack([bundle.train[i]["x"] for i in range(len(bundle.train))])
    mean, std = bundle.info["pixel_mean"], bundle.info["pixel_std"]
    assert abs(float(stack.mean()) - mean[0]) < 0.02 and abs(float(stack.std()) - std[0]) < 0.02


def test_labels_csv_with_split_and_is_defect_columns(synth, tmp_path):
    rows = [("normal/normal_0000.png", "good", 0, "train"), ("normal/normal_0001.png", "good", 0, "test"),
            ("scratch/scratch_0000.png", "scratched", 1, "train"), ("scratch/scratch_0001.png", "scratched", 1, "test"),
            ("pit/pit_0000.png", "pitted", 1, "train")]
    with open(synth / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "class", "is_defect", "split"])
        writer.writerows(rows)
    try:
        bundle = build_data("image", DataConfig(root=str(synth)), model_cfg())
    finally:
        (synth / "labels.csv").unlink()
    assert bundle.info["layout"] == "labels.csv" and bundle.info["split_given"]
    assert bundle.classes == ["good", "pitted", "scratched"] and bundle.normal_classes == ["good"]
    assert bundle.info["split"]["test"] == ["normal/normal_0001.png", "scratch/scratch_0001.png"]
    assert [bundle.test[i]["anomaly"] for i in range(2)] == [0, 1]


def test_bad_images_are_named_or_skipped_with_a_count(synth, tmp_path, caplog):
    root = tmp_path / "bad"
    for label in ("normal", "scratch"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            (root / label / f"{i}.png").write_bytes((synth / label / f"{label}_{i:04d}.png").read_bytes())
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(synth / "normal" / "normal_0000.png")))
    (root / "normal" / "cut.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    (root / "scratch" / "junk.png").write_bytes(b"\x89PNG not really an image IEND")
    with pytest.raises(UserError, match=r"cut\.jpg: truncated"):
        build_data("image", DataConfig(root=str(root)), model_cfg())
    with caplog.at_level(logging.WARNING, logger="edgediag.data.images"):
        bundle = build_data("image", DataConfig(root=str(root), on_bad_file="skip", test_fraction=0.34), model_cfg())
    assert bundle.info["skipped"] == 2 and "skipped 2 unreadable images" in caplog.text
    assert len(bundle.train) + len(bundle.test) == 6
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_image(root / "scratch" / "junk.png")


def test_colour_images_read_as_rgb_unless_grey_is_asked_for(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            cv2.imwrite(str(tmp_path / label / f"{i}.png"), rng.integers(0, 255, (30, 20, 3), dtype=np.uint8))
    rgb = build_data("image", DataConfig(root=str(tmp_path)), model_cfg(size=32))
    assert rgb.info["channels"] == 3 and rgb.train[0]["x"].shape == (3, 32, 32) and len(rgb.info["pixel_mean"]) == 3
    grey = build_data("image", DataConfig(root=str(tmp_path)), model_cfg(size=32, color="gray"))
    assert grey.info["channels"] == 1 and grey.train[0]["x"].shape == (1, 32, 32)
    assert rgb.normal_classes == []  # neither name says "normal"
    named = build_data("image", DataConfig(root=str(tmp_path), normal_labels=["b"]), model_cfg(size=32))
    assert named.normal_classes == ["b"]


def test_layout_problems_are_one_line_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        build_data("image", DataConfig(root=str(tmp_path / "empty")), model_cfg())
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "labels.csv").write_text("file_name,kind\nx.png,a\n")
    with pytest.raises(UserError, match="needs an image column"):
        build_data("image", DataConfig(root=str(tmp_path / "csv")), model_cfg())
    (tmp_path / "csv" / "labels.csv").write_text("image,class\nmissing.png,a\n")
    with pytest.raises(UserError, match="missing.png: cannot read"):
        build_data("image", DataConfig(root=str(tmp_path / "csv")), model_cfg())


def test_synth_cli_writes_class_folders(tmp_path):
    res = run_cli("edgediag.data.synth_images", "--out", tmp_path / "out", "--n-per-class", 2, "--size", 40)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(CLASSES)
    bad = run_cli("edgediag.data.synth_images", "--out", tmp_path / "x", "--size", 8)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0


def test_magnetic_tile_reads_as_six_grey_classes_with_free_normal():
    root = shared_data("magnetic_tile")
    bundle = build_data("image", DataConfig(root=str(root), split_seed=0), model_cfg(size=32))
    assert bundle.classes == ["Blowhole", "Break", "Crack", "Fray", "Free", "Uneven"]
    assert bundle.normal_classes == ["Free"] and bundle.info["channels"] == 1
    assert len(bundle.train) + len(bundle.test) == 1344
    split = bundle.info["split"]
    assert sum(k.startswith("MT_Free/") for k in split["test"]) == 238  # 25 % of 952
    assert sum(k.startswith("MT_Fray/") for k in split["test"]) == 8  # 25 % of 32
    anomaly = [bundle.test[i]["anomaly"] for i in range(len(bundle.test))]
    assert sum(anomaly) == len(bundle.test) - 238
