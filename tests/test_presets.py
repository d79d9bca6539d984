"""Board presets (export/presets/*.yaml) and the trtexec spelling table of edgediag.deploy.presets.
Fast: no model, no export."""

import json

import pytest

from edgediag.deploy import presets as P
from edgediag.errors import UserError

PRESET_FILES = sorted(P.PRESET_DIR.glob("*.yaml"))

# board -> (JetPack, TensorRT, CUDA, cuda_arch, DLA cores) the issue asks for
EXPECTED = {
    # JetPack 5.1 (TensorRT 8.5, CUDA 11.4)
    "xavier-nx": ("5.1", "8.5", "11.4", "sm_72", 2),
    "agx-xavier": ("5.1", "8.5", "11.4", "sm_72", 2),
    "agx-orin-jp5": ("5.1", "8.5", "11.4", "sm_87", 2),
    "orin-nx-jp5": ("5.1", "8.5", "11.4", "sm_87", 2),
    "orin-nano-jp5": ("5.1", "8.5", "11.4", "sm_87", 0),
    # JetPack 6.0 (TensorRT 8.6, CUDA 12.2)
    "agx-orin-jp60": ("6.0", "8.6", "12.2", "sm_87", 2),
    "orin-nx-jp60": ("6.0", "8.6", "12.2", "sm_87", 2),
    "orin-nano-jp60": ("6.0", "8.6", "12.2", "sm_87", 0),
    # JetPack 6.1/6.2 (TensorRT 10.3, CUDA 12.6): the original names
    "agx-orin": ("6.1", "10.3", "12.6", "sm_87", 2),
    "orin-nx": ("6.1", "10.3", "12.6", "sm_87", 2),
    "orin-nano": ("6.1", "10.3", "12.6", "sm_87", 0),
    # Jetson Thor, JetPack 7.0 (TensorRT 10.13, CUDA 13.0, Blackwell)
    "thor": ("7.0", "10.13", "13.0", "sm_110", 0),
}


def _all_presets() -> dict[str, P.ExportPreset]:
    return {p.stem: P.load_preset(str(p))[0] for p in PRESET_FILES}


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_preset_loads_and_validates(path):
    preset, where = P.load_preset(str(path))
    assert where == path and preset.board == path.stem  # file name = board name (bare names work)
    assert P.load_preset(path.stem)[0] == preset
    preset.validate(str(path))
    assert preset.default_precision in P.PRECISIONS and preset.workspace_mb > 0 and preset.batch >= 1
    assert preset.cuda_arch.startswith("sm_") and preset.memory_gb > 0 and preset.jetpack and preset.cuda
    assert preset.description and P.board_family(preset.board) is not None
    assert P.table_version(preset.tensorrt) in P.KNOWN_VERSIONS
    text = path.read_text()
    assert text.startswith("# "), "header comment: what the board is and what its JetPack ships"
    assert all(":" in line for line in text.splitlines() if line and not line.startswith("#"))  # flat key: value


def test_issue_presets_exist_with_their_versions():
    boards = _all_presets()
    assert set(EXPECTED) <= set(boards)
    for board, (jetpack, trt, cuda, arch, dla) in EXPECTED.items():
        p = boards[board]
        assert p.jetpack.startswith(jetpack), board
        assert P.parse_version(p.tensorrt) == P.parse_version(trt), board
        assert (p.cuda, p.cuda_arch, p.dla_cores) == (cuda, arch, dla), board
    assert boards["thor"].memory_gb == 128
    # the operator tables each JetPack line resolves to
    assert {P.table_version(boards[b].tensorrt) for b in ("xavier-nx", "agx-xavier", "orin-nano-jp5")} == {(8, 5)}
    assert P.table_version(boards["agx-orin-jp60"].tensorrt) == (8, 6)
    assert P.table_version(boards["orin-nano"].tensorrt) == (10, 3)
    assert P.table_version(boards["thor"].tensorrt) == (10, 5)


def test_operator_table_for_10_13():
    assert P.table_version("10.13") == (10, 5) and P.table_version("10.13.3") == (10, 5)
    ops = P.unsupported_ops("10.13")
    assert ops == P.unsupported_ops("10.5")
    assert {"LayerNormalization", "STFT", "HannWindow", "Hardmax"}.isdisjoint(ops)
    assert {"DFT", "Unique", "SequenceAt", "AffineGrid"} <= ops
    assert P.max_opset("10.13") >= 17


