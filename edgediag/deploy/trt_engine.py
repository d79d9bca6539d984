#!/usr/bin/env python3
"""TensorRT builder for an edgediag export (written by `python -m edgediag.export`).

INT8 calibration cache (entropy calibrator over real items saved as calib_data.npy), or a
whole engine build, with the TensorRT Python API (8.5 to 10.x). Needs tensorrt, numpy and
device memory from torch (CUDA), cuda-python or pycuda.

    python3 calibrate_int8.py --onnx model.onnx --calib calib_data.npy --cache calib.cache
    python3 calibrate_int8.py --onnx model.onnx --engine model.engine --precision fp16
"""
import argparse
import os

import numpy as np
import tensorrt as trt

LOGGER = trt.Logger(trt.Logger.WARNING)
TRT_MAJOR = int(trt.__version__.split(".")[0])


class Device:
    """Device buffers through whichever CUDA binding is installed."""

    def __init__(self):
        self.kind = None
        try:
            import torch
            if torch.cuda.is_available():
                self.kind, self.torch = "torch", torch
                return
        except ImportError:
            pass
        try:
            from cuda import cudart
            self.kind, self.cudart = "cudart", cudart
            return
        except ImportError:
            pass
        try:
            import pycuda.autoinit  # noqa: F401 - creates the context
            import pycuda.driver as cuda
            self.kind, self.cuda = "pycuda", cuda
            return
        except ImportError:
            pass
        raise SystemExit("no CUDA binding: install torch (CUDA), cuda-python or pycuda")

    def alloc(self, nbytes):
        """(handle, device pointer) of nbytes bytes."""
        nbytes = max(int(nbytes), 1)
        if self.kind == "torch":
            buf = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
            return buf, buf.data_ptr()
        if self.kind == "cudart":
            err, ptr = self.cudart.cudaMalloc(nbytes)
            self._check(err)
            return ptr, int(ptr)
        buf = self.cuda.mem_alloc(nbytes)
        return buf, int(buf)

    def htod(self, handle, array):
        array = np.ascontiguousarray(array)
        if self.kind == "torch":
            handle[:array.nbytes].copy_(self.torch.from_numpy(array.view(np.uint8).reshape(-1)))
        elif self.kind == "cudart":
            self._check(self.cudart.cudaMemcpy(handle, array.ctypes.data, array.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)[0])
        else:
            self.cuda.memcpy_htod(handle, array)

    def dtoh(self, array, handle):
        if self.kind == "torch":
            array.view(np.uint8).reshape(-1)[:] = handle[:array.nbytes].cpu().numpy()
        elif self.kind == "cudart":
            self._check(self.cudart.cudaMemcpy(array.ctypes.data, handle, array.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)[0])
        else:
            self.cuda.memcpy_dtoh(array, handle)

    def sync(self):
        if self.kind == "torch":
            self.torch.cuda.synchronize()
        elif self.kind == "cudart":
            self._check(self.cudart.cudaDeviceSynchronize()[0])
        else:
            self.cuda.Context.synchronize()

    def _check(self, err):
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")


class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
    """Feeds calibration batches (N, *input shape) to the builder; caches the scales."""

    def __init__(self, data, batch_size, cache_path, device):
        trt.IInt8EntropyCalibrator2.__init__(self)
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.batch_size, self.cache_path, self.device, self.index = int(batch_size), cache_path, device, 0
        self.handle, self.ptr = device.alloc(self.data[:self.batch_size].nbytes)

    def get_batch_size(self):
        return self.batch_size

    def get_batch(self, names):
        if self.index + self.batch_size > len(self.data):
            return None
        self.device.htod(self.handle, self.data[self.index:self.index + self.batch_size])
        self.index += self.batch_size
        return [int(self.ptr)]

    def read_calibration_cache(self):
        if self.cache_path and os.path.exists(self.cache_path):
            with open(self.cache_path, "rb") as f:
                return f.read()
        return None

    def write_calibration_cache(self, cache):
        with open(self.cache_path, "wb") as f:
            f.write(bytes(cache))


def _keep_fp32(network):
    """FP16/INT8 builds: reductions and unary math (the norms' statistics, the scans'
    exp/softplus, log-mel's log) stay in FP32; a preference, not a hard constraint."""
    keep = {trt.LayerType.REDUCE, trt.LayerType.UNARY}
    if hasattr(trt.LayerType, "NORMALIZATION"):
        keep.add(trt.LayerType.NORMALIZATION)
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in keep and all(layer.get_output(j).dtype in (trt.float32, trt.float16)
                                      for j in range(layer.num_outputs)):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            n += 1
    return n


