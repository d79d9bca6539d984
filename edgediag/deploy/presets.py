"""Target boards: their presets (export/presets/<board>.yaml, :class:`ExportPreset`) and whether
the TensorRT ONNX parser of a given version takes a graph, a static check run by
``python -m edgediag.export`` before a user carries the file to a board.

The tables below are transcribed from onnx-tensorrt's ``docs/operators.md`` support
matrix (branches release/8.4-GA, release/8.5-GA, release/8.6-GA, the 10.x docs) and its
``docs/Changelog.md`` (what each release added). They have NOT been verified on a device:
a clean report means "nothing the parser documents as unsupported", not "the engine
builds". Only the parser is checked; layer-level limits (DLA, INT8 kernels) are not.

Versions are looked up by the newest table at or below the requested one ("8.5.2" ->
8.5, "10.4" -> 10.4, "10.3.0" -> 10.3, "10.13" -> 10.5); versions older than 8.4 are refused.

The same module holds how trtexec spells the build options per TensorRT version
(:func:`trtexec_flags`, from trtexec's own option parser in NVIDIA/TensorRT) and which boards have
DLA cores (:data:`BOARD_DLA_CORES`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import onnx

from edgediag.config import from_dict, load_yaml
from edgediag.errors import UserError

SOURCE = ("onnx-tensorrt docs/operators.md support matrix and docs/Changelog.md "
          "(tables transcribed, not verified on a device)")

# --- unsupported operators (default ONNX domain), per parser version ------------------------
_SEQUENCE_OPS = {"SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
                 "SequenceLength", "SequenceMap", "ConcatFromSequence", "SplitToSequence"}
_OPTIONAL_OPS = {"Optional", "OptionalGetElement", "OptionalHasElement"}
# Never supported by any version covered here (training losses, integer/quantised linear
# algebra, string ops, ...).
_ALWAYS = _SEQUENCE_OPS | _OPTIONAL_OPS | {
    "Bernoulli", "BitShift", "Compress", "ConvInteger", "Det", "DynamicQuantizeLinear", "MatMulInteger",
    "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "QLinearConv",
    "QLinearMatMul", "SoftmaxCrossEntropyLoss", "StringNormalizer", "TfIdfVectorizer", "Unique", "DFT",
}

_UNSUPPORTED: dict[tuple[int, int], set[str]] = {}
# TensorRT 8.4 (JetPack 5.0.2): the 8.4 matrix's "N" rows (STFT and the window ops are
# opset 17, newer than 8.4's opset 13 parser).
_UNSUPPORTED[(8, 4)] = _ALWAYS | {
    "Hardmax", "IsInf", "LayerNormalization", "GroupNormalization", "MeanVarianceNormalization", "Mod", "NonZero",
    "OneHot", "RandomNormal", "RandomNormalLike", "Reciprocal", "RoiAlign", "Shrink", "GridSample", "Trilu",
    "STFT", "BlackmanWindow", "HammingWindow", "HannWindow",
}
# 8.5 (JetPack 5.1.x) added RandomNormal, RandomUniform, MeanVarianceNormalization, RoiAlign,
# Mod, Trilu, GridSample, NonZero (and the matrix marks OneHot, Reciprocal, Shrink as "Y").
_UNSUPPORTED[(8, 5)] = _UNSUPPORTED[(8, 4)] - {
    "RandomNormal", "RandomNormalLike", "MeanVarianceNormalization", "RoiAlign", "Mod", "Trilu", "GridSample",
    "NonZero", "OneHot", "Reciprocal", "Shrink"}
# 8.6 (JetPack 6.0) added LayerNormalization, GroupNormalization, IsInf.
_UNSUPPORTED[(8, 6)] = _UNSUPPORTED[(8, 5)] - {"LayerNormalization", "GroupNormalization", "IsInf"}
# 9.2 added Hardmax; 10.0 is the first 10.x. Newer ops of opsets 18-20 it lacks:
_UNSUPPORTED[(10, 0)] = (_UNSUPPORTED[(8, 6)] - {"Hardmax"}) | {
    "AffineGrid", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im", "CenterCropPad",
    "ImageDecoder", "RegexFullMatch", "StringConcat", "StringSplit", "DeformConv"}
_UNSUPPORTED[(10, 1)] = _UNSUPPORTED[(10, 0)] - {"DeformConv"}
_UNSUPPORTED[(10, 3)] = _UNSUPPORTED[(10, 1)]  # JetPack 6.1 / 6.2
_UNSUPPORTED[(10, 4)] = _UNSUPPORTED[(10, 3)] - {"BlackmanWindow", "HammingWindow", "HannWindow"}
_UNSUPPORTED[(10, 5)] = _UNSUPPORTED[(10, 4)] - {"STFT"}  # real-valued STFT only
# No later table: 10.6-10.15 (10.13 = JetPack 7.0, Jetson Thor) resolve to the 10.5 one. Checked:
# the "N" rows of the 10.15 operators.md matrix are exactly this set, and the Changelog entries of
# 10.6-10.13 add no operator of it (10.7 dynamic Squeeze/Unsqueeze axes, 10.8 dynamic CumSum axes,
# 10.9 opset-21 GroupNorm, 10.12 integer Pow / Einsum ellipsis; 10.14 Attention and 10.15
# RotaryEmbedding/RMSNormalization/TensorScatter are opset 23/24 ops outside these tables). The 10.13
# matrix itself was not read, so no separate 10.13 table is claimed.

# Highest ONNX opset each parser reads (8.4: "up to Opset 13"; 8.5/8.6: 17; 10.0: "opset 9 to opset 20").
# 10.15's matrix says "opset 9 to opset 24"; the releases in between (10.13 included) were not read, so
# they keep 10.0's 20: conservative (an opset 21-24 graph gets an "opset" issue for Thor that may be
# spurious; exports default to opset 17).
_MAX_OPSET = {(8, 4): 13, (8, 5): 17, (8, 6): 17, (10, 0): 20}

KNOWN_VERSIONS = sorted(_UNSUPPORTED)


@dataclasses.dataclass
class Issue:
    """One problem: ``kind`` is "unsupported_op", "restriction", "known_bad_pattern",
    "opset" or "note" (notes do not count as problems)."""

    kind: str
    op: str
    count: int
    message: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_version(version: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(version).strip().split(".")[:2]]
    except ValueError:
        raise UserError(f"cannot read TensorRT version {version!r} (expected e.g. 8.5 or 10.3)") from None
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def table_version(version: str) -> tuple[int, int]:
    """The newest table at or below ``version``."""
    wanted = parse_version(version)
    usable = [v for v in KNOWN_VERSIONS if v <= wanted]
    if not usable:
        raise UserError(f"no operator table for TensorRT {version} (known: from "
                        f"{'.'.join(map(str, KNOWN_VERSIONS[0]))})")
    return usable[-1]


def unsupported_ops(version: str) -> set[str]:
    return set(_UNSUPPORTED[table_version(version)])


def max_opset(version: str) -> int:
    wanted = parse_version(version)
    return _MAX_OPSET[max(v for v in _MAX_OPSET if v <= wanted)] if wanted >= (8, 4) else 0


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors known at build time: initializers and Constant outputs."""
    names = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            names.update(node.output)
    return names


