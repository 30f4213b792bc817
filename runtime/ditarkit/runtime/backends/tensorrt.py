"""TensorRT backend: engines built on the device from a bundle, and a runner over them.

Written to the name-based API that TensorRT 8.6, 10.x and 11.x share (set_input_shape,
set_tensor_address, execute_async_v3). Device memory, copies and CUDA graphs go through
cuda-python. Nothing here is imported until TensorRT is asked for, so the runtime installs
and runs without it.

Engines are device-specific: they live in `<bundle>/engines/`, keyed by the ONNX file's
checksum, the GPU and the TensorRT version, and a mismatch is refused with the command that
rebuilds them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditarkit.runtime.backends.cuda import check, cuda_copy2d, insert_slots, load_cudart
from ditarkit.runtime.manifest import (
    LM,
    LM_ADVANCE_LOGITS,
    LM_HIDDEN,
    LM_NEW_KEYS,
    LM_NEW_VALUES,
    LM_PAST_KEYS,
    LM_PAST_VALUES,
    LM_POSITION,
    LM_STOP_LOGIT,
    LOCDIT,
    LOCDIT_SAMPLER,
    BundleError,
    GraphSpec,
    Manifest,
    load_manifest,
)
from ditarkit.runtime.runner import GraphRunner, LMStep, RunnerClosed, lm_feeds, lm_outputs

ENGINE_DIR = "engines"
ENGINE_INDEX = "engines.json"
TIMING_CACHE = "timing.cache"
WORKSPACE_BYTES = 2 << 30
# Graphs replayed from a CUDA graph: each runs at fixed shapes and buffer addresses, the fused
# sampler once per patch (the default path), the per-step LocDiT nfe times per patch when the
# NFE is not the model's. The LM is not: its KV-cache addresses change with the state.
CAPTURED_GRAPHS = (LOCDIT_SAMPLER, LOCDIT)
# A replay runs the same kernels on the same inputs as the uncaptured run it is checked
# against; only reductions by atomics may reorder sums (fp16 engines: about 1e-3).
CAPTURE_RTOL, CAPTURE_ATOL = 1e-3, 1e-5

log = logging.getLogger("ditarkit")


class TensorRTUnavailable(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """None when engines can be built and run here, else why not, in one line."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    try:
        count = check(load_cudart().cudaGetDeviceCount())
    except Exception:  # no driver, no cuda-python: both mean no usable GPU
        return "no CUDA device or cuda-python is not installed"
    return None if count > 0 else "no CUDA device"


def device_key() -> str:
    import tensorrt as trt

    props = check(load_cudart().cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return f"{name} sm{props.major}{props.minor} TensorRT {trt.__version__}"


def engine_key(graph: GraphSpec, device: str) -> str:
    return hashlib.sha256(f"{graph.sha256}|{device}".encode()).hexdigest()[:16]


def _profile_shapes(spec: GraphSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shapes of each input, from the manifest's dynamic ranges."""
    return {
        t.name: tuple(t.resolve({d: r[i] for d, r in spec.dims.items()}) for i in range(3))
        for t in spec.inputs
    }


def check_buildable(manifest: Manifest) -> None:
    """TensorRT takes INT8 Q/DQ only as symmetric int8 (zero point 0); a bundle quantized
    for ONNX Runtime's uint8 kernels is refused before any build starts."""
    target = manifest.quantization.get("target")
    if target not in (None, "tensorrt"):
        raise BundleError(f"this bundle was quantized for {target} (uint8 activations, which TensorRT does not "
                          "take): make one with `ditar-calibrate --target tensorrt`")


def build_engines(bundle: str | Path, log: Callable[[str], None] = lambda _m: None) -> dict[str, Path]:
    """Parse, profile, build and save one engine per graph, reusing a timing cache."""
    import tensorrt as trt
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )

    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    check_buildable(manifest)
    engines = bundle / ENGINE_DIR
    engines.mkdir(exist_ok=True)
    timing = str(engines / TIMING_CACHE)
    device = device_key()
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")  # TensorRT >= 9
    index = {"device": device, "engines": {}}
    for number, (name, spec) in enumerate(manifest.graphs.items(), 1):
        log(f"[{number}/{len(manifest.graphs)}] building TensorRT engine for {name} ({device})")
        profile = Profile()
        for tensor, (lo, opt, hi) in _profile_shapes(spec).items():
            profile.add(tensor, min=lo, opt=opt, max=hi)
        network = NetworkFromOnnxPath(str(bundle / spec.file), strongly_typed=strongly_typed or None)
        config = CreateConfig(
            profiles=[profile], load_timing_cache=timing,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: WORKSPACE_BYTES},
            # TensorRT 8.6 has no strongly typed networks: let it pick fp16 kernels instead,
            # and enable INT8 for a Q/DQ network.
            fp16=(manifest.precision == "fp16" and not strongly_typed),
            int8=(manifest.precision == "int8" and not strongly_typed),
        )
        path = engines / f"{name}-{engine_key(spec, device)}.plan"
        SaveEngine(EngineFromNetwork(network, config, save_timing_cache=timing), str(path))()
        index["engines"][name] = path.name
    (engines / ENGINE_INDEX).write_text(json.dumps(index, indent=2))
    return {name: engines / file for name, file in index["engines"].items()}


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int


