"""The TensorRT runner's CUDA-graph path, on a host stand-in for cuda-python and TensorRT's
execution context (neither installs here): which graphs are captured, that a capture is kept
only when its replay equals the uncaptured warm-up, and that a failed warm-up is an error.
The real capture still has to run on a GPU (test_export's TensorRT test, skipped here)."""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import pytest

from ditarkit.runtime.backends.tensorrt import CAPTURED_GRAPHS, DeviceBuffer, TensorRTRunner
from ditarkit.runtime.config import preset
from ditarkit.runtime.manifest import LM, LOCDIT_SAMPLER, graph_signatures


class HostCudart:
    """cuda-python's calls as the runner makes them, on host memory: a capture records the
    work enqueued, a launch replays it."""

    class cudaStreamCaptureMode:  # noqa: N801  (cuda-python's names)
        cudaStreamCaptureModeThreadLocal = 1

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self) -> None:
        self.capturing: list | None = None
        self.launches = 0

    def cudaMemcpyAsync(self, dst, src, nbytes, _kind, _stream):  # noqa: N802
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamSynchronize(self, _stream):  # noqa: N802
        return (0,)

    def cudaStreamBeginCapture(self, _stream, _mode):  # noqa: N802
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, _stream):  # noqa: N802
        work, self.capturing = self.capturing, None
        return 0, work

    def cudaGraphInstantiate(self, graph, _flags):  # noqa: N802
        return 0, list(graph)

    def cudaGraphDestroy(self, _graph):  # noqa: N802
        return (0,)

    def cudaGraphExecDestroy(self, _graph_exec):  # noqa: N802
        return (0,)

    def cudaGraphLaunch(self, graph_exec, _stream):  # noqa: N802
        self.launches += 1
        for work in graph_exec:
            work()
        return (0,)


class SamplerContext:
    """The fused sampler as an execution context: patch = x_init + cfg_scale * renoise, read
    from and written to the bound addresses. `captured_error` is added by captured work only
    (a capture that does not reproduce the kernels); `fails` makes every enqueue fail."""

    def __init__(self, cudart: HostCudart, captured_error: float = 0.0, fails: bool = False) -> None:
        self.cudart, self.captured_error, self.fails = cudart, captured_error, fails
        self.addresses: dict[str, int] = {}
        self.uncaptured_runs = 0

    def set_input_shape(self, _name, _shape) -> None:
        pass

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def get_tensor_shape(self, _name: str) -> tuple[int, ...]:
        return PATCH_SHAPE

    def _view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.ctypeslib.as_array(ctypes.cast(self.addresses[name], ctypes.POINTER(ctypes.c_float)), shape)

    def _compute(self, error: float) -> None:
        scale = self._view("cfg_scale", (1,))[0]
        self._view("patch", PATCH_SHAPE)[:] = self._view("x_init", PATCH_SHAPE) + scale * self._view(
            "renoise", PATCH_SHAPE) + error

    def execute_async_v3(self, _stream) -> bool:
        if self.fails:
            return False
        if self.cudart.capturing is not None:
            self.cudart.capturing.append(lambda: self._compute(self.captured_error))
        else:
            self.uncaptured_runs += 1
            self._compute(0.0)
        return True


CONFIG = preset("tiny")
SPECS = graph_signatures(CONFIG.contract())
PATCH_SHAPE = (CONFIG.patch_size, CONFIG.audio.latent_dim)


def _runner(context: SamplerContext) -> TensorRTRunner:
    runner = TensorRTRunner.__new__(TensorRTRunner)  # no engines: the context stands in for them
    runner.config, runner.specs, runner.cudart, runner.stream = CONFIG, SPECS, context.cudart, 0
    runner.contexts = {LOCDIT_SAMPLER: context}
    host = {t.name: np.zeros(t.resolve({}), t.dtype) for t in (*SPECS[LOCDIT_SAMPLER].inputs,
                                                                 *SPECS[LOCDIT_SAMPLER].outputs)}
    runner._host_memory = host  # keeps the "device" buffers alive
    runner.io = {LOCDIT_SAMPLER: {name: DeviceBuffer(array.ctypes.data, array.nbytes) for name, array in host.items()}}
    runner._buffers = list(runner.io[LOCDIT_SAMPLER].values())
    runner.cuda_graphs, runner._graph_exec = True, {}
    return runner


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: (rng.standard_normal(t.resolve({})).astype(t.dtype) if t.dtype == "float32"
                     else np.zeros(t.resolve({}), t.dtype)) for t in SPECS[LOCDIT_SAMPLER].inputs}


def _want(feeds: dict[str, np.ndarray]) -> np.ndarray:
    return feeds["x_init"] + feeds["cfg_scale"][0] * feeds["renoise"]


def test_the_default_path_s_fused_sampler_is_captured_and_the_lm_is_not():
    assert LOCDIT_SAMPLER in CAPTURED_GRAPHS and LM not in CAPTURED_GRAPHS


def test_a_capture_that_reproduces_the_warm_up_is_replayed_for_every_later_call():
    context = SamplerContext(HostCudart())
    runner = _runner(context)
    for seed in range(4):
        feeds = _feeds(seed)
        np.testing.assert_array_equal(runner.run(LOCDIT_SAMPLER, feeds)[0], _want(feeds))
    assert context.uncaptured_runs == 1  # the warm-up only
    assert context.cudart.launches == 4  # the check of the capture (its output is the first call's), then
    # one replay per later call


def test_a_capture_that_differs_from_the_warm_up_is_dropped_with_a_warning(caplog):
    context = SamplerContext(HostCudart(), captured_error=0.5)
    runner = _runner(context)
    with caplog.at_level(logging.WARNING, logger="ditarkit"):
        results = [(runner.run(LOCDIT_SAMPLER, _feeds(seed))[0], _want(_feeds(seed))) for seed in range(3)]
    for got, want in results:
        np.testing.assert_array_equal(got, want)  # every call's output is an uncaptured run's
    assert context.cudart.launches == 1 and context.uncaptured_runs == 1 + 1 + 2
    assert "did not reproduce its uncaptured run" in caplog.text


def test_a_failed_warm_up_is_an_error_not_a_capture():
    runner = _runner(SamplerContext(HostCudart(), fails=True))
    with pytest.raises(RuntimeError, match="TensorRT failed to run locdit_sampler"):
        runner.run(LOCDIT_SAMPLER, _feeds(0))
    assert runner._graph_exec == {}