@pytest.mark.parametrize("version", ["8.4", "8.5", "8.5.2", "8.6", "8.6.2", "10.0", "10.3", "10.13", "10.13.3"])
def test_workspace_spelling_is_mempoolsize(version):
    flags = P.trtexec_flags(version)
    assert flags.workspace(4096) == "--memPoolSize=workspace:4096"
    assert not flags.int8_qdq_needs_calib
    assert flags.precision("int8") == ["--int8"]  # Q/DQ graph: no calibration cache
    assert flags.precision("int8", qdq=False) == ["--int8", "--calib=calib.cache"]
    assert flags.precision("fp16") == ["--fp16"] and flags.precision("fp32") == []


def test_old_workspace_spelling_per_version():
    assert P.trtexec_flags("8.2").workspace(512) == "--workspace=512"  # before --memPoolSize
    assert P.trtexec_flags("8.5").old_workspace_flag == "--workspace={mib}"  # deprecated, still parsed
    assert "deprecated" in P.trtexec_flags("8.6.2").old_workspace_status
    for version in ("10.0", "10.3", "10.13"):  # removed in TensorRT 10
        assert P.trtexec_flags(version).old_workspace_flag is None
        assert "removed" in P.trtexec_flags(version).old_workspace_status
    assert P.trtexec_flags("10.13").convention == "10.0" and P.trtexec_flags("8.5.2").convention == "8.4"


def test_dla_flags_only_for_boards_with_dla():
    for board, preset in _all_presets().items():
        flags = P.trtexec_flags(preset.tensorrt)
        assert flags.dla(preset.dla_cores, None) == []
        if preset.dla_cores > 0:
            assert flags.dla(preset.dla_cores, 0) == ["--useDLACore=0", "--allowGPUFallback"], board
            last = preset.dla_cores - 1
            assert flags.dla(preset.dla_cores, last)[0] == f"--useDLACore={last}"
            with pytest.raises(UserError, match="DLA"):
                flags.dla(preset.dla_cores, preset.dla_cores)
        else:
            with pytest.raises(UserError, match="no DLA"):
                flags.dla(preset.dla_cores, 0)
    assert {b for b, p in _all_presets().items() if p.dla_cores == 0} >= {"orin-nano", "orin-nano-jp5",
                                                                          "orin-nano-jp60", "thor"}


def test_shape_flags_build_and_run():
    flags = P.trtexec_flags("10.13")
    shapes = {"x": [1, 3, 64, 64]}
    assert flags.build_shapes(shapes, opt_batch=4, max_batch=8) == [
        "--minShapes=x:1x3x64x64", "--optShapes=x:4x3x64x64", "--maxShapes=x:8x3x64x64"]
    assert flags.run_shapes(shapes, 2) == ["--shapes=x:2x3x64x64"]
    thor = P.load_preset("thor")[0]
    assert flags.build(thor.workspace_mb, "int8", dla_cores=thor.dla_cores) == [
        "--int8", "--memPoolSize=workspace:4096"]  # static graph: no shape flags, no DLA
    nx = P.load_preset("orin-nx-jp5")[0]
    assert P.trtexec_flags(nx.tensorrt).build(nx.workspace_mb, "fp16", dla_cores=nx.dla_cores, dla_core=0,
                                              input_shapes=shapes, dynamic=True, opt_batch=2, max_batch=4) == [
        "--fp16", "--memPoolSize=workspace:2048", "--minShapes=x:1x3x64x64", "--optShapes=x:2x3x64x64",
        "--maxShapes=x:4x3x64x64", "--useDLACore=0", "--allowGPUFallback"]


@pytest.mark.parametrize("board,dla", [("thor", 1), ("orin-nano-jp5", 2), ("agx-orin", 3), ("xavier-nx", 4)])
def test_dla_cores_beyond_the_board_are_refused(tmp_path, board, dla):
    path = tmp_path / "p.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in
                            {"board": board, "tensorrt": "10.3", "dla_cores": dla}.items()))
    with pytest.raises(UserError, match="dla_cores"):
        P.load_preset(str(path))


def test_unknown_board_lists_every_known_board():
    with pytest.raises(UserError, match="preset not found") as err:
        P.load_preset("orin-nanoo")
    for board in P.known_boards():
        assert board in str(err.value)
    assert set(EXPECTED) <= set(P.known_boards())