def _constant_values(graph: onnx.GraphProto) -> dict[str, list]:
    values = {}
    for init in graph.initializer:
        if init.dims == [] or len(init.dims) == 1 and init.dims[0] <= 8:
            values[init.name] = onnx.numpy_helper.to_array(init).reshape(-1).tolist()
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = onnx.numpy_helper.to_array(attr.t).reshape(-1).tolist()
    return values


def _input_must_be_constant(graph, consts, op: str, index: int, what: str, where: str) -> list[Issue]:
    bad = [n for n in graph.node if n.op_type == op and len(n.input) > index and n.input[index]
           and n.input[index] not in consts]
    if not bad:
        return []
    return [Issue("restriction", op, len(bad), f"{op}: `{what}` must be {where} ({len(bad)} node(s) compute it, "
                                                f"e.g. {bad[0].name or bad[0].output[0]})")]


def check_model(model: onnx.ModelProto, version: str) -> list[Issue]:
    """Issues of ``model`` (main graph) for the TensorRT ONNX parser of ``version``."""
    tv = table_version(version)
    graph = model.graph
    consts = constant_names(graph)
    counts = Counter((n.domain or "ai.onnx", n.op_type) for n in graph.node)
    issues: list[Issue] = []

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    top = max_opset(version)
    if opset > top:
        issues.append(Issue("opset", "opset", 1, f"opset {opset} is newer than TensorRT {version}'s parser reads "
                                                  f"(up to {top}): export with --opset {top}"))

    unsupported = _UNSUPPORTED[tv]
    for (domain, op), n in sorted(counts.items()):
        if domain not in ("ai.onnx", ""):
            issues.append(Issue("unsupported_op", f"{domain}::{op}", n,
                                f"{domain}::{op} x{n}: custom-domain op, needs a TensorRT plugin"))
        elif op in unsupported:
            hint = " (arrived in TensorRT 8.6; export with --layernorm decompose)" if op == "LayerNormalization" else ""
            issues.append(Issue("unsupported_op", op, n, f"{op} x{n}: not supported by the TensorRT {version} "
                                                         f"ONNX parser{hint}"))

    # Inputs the parser needs as build-time constants (per the matrix's Restrictions column).
    where = "an initializer" if tv < (10, 0) else "a build-time constant"
    issues += _input_must_be_constant(graph, consts, "CumSum", 1, "axis", where)
    issues += _input_must_be_constant(graph, consts, "Conv", 1, "W", "an initializer") if tv < (8, 5) else []
    issues += _input_must_be_constant(graph, consts, "ConvTranspose", 1, "W", "an initializer") if tv < (8, 5) else []
    if tv < (10, 3):  # 10.3 added tensor `axes` for Slice
        issues += _input_must_be_constant(graph, consts, "Slice", 3, "axes", "an initializer")
    for op in ("Squeeze", "Unsqueeze"):  # opset >= 13 takes axes as an input; 10.7 added dynamic axes
        issues += _input_must_be_constant(graph, consts, op, 1, "axes", "a constant")
    if tv < (8, 6):  # 8.6 added dynamic K
        issues += _input_must_be_constant(graph, consts, "TopK", 1, "K", "an initializer")
    for op in sorted({n.op_type for n in graph.node if n.op_type.startswith("Reduce")}):
        issues += _input_must_be_constant(graph, consts, op, 1, "axes", "an initializer")

    # Known-bad pattern: since TensorRT 10.8 (ICumulativeLayer), several CumSums on
    # different axes in one network compute as if on the same axis (onnx/onnx-tensorrt#1034,
    # NVIDIA/TensorRT#4551).
    if parse_version(version) >= (10, 8):
        values = _constant_values(graph)
        axes = {tuple(values.get(n.input[1], ["?"])) for n in graph.node if n.op_type == "CumSum" and len(n.input) > 1}
        if len(axes) > 1:
            issues.append(Issue("known_bad_pattern", "CumSum", counts[("ai.onnx", "CumSum")],
                                "several CumSum nodes on different axes: TensorRT >= 10.8 computes them as if on "
                                "one axis (onnx/onnx-tensorrt#1034)"))

    # Notes (not problems): what the parser converts on its own.
    doubles = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    doubles += [n.name for n in graph.node if n.op_type == "Cast"
                and any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE for a in n.attribute)]
    if doubles:
        issues.append(Issue("note", "DOUBLE", len(doubles), f"{len(doubles)} float64 tensor(s): TensorRT casts "
                                                            "DOUBLE down to FLOAT (clamped to +-FLT_MAX)"))
    if tv < (10, 0) and any(t.data_type == onnx.TensorProto.INT64 for t in graph.initializer):
        issues.append(Issue("note", "INT64", 1, "INT64 tensors: TensorRT 8.x casts them down to INT32"))
    return issues