@dataclass
class DeviceKVCache:
    """KV cache resident on the GPU: the LM reads it in place, new slots are copied in."""

    keys: DeviceBuffer  # (L, 1, Hkv, capacity, hd) float32
    values: DeviceBuffer
    capacity: int
    position: int = 0


class TensorRTRunner(GraphRunner):
    name = "tensorrt"

    def __init__(self, bundle: str | Path, cuda_graphs: bool = True) -> None:
        import tensorrt as trt

        bundle = Path(bundle)
        self.bundle = bundle
        self.manifest = load_manifest(bundle)
        self.config, self.specs = self.manifest.config, self.manifest.graphs
        self.cudart = load_cudart()
        self._buffers: list[DeviceBuffer] = []
        self.stream = check(self.cudart.cudaStreamCreate())
        paths = self._engine_paths(bundle)
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self.engines = {n: runtime.deserialize_cuda_engine(p.read_bytes()) for n, p in paths.items()}
        self.contexts = {n: e.create_execution_context() for n, e in self.engines.items()}
        # One buffer per I/O tensor, sized for the manifest's maximum shapes, allocated once.
        self.io = {n: self._allocate_io(spec) for n, spec in self.specs.items()}
        # The KV cache too, at the largest capacity; each synthesis reuses it (the LM masks
        # every slot at or past `position`, so stale, finite contents are never read).
        self.kv = (self.io[LM][LM_PAST_KEYS], self.io[LM][LM_PAST_VALUES])
        for buffer in self.kv:  # never-written memory could hold inf/NaN, which no mask hides
            check(self.cudart.cudaMemset(buffer.ptr, 0, buffer.nbytes))
        self.cuda_graphs = cuda_graphs
        self._graph_exec: dict[tuple, object | None] = {}  # None: this shape runs uncaptured

    def _engine_paths(self, bundle: Path) -> dict[str, Path]:
        index_path = bundle / ENGINE_DIR / ENGINE_INDEX
        rebuild = f"run: ditar-engines {bundle}"
        if not index_path.is_file():
            raise BundleError(f"{bundle} has no TensorRT engines; {rebuild}")
        device = device_key()
        index = json.loads(index_path.read_text())
        paths = {}
        for name in self.specs:
            path = bundle / ENGINE_DIR / f"{name}-{engine_key(self.specs[name], device)}.plan"
            if index.get("device") != device or not path.is_file():
                raise BundleError(f"engines in {bundle} were built for {index.get('device')}, "
                                  f"this is {device}; {rebuild}")
            paths[name] = path
        return paths

    def _malloc(self, nbytes: int) -> DeviceBuffer:
        buffer = DeviceBuffer(check(self.cudart.cudaMalloc(max(nbytes, 1))), nbytes)
        self._buffers.append(buffer)
        return buffer

    def _allocate_io(self, spec: GraphSpec) -> dict[str, DeviceBuffer]:
        biggest = {d: r[2] for d, r in spec.dims.items()}
        return {
            t.name: self._malloc(int(np.prod(t.resolve(biggest))) * np.dtype(t.dtype).itemsize)
            for t in (*spec.inputs, *spec.outputs)
        }

    def _copy(self, dst: int, src: int, nbytes: int, kind) -> None:
        check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def _upload(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._copy(buffer.ptr, array.ctypes.data, array.nbytes, kind)

    def _download(self, buffer: DeviceBuffer, shape, dtype) -> np.ndarray:
        host = np.empty(shape, dtype)
        self._copy(host.ctypes.data, buffer.ptr, host.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        return host

    def _execute(self, name: str, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int]) -> None:
        context = self.contexts[name]
        for tensor, shape in shapes.items():
            context.set_input_shape(tensor, shape)
        for tensor, ptr in addresses.items():
            context.set_tensor_address(tensor, ptr)
        key = (name, *shapes.values())
        if self.cuda_graphs and name in CAPTURED_GRAPHS:
            self._launch_graph(key, name, context)
        else:
            self._enqueue(name, context)

    def _enqueue(self, name: str, context) -> None:
        if not context.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run {name}")

    def _launch_graph(self, key: tuple, name: str, context) -> None:
        """Replay the CUDA graph captured for this shape, saving the launch overhead of the
        graph's kernels. The first call per shape runs uncaptured (a warm-up, as TensorRT
        asks before capture), captures, replays, and keeps the capture only if its outputs
        equal the warm-up's; otherwise this shape runs uncaptured from then on."""
        if key not in self._graph_exec:
            self._graph_exec[key] = self._capture(name, context)  # leaves this call's outputs in place
            return
        graph_exec = self._graph_exec[key]
        if graph_exec is None:
            self._enqueue(name, context)
        else:
            check(self.cudart.cudaGraphLaunch(graph_exec, self.stream))

    def _capture(self, name: str, context) -> object | None:
        self._enqueue(name, context)  # warm-up, outside capture
        want = self._outputs(name, context)
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(self.cudart.cudaStreamBeginCapture(self.stream, mode))
        enqueued = context.execute_async_v3(self.stream)
        graph = check(self.cudart.cudaStreamEndCapture(self.stream))
        graph_exec = check(self.cudart.cudaGraphInstantiate(graph, 0)) if enqueued else None
        check(self.cudart.cudaGraphDestroy(graph))  # the instance keeps what it needs
        if graph_exec is not None:
            check(self.cudart.cudaGraphLaunch(graph_exec, self.stream))
            got = self._outputs(name, context)
            if all(np.allclose(g, w, rtol=CAPTURE_RTOL, atol=CAPTURE_ATOL) for g, w in zip(got, want)):
                return graph_exec
            check(self.cudart.cudaGraphExecDestroy(graph_exec))
        log.warning("TensorRT: the CUDA graph of %s did not reproduce its uncaptured run; running it uncaptured", name)
        self._enqueue(name, context)  # the outputs of an uncaptured run, for this call
        return None

    def _outputs(self, name: str, context) -> list[np.ndarray]:
        """The graph's outputs on the host, once the stream has run up to here."""
        outs = [self._download(self.io[name][t.name], tuple(context.get_tensor_shape(t.name)), t.dtype)
                for t in self.specs[name].outputs]
        check(self.cudart.cudaStreamSynchronize(self.stream))
        return outs

    def _check_open(self) -> None:
        if not self._buffers:  # freed by close(): running would touch freed device memory
            raise RunnerClosed("the tensorrt runner is closed")

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._check_open()
        spec, io = self.specs[name], self.io[name]
        arrays = {t.name: np.ascontiguousarray(feeds[t.name], t.dtype) for t in spec.inputs}
        for tensor, array in arrays.items():
            self._upload(io[tensor], array)
        self._execute(name, {k: a.shape for k, a in arrays.items()}, {k: b.ptr for k, b in io.items()})
        return self._outputs(name, self.contexts[name])

    # -- KV cache kept on the GPU ------------------------------------------------------
    def new_lm_state(self, capacity: int) -> DeviceKVCache:
        """One synthesis at a time per runner: the state shares the runner's cache buffers."""
        return DeviceKVCache(*self.kv, capacity)

    def lm_step(self, embeds: np.ndarray, state: DeviceKVCache, audio_mask: np.ndarray | None = None) -> LMStep:
        self._check_open()
        lm, io = self.config.lm, self.io[LM]
        steps = embeds.shape[0]
        if state.position + steps > state.capacity:
            raise RuntimeError(f"KV cache full: {state.position + steps} > {state.capacity}")
        host = lm_feeds(self.config, embeds, audio_mask, {LM_POSITION: np.array([state.position], np.int64)})
        for name, array in host.items():
            self._upload(io[name], np.ascontiguousarray(array))
        kv_shape = (lm.layers, 1, lm.kv_heads, state.capacity, lm.head_dim)
        shapes = {**{name: array.shape for name, array in host.items()}, LM_PAST_KEYS: kv_shape,
                  LM_PAST_VALUES: kv_shape}
        addresses = {k: b.ptr for k, b in io.items()}
        addresses.update({LM_PAST_KEYS: state.keys.ptr, LM_PAST_VALUES: state.values.ptr})
        self._execute(LM, shapes, addresses)
        for new, cache in ((LM_NEW_KEYS, state.keys), (LM_NEW_VALUES, state.values)):
            self._insert(io[new], cache, state, steps)
        hidden = self._download(io[LM_HIDDEN], (1, lm.cond_dim), np.float32)
        stop = self._download(io[LM_STOP_LOGIT], (1,), np.float32)
        advance = None
        if LM_ADVANCE_LOGITS in io:
            advance = self._download(io[LM_ADVANCE_LOGITS], (1, self.config.cursor.max_advance + 1), np.float32)
        check(self.cudart.cudaStreamSynchronize(self.stream))
        state.position += steps
        return lm_outputs(hidden, stop, advance)

    def _insert(self, new: DeviceBuffer, cache: DeviceBuffer, state: DeviceKVCache, steps: int) -> None:
        lm = self.config.lm
        insert_slots(cuda_copy2d(self.cudart, self.stream), cache.ptr, new.ptr, state.position, steps,
                     state.capacity, lm.layers * lm.kv_heads, lm.head_dim)

    def close(self) -> None:
        for graph_exec in self._graph_exec.values():
            if graph_exec is not None:
                self.cudart.cudaGraphExecDestroy(graph_exec)
        self._graph_exec.clear()
        for buffer in self._buffers:
            self.cudart.cudaFree(buffer.ptr)
        self._buffers.clear()
