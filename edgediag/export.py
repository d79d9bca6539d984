"""`python -m edgediag.export`: a checkpoint to ONNX (and TensorRT) with parity checks.

    python -m edgediag.export --checkpoint runs/x/model.pt --target onnx --out export/out
    python -m edgediag.export --checkpoint runs/x/model.pt --target trt \\
        --preset export/presets/orin-nano.yaml [--precision fp16|int8] --out export/orin

The flow (tracing, parity, metadata, TensorRT or the board's build script) is
:mod:`edgediag.deploy.pipeline`; export/README.md documents the output folder.
"""

from __future__ import annotations

from edgediag import cli
from edgediag.deploy.onnx import SCAN_OPS
from edgediag.deploy.pipeline import run
from edgediag.deploy.presets import PRECISIONS
from edgediag.deploy.quantize import CALIBRATION_METHODS
from edgediag.measure.timing import add_timing_args


def parser():
    p = cli.make_parser(
        "export",
        "Export a checkpoint to ONNX or TensorRT with parity checks. Exit codes: 0 all requested artifacts built; "
        "2 bad input; 3 --target trt without TensorRT/GPU here (ONNX + build_engine.sh written: build the engine "
        "on the board); 4 parity beyond tolerance, or an fp16/int8 graph whose decisions agree with fp32 on fewer "
        "than 95 % of the check items (nothing written); 1 internal error.")
    p.add_argument("--checkpoint", required=True, help="model.pt written by train or prune")
    p.add_argument("--target", choices=["onnx", "trt"], default="onnx",
                   help="onnx: the checked ONNX graph(s); trt: also a TensorRT engine (built here with tensorrt and a "
                        "GPU, else build_engine.sh for the board, exit 3) (default onnx)")
    p.add_argument("--out", required=True, help="output folder (replaced as a whole when the export succeeds)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp16 / int8 also write model.fp16.onnx / model.int8.onnx (explicit Q/DQ), checked here on "
                        "ONNX Runtime against fp32 (decision agreement, AUC delta); TensorRT builds that graph "
                        "(default: --target trt: the preset's precision, else fp16; --target onnx: fp32)")
    p.add_argument("--preset", help="board preset: export/presets/<board>.yaml or a board name (orin-nano, ...)")
    p.add_argument("--calib-data", help="data folder for parity inputs and INT8 calibration "
                                        "(default: the checkpoint's data folder)")
    p.add_argument("--calib-items", type=int, default=512,
                   help="INT8 calibration: this many normal training items, or all there are (default 512; "
                        "a warning below 100)")
    p.add_argument("--int8-calibration", choices=CALIBRATION_METHODS, default="minmax",
                   help="how activation ranges are set from the calibration items (default minmax: on the fan and "
                        "magnetic-tile models its decision agreement was as high as or higher than percentile 99.999's)")
    p.add_argument("--check-items", type=int, default=256,
                   help="test items (else training items) the fp16/int8 graph is checked on against fp32 (default 256)")
    p.add_argument("--allow-drift", action="store_true",
                   help="keep an fp16/int8 graph whose decisions agree with fp32 on fewer than 95 %% of the check items")
    p.add_argument("--parity-items", type=int, default=16, help="items for the parity check (default 16)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="static batch size of the graph (default: the preset's, else 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis instead of a static one")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of a dynamic TensorRT profile (default 8)")
    p.add_argument("--streaming", action="store_true",
                   help="export model.streaming_module(): one time step with its states as inputs and outputs")
    p.add_argument("--stream-steps", type=int, default=64, help="steps of the streaming parity check (default 64)")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (default 17: the newest the TensorRT 8.5/8.6 parsers read)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed max |ORT - PyTorch| / std(PyTorch scores) (default 1e-4)")
    p.add_argument("--trt-tolerance", type=float,
                   help="the same for a TensorRT engine (default by precision: fp32 1e-3, fp16 5e-2, int8 2e-1)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (default torchscript: dynamo=True lands on opset 18 for these models)")
    p.add_argument("--scan-op", choices=list(SCAN_OPS), default="graph",
                   help="the selective scan of LDMamba/MemoryMamba as standard ONNX ops that every runtime reads "
                        "(graph, default) or as one edgediag::SelectiveScan node that ONNX Runtime runs with the "
                        "fused CPU kernel (custom: fp32, --target onnx, torchscript exporter; the runtime loads "
                        "the library built by python -m edgediag.runtime.custom_ops build)")
    p.add_argument("--layernorm", choices=["auto", "op", "decompose"], default="auto",
                   help="LayerNormalization as one ONNX op or decomposed into reductions "
                        "(auto: decompose when the target TensorRT is older than 8.6)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--dla", action="store_true", help="build for DLA core 0 (with GPU fallback) if the preset has DLA")
    add_timing_args(p, threads_help="CPU threads of both runtimes in the latency comparison and the "
                                        "ONNX Runtime checks (default 1, as every verb times)")
    cli.add_json_arg(p)
    return p



def main(argv=None) -> int:
    args = parser().parse_args(argv)
    with cli.json_stdout(args.json):
        return run(args)


if __name__ == "__main__":
    cli.entry(main)