def problems(issues: Iterable[Issue]) -> list[Issue]:
    return [i for i in issues if i.kind != "note"]


def summary_line(issues: list[Issue], version: str, board: str = "") -> str:
    """One line for the terminal."""
    where = f"TensorRT {version}" + (f" ({board})" if board else "")
    bad = problems(issues)
    if not bad:
        return f"{where}: no unsupported ops or known-bad patterns"
    listed = "; ".join(i.message for i in bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else "")
    return f"{where}: {len(bad)} problem(s) - {listed}"


def report(model: onnx.ModelProto, version: str, board: str = "") -> dict:
    """The export.json section: version, table used, issues, and the source of the tables."""
    issues = check_model(model, version)
    return {"tensorrt": version, "table": ".".join(map(str, table_version(version))), "board": board or None,
            "ok": not problems(issues), "issues": [i.as_dict() for i in issues], "source": SOURCE,
            "verified_on_device": False}


# --- board presets ---------------------------------------------------------------------------
PRESET_DIR = Path(__file__).resolve().parents[2] / "export" / "presets"
PRECISIONS = ("fp32", "fp16", "int8")
# Without a preset the compatibility check covers both JetPack lines (5.1 and 6.x).
DEFAULT_TRT_VERSIONS = {"8.5": "JetPack 5.1", "10.3": "JetPack 6.1"}
# Default TensorRT parity tolerances (standardised max abs error) per precision: reduced
# precision moves scores by more than fp32 rounding. Not verified on a device.
TRT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 2e-1}
# DLA cores per board family; a preset's board is "<family>" or "<family>-<suffix>" (orin-nx-jp5 ->
# orin-nx). NVIDIA's DLA FAQ (NVIDIA/Deep-Learning-Accelerator-SW): all AGX Orin, Orin NX, AGX Xavier and
# Xavier NX modules have DLA, "2 DLAs on Xavier and Orin" (the Orin NX 8 GB module is usually listed with
# one: not confirmed, the limit here is the family's 2); the Orin Nano is not in that list; TensorRT's
# "Working with DLA": "Jetson Thor, which has no DLA". Boards of other families are not checked.
BOARD_DLA_CORES = {"agx-xavier": 2, "xavier-nx": 2, "agx-orin": 2, "orin-nx": 2, "orin-nano": 0, "thor": 0}