def build_engine(onnx_path, engine_path, precision="fp16", workspace_mb=1024, calib=None, calib_batch=1,
                 calib_cache=None, timing_cache=None, dla_core=-1, opt_batch=1, max_batch=8, keep_fp32=True):
    """Parse, configure, build and save; returns a dict describing the build."""
    builder = trt.Builder(LOGGER)
    flags = 0 if TRT_MAJOR >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, LOGGER)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    # A Q/DQ graph (edgediag's model.int8.onnx) carries its own scales: explicit quantization,
    # built as written, its float layers in FP32 as they were checked with ONNX Runtime.
    explicit = any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))
    if precision == "fp16" or (precision == "int8" and not explicit):
        config.set_flag(trt.BuilderFlag.FP16)
    info = {"tensorrt": trt.__version__, "precision": precision, "workspace_mb": int(workspace_mb)}
    if precision == "int8":
        info["int8"] = "explicit (Q/DQ graph)" if explicit else "implicit calibrator (fallback for old TensorRT)"
    if (precision == "fp16" or (precision == "int8" and not explicit)) and keep_fp32:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        info["fp32_layers"] = _keep_fp32(network)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profile = None
    if any(inp.shape[0] == -1 for inp in inputs):  # dynamic batch: one profile 1..max_batch
        profile = builder.create_optimization_profile()
        for inp in inputs:
            rest = tuple(inp.shape)[1:]
            profile.set_shape(inp.name, (1, *rest), (int(opt_batch), *rest), (int(max_batch), *rest))
        config.add_optimization_profile(profile)
    if precision == "int8" and explicit:
        config.set_flag(trt.BuilderFlag.INT8)
    elif precision == "int8":  # implicit: IInt8EntropyCalibrator2 (deprecated since TensorRT 10.1)
        if calib is None and not (calib_cache and os.path.exists(calib_cache)):
            raise RuntimeError("INT8 needs calibration data (calib_data.npy) or an existing calibration cache")
        if len(inputs) != 1:
            raise RuntimeError("INT8 calibration supports single-input graphs only")
        config.set_flag(trt.BuilderFlag.INT8)
        data = np.load(calib) if isinstance(calib, str) else calib
        if data is None:
            data = np.zeros((calib_batch, *tuple(inputs[0].shape)[1:]), np.float32)  # cache hit: never read
        config.int8_calibrator = EntropyCalibrator(data, calib_batch, calib_cache, Device())
        if profile is not None:
            config.set_calibration_profile(profile)
    if dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        info["dla_core"] = int(dla_core)
    cache_bytes = b""
    if timing_cache and os.path.exists(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    if engine_path:
        with open(engine_path, "wb") as f:
            f.write(bytes(serialized))
    if timing_cache:
        with open(timing_cache, "wb") as f:
            f.write(bytes(config.get_timing_cache().serialize()))
    return info


class EngineRunner:
    """Runs a serialized engine on numpy inputs (name-based I/O API of TensorRT >= 8.5)."""

    def __init__(self, engine_path, device=None):
        self.device = device or Device()
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(LOGGER).deserialize_cuda_engine(f.read())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers = {}

    def _buffer(self, name, nbytes):
        if name not in self.buffers or self.buffers[name][2] < nbytes:
            handle, ptr = self.device.alloc(nbytes)
            self.buffers[name] = (handle, ptr, nbytes)
        return self.buffers[name]

    def __call__(self, feeds):
        """{input name: array} -> {output name: array}."""
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_input_shape(name, array.shape)
            handle, ptr, _ = self._buffer(name, array.nbytes)
            self.device.htod(handle, array)
            self.context.set_tensor_address(name, ptr)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            array = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            handle, ptr, _ = self._buffer(name, array.nbytes)
            self.context.set_tensor_address(name, ptr)
            results[name] = (array, handle)
        if not self.context.execute_async_v3(0):
            raise RuntimeError("TensorRT execution failed")
        self.device.sync()
        out = {}
        for name, (array, handle) in results.items():
            self.device.dtoh(array, handle)
            out[name] = array
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", default="model.onnx")
    p.add_argument("--calib", help="calibration items (N, *input shape) float32 .npy")
    p.add_argument("--cache", default="calib.cache", help="INT8 calibration cache to write / reuse")
    p.add_argument("--engine", help="also save the engine built (default: calibration cache only)")
    p.add_argument("--precision", default="int8", choices=["fp32", "fp16", "int8"])
    p.add_argument("--batch", type=int, default=1, help="calibration batch (the graph's static batch)")
    p.add_argument("--workspace-mb", type=int, default=1024)
    p.add_argument("--dla-core", type=int, default=-1)
    p.add_argument("--timing-cache", default="timing.cache")
    a = p.parse_args()
    info = build_engine(a.onnx, a.engine, a.precision, a.workspace_mb, a.calib, a.batch, a.cache,
                        a.timing_cache, a.dla_core)
    print(f"built with TensorRT {info['tensorrt']} ({a.precision})"
          + (f"; calibration cache: {a.cache}" if a.precision == "int8" else "")
          + (f"; engine: {a.engine}" if a.engine else ""))


if __name__ == "__main__":
    main()