def board_family(board: str) -> str | None:
    """The :data:`BOARD_DLA_CORES` family of a board name, or None for an unknown board."""
    return next((f for f in BOARD_DLA_CORES if board == f or board.startswith(f + "-")), None)


def known_boards() -> list[str]:
    """Board names that ``load_preset`` accepts bare (export/presets/<name>.yaml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@dataclasses.dataclass
class ExportPreset:
    """A target board (export/presets/<board>.yaml); unknown keys are errors."""

    board: str
    tensorrt: str  # the TensorRT version of the board's JetPack, e.g. "10.3"
    description: str = ""
    jetpack: str = ""
    cuda: str = ""
    cuda_arch: str = ""  # e.g. sm_87
    dla_cores: int = 0
    memory_gb: float = 0.0
    default_precision: str = "fp16"
    workspace_mb: int = 1024  # TensorRT builder workspace (memory pool) limit
    batch: int = 1

    def validate(self, where: str) -> None:
        if self.default_precision not in PRECISIONS:
            raise UserError(f"{where}: default_precision must be one of {', '.join(PRECISIONS)}, "
                            f"not {self.default_precision!r}")
        if self.workspace_mb < 1 or self.batch < 1 or self.dla_cores < 0:
            raise UserError(f"{where}: workspace_mb and batch must be >= 1, dla_cores >= 0")
        family = board_family(self.board)
        if family is not None and self.dla_cores > BOARD_DLA_CORES[family]:
            have = BOARD_DLA_CORES[family]
            raise UserError(f"{where}: dla_cores is {self.dla_cores}, but a {family} board has "
                            f"{have or 'no'} DLA core{'s' if have != 1 else ''}")
        table_version(self.tensorrt)  # a readable, known version


def load_preset(spec: str) -> tuple[ExportPreset, Path]:
    """A preset from a YAML path or a bare board name (export/presets/<name>.yaml)."""
    path = Path(spec)
    if not path.is_file() and not path.suffix and (PRESET_DIR / f"{spec}.yaml").is_file():
        path = PRESET_DIR / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(known_boards())
        raise UserError(f"preset not found: {spec} (known boards: {known or 'none'}; or a path to a YAML file)")
    values = {k: (str(v) if k in ("tensorrt", "jetpack", "cuda") and v is not None else v)
              for k, v in load_yaml(path).items()}
    for key in ("board", "tensorrt"):
        if key not in values:
            raise UserError(f"preset {path} lacks the required key {key!r}")
    preset = from_dict(ExportPreset, values, where="preset.")
    preset.validate(f"preset {path}")
    return preset, path


# --- trtexec conventions per TensorRT version ------------------------------------------------
# How trtexec spells the options edgediag's build scripts use, read from trtexec's option parser and
# help text (NVIDIA/TensorRT samples/common/sampleOptions.cpp, sampleEngines.cpp, samples/trtexec/
# trtexec.cpp on branches release/7.1, 8.0, 8.2, 8.4, 8.5, 8.6, 10.0, 10.1, 10.3, 10.13); not run on a
# device. The workspace limit:
#
#   TensorRT            JetPack          spelling                          old --workspace=N
#   <= 8.2              <= 4.6           --workspace=N (megabytes)         the only spelling
#   8.4, 8.5, 8.6       5.0.2-5.1.x, 6.0 --memPoolSize=workspace:N (MiB)   still parsed (MiB), prints
#                                                                          "deprecated by --memPoolSize"
#   >= 10.0             6.1, 6.2, 7.0    --memPoolSize=workspace:N (a      removed: trtexec fails with
#                                        plain number is MiB; 10.1+ also   "Unknown option"
#                                        takes B/K/M/G suffixes)
#
# Also, for every version covered: --fp16 / --int8 add precisions to FP32; an explicitly quantized
# (Q/DQ) graph takes --int8 alone (the scales are in the graph: trtexec only invents or reads scales
# when the network has no Q/DQ layers; the implicit-quantization calibrator is "deprecated in TensorRT
# 10.1, superseded by explicit quantization"), --calib=FILE reads a calibration cache for the implicit
# path; --useDLACore=N selects DLA core N and --allowGPUFallback lets unsupported layers run on the GPU
# (DLA runs FP16/INT8 only); --minShapes/--optShapes/--maxShapes build a profile for dynamic inputs and
# --shapes sets them when running (--loadEngine); a static graph takes no shape flags ("Static model
# does not take explicit shapes").
TRTEXEC_CONVENTIONS: dict[tuple[int, int], dict] = {
    (0, 0): {"workspace": "--workspace={mib}", "old_workspace": "--workspace={mib}",
             "old_workspace_status": "the only spelling (megabytes)"},
    (8, 4): {"workspace": "--memPoolSize=workspace:{mib}", "old_workspace": "--workspace={mib}",
             "old_workspace_status": "deprecated: still parsed (MiB), with a warning"},
    (10, 0): {"workspace": "--memPoolSize=workspace:{mib}", "old_workspace": None,
              "old_workspace_status": "removed: trtexec fails with 'Unknown option'"},
}


def _shape_spec(input_shapes: dict[str, list], batch: int) -> str:
    """trtexec's shape spec ``name:BxDxD,...`` with the first (batch) dimension set to ``batch``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in [batch, *list(shape)[1:]])}"
                    for name, shape in input_shapes.items())


@dataclasses.dataclass(frozen=True)
class TrtexecFlags:
    """trtexec's spelling for one TensorRT version (:func:`trtexec_flags`); see TRTEXEC_CONVENTIONS."""

    tensorrt: str  # the version asked for
    convention: str  # the TRTEXEC_CONVENTIONS row used: "8.4", "10.0" ("0.0": before 8.4)
    workspace_flag: str  # with {mib}
    old_workspace_flag: str | None  # with {mib}; None where trtexec no longer accepts it
    old_workspace_status: str
    int8_qdq_needs_calib: bool = False  # a Q/DQ graph takes --int8 alone
    build_shape_flags: tuple[str, str, str] = ("--minShapes", "--optShapes", "--maxShapes")
    run_shape_flag: str = "--shapes"

    def workspace(self, mib: int) -> str:
        """The builder workspace limit, ``mib`` MiB."""
        return self.workspace_flag.format(mib=int(mib))

    def precision(self, precision: str, qdq: bool = True, calib: str = "calib.cache") -> list[str]:
        """fp32: none; fp16: --fp16; int8 from a Q/DQ graph: --int8 alone; int8 without Q/DQ
        (implicit, deprecated since 10.1): --int8 --calib=``calib``."""
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "fp16":
            return ["--fp16"]
        if precision == "int8":
            return ["--int8"] if qdq else ["--int8", f"--calib={calib}"]
        return []

    def dla(self, dla_cores: int, core: int | None = 0) -> list[str]:
        """--useDLACore=``core`` --allowGPUFallback; none for ``core=None``. Refused where the board
        has no such core (``dla_cores`` from the preset)."""
        if core is None:
            return []
        if not 0 <= core < dla_cores:
            raise UserError(f"DLA core {core} asked for, but the board has "
                            f"{dla_cores or 'no'} DLA core{'s' if dla_cores != 1 else ''}")
        return [f"--useDLACore={core}", "--allowGPUFallback"]

    def build_shapes(self, input_shapes: dict[str, list], opt_batch: int, max_batch: int,
                     min_batch: int = 1) -> list[str]:
        """The optimisation profile of a dynamic-batch graph (static graphs take no shape flags)."""
        lo, opt, hi = self.build_shape_flags
        return [f"{lo}={_shape_spec(input_shapes, min_batch)}", f"{opt}={_shape_spec(input_shapes, opt_batch)}",
                f"{hi}={_shape_spec(input_shapes, max_batch)}"]

    def run_shapes(self, input_shapes: dict[str, list], batch: int) -> list[str]:
        """The shapes to run a dynamic-batch engine with (``trtexec --loadEngine=... --shapes=...``)."""
        return [f"{self.run_shape_flag}={_shape_spec(input_shapes, batch)}"]

    def build(self, workspace_mb: int, precision: str, *, qdq: bool = True, calib: str = "calib.cache",
              dla_cores: int = 0, dla_core: int | None = None, input_shapes: dict[str, list] | None = None,
              dynamic: bool = False, opt_batch: int = 1, max_batch: int = 1) -> list[str]:
        """Precision, workspace, shape and DLA flags of one build (without --onnx/--saveEngine)."""
        flags = [*self.precision(precision, qdq, calib), self.workspace(workspace_mb)]
        if dynamic:
            flags += self.build_shapes(input_shapes or {}, opt_batch, max_batch)
        return flags + self.dla(dla_cores, dla_core)


def trtexec_flags(version: str) -> TrtexecFlags:
    """How trtexec of TensorRT ``version`` ("8.5.2", "10.13", ...) spells edgediag's options."""
    wanted = parse_version(version)
    row = max(v for v in TRTEXEC_CONVENTIONS if v <= wanted)
    conv = TRTEXEC_CONVENTIONS[row]
    return TrtexecFlags(tensorrt=str(version), convention=".".join(map(str, row)), workspace_flag=conv["workspace"],
                        old_workspace_flag=conv["old_workspace"], old_workspace_status=conv["old_workspace_status"])


__all__ = ["ExportPreset", "load_preset", "known_boards", "board_family", "BOARD_DLA_CORES", "PRESET_DIR",
           "PRECISIONS", "Issue", "check_model", "report", "summary_line", "problems", "unsupported_ops",
           "table_version", "KNOWN_VERSIONS", "SOURCE", "TRTEXEC_CONVENTIONS", "TrtexecFlags", "trtexec_flags"]
