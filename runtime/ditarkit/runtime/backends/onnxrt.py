"""ONNX Runtime backend: one session per bundle graph, checked against the manifest."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ditarkit.runtime.backends.cuda import Copy2D, cuda_copy2d, host_copy2d, insert_slots, load_cudart
from ditarkit.runtime.contract import ModelContract
from ditarkit.runtime.machine import cpu_features, describe_features, saturates_u8s8
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
    META_SIGNATURE,
    BundleError,
    GraphSpec,
    load_manifest,
    signature_digest,
)
from ditarkit.runtime.runner import (
    GraphRunner,
    LMStep,
    RunnerClosed,
    lm_feeds,
    lm_outputs,
    room_for_background_decoding,
    usable_cores,
)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

log = logging.getLogger("ditarkit")


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business
    # Flush denormals (|x| < 1.2e-38) to zero on the CPU: they are underflow dust (softmax
    # tails, tiny activations) that x86 computes slowly. Default voice: the same audio to the
    # bit, INT8 RTF 0.097 -> 0.093.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads:
        options.intra_op_num_threads = threads
    return options


# Below this LM width a step is a few hundred small kernels: extra intra-op threads only add
# synchronisation, and each of the bundle's sessions keeps its own spinning pool, so they
# contend. Default voice on 2 cores (ditar-bench, int8 / fp32): RTF 0.115 / 0.158 with one
# thread against 0.326 / 0.386 with two. Wider models get ONNX Runtime's default (all cores).
SINGLE_THREAD_BELOW_WIDTH = 1024


def default_threads(config: ModelContract) -> int | None:
    """Intra-op threads when the user sets none: 1 for small models, else ORT's default."""
    return 1 if config.lm.dim < SINGLE_THREAD_BELOW_WIDTH else None


def capped_threads(threads: int | None) -> int | None:
    """`threads` at most the usable cores: ONNX Runtime's pools spin, and more threads than
    cores only wait on each other (issue 14: far more than the cores made one short sentence
    take minutes)."""
    cores = usable_cores()
    if threads is not None and threads > cores:
        log.warning("%d threads asked for, %d cores usable: using %d", threads, cores, cores)
        return cores
    return threads


def int8_form_problem(quantization: Mapping[str, Any], features: dict[str, bool] | None) -> str | None:
    """Why an INT8 bundle's Q/DQ form computes wrong on this CPU, or None. int8 weights at the
    full 8 bits (this kit's bundles before issue 14, which record no weight type) saturate
    ONNX Runtime's u8s8 and s8s8 kernels on x86 without VNNI (ditarkit.calibration.quantize
    has the measurements)."""
    if quantization.get("target") != "onnxruntime" or quantization.get("reduce_range", False):
        return None
    if quantization.get("weight_type", "int8") != "int8" or not saturates_u8s8(features):
        return None
    return ("this INT8 bundle has 8-bit int8 weights, which saturate ONNX Runtime's integer kernels on a CPU "
            f"without VNNI ({describe_features(features)}): expect distorted audio; re-run ditar-calibrate "
            "with this kit (7-bit weights hold on every CPU)")


def default_providers() -> list[str]:
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def open_session(
    bundle: Path, spec: GraphSpec, config: ModelContract, providers: list[str], options: ort.SessionOptions
) -> ort.InferenceSession:
    """Load one graph and refuse it unless it is the graph the manifest describes."""
    path = bundle / spec.file
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # ORT raises several types for unreadable or invalid graphs
        reason = str(err).strip().splitlines()[0][:200]
        raise BundleError(f"cannot load graph {path}: {reason}") from None
    stamped = session.get_modelmeta().custom_metadata_map.get(META_SIGNATURE)
    if stamped != signature_digest(config, spec):
        raise BundleError(f"{path} was not exported with this manifest (signature {stamped})")
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (spec.input_names, spec.output_names):
        raise BundleError(f"{path}: graph I/O {names} differs from the manifest")
    return session


class OrtRunner(GraphRunner):
    """Runs a bundle on ONNX Runtime's CPU (or CUDA) execution provider."""

    name = "onnxruntime"

    def __init__(
        self,
        bundle: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        verify_files: bool = True,
    ) -> None:
        bundle = Path(bundle)
        self.bundle = bundle
        self.manifest = load_manifest(bundle, verify_files=verify_files)
        self.config = self.manifest.config
        self.specs = self.manifest.graphs
        self.providers = providers or default_providers()
        self.threads = capped_threads(threads) or default_threads(self.config)  # None: all cores
        problem = int8_form_problem(self.manifest.quantization, cpu_features()) if CUDA not in self.providers else None
        if problem:
            log.warning(problem)
        options = session_options(self.threads)
        self.sessions = {
            name: open_session(bundle, self.specs[name], self.config, self.providers, options)
            for name in self.specs
        }

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session(name).run(self.specs[name].output_names, feeds)

    def session(self, name: str) -> ort.InferenceSession:
        session = self.sessions.get(name)
        if session is None:
            raise RunnerClosed(f"the {self.name} runner is closed") if not self.sessions else KeyError(name)
        return session

    def close(self) -> None:
        self.sessions.clear()  # a call already running holds its session until it returns

    def decodes_in_background(self) -> bool:
        # Sessions run concurrently and release the GIL; on a GPU the kernels queue on one
        # device anyway. With threads=None ORT already takes every core.
        return self.providers == [CPU] and self.threads is not None and room_for_background_decoding(self.threads)


@dataclass
class BoundKVCache:
    """The runner's device-resident cache in use by one synthesis."""

    capacity: int
    position: int = 0


class OrtIOBindingRunner(OrtRunner):
    """ONNX Runtime with IO binding: the KV cache lives in OrtValues on the session's device
    (CUDA where onnxruntime-gpu is installed), is read in place by every LM step and never
    crosses to the host; each step's new slots are copied into it with one 2-D copy. On the
    CPU the same path runs with host memory, which is how it is tested without a GPU."""

    name = "onnxruntime-iobinding"

    def __init__(self, bundle: str | Path, device: str = "cuda", threads: int | None = None,
                 verify_files: bool = True) -> None:
        providers = [CUDA, CPU] if device == "cuda" else [CPU]
        super().__init__(bundle, providers=providers, threads=threads, verify_files=verify_files)
        self.device = device
        lm = self.config.lm
        self._max_capacity = self.specs[LM].dims["capacity"][2]
        shape = (lm.layers, 1, lm.kv_heads, self._max_capacity, lm.head_dim)
        # Allocated once at the largest capacity and zeroed (slots past `position` are masked,
        # but never-written memory could hold inf/NaN, which no additive mask hides).
        self.kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), device, 0) for _ in range(2)]
        self.copy2d: Copy2D = host_copy2d if device == "cpu" else cuda_copy2d(load_cudart())

    def new_lm_state(self, capacity: int) -> BoundKVCache:
        if capacity > self._max_capacity:
            raise RuntimeError(f"KV cache of {capacity} positions exceeds the bundle's {self._max_capacity}")
        return BoundKVCache(capacity)

    def lm_step(self, embeds: np.ndarray, state: BoundKVCache, audio_mask: np.ndarray | None = None) -> LMStep:
        lm, steps = self.config.lm, embeds.shape[0]
        if state.position + steps > state.capacity:
            raise RuntimeError(f"KV cache full: {state.position + steps} > {state.capacity}")
        session = self.session(LM)
        binding = session.io_binding()
        host = lm_feeds(self.config, embeds, audio_mask, {LM_POSITION: np.array([state.position], np.int64)})
        for name, array in host.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        shape = [lm.layers, 1, lm.kv_heads, state.capacity, lm.head_dim]
        for name, cache in zip((LM_PAST_KEYS, LM_PAST_VALUES), self.kv):
            binding.bind_input(name, self.device, 0, np.float32, shape, cache.data_ptr())
        binding.bind_output(LM_HIDDEN, "cpu")
        binding.bind_output(LM_STOP_LOGIT, "cpu")
        binding.bind_output(LM_NEW_KEYS, self.device)
        binding.bind_output(LM_NEW_VALUES, self.device)
        advance = LM_ADVANCE_LOGITS in self.specs[LM].output_names
        if advance:
            binding.bind_output(LM_ADVANCE_LOGITS, "cpu")
        session.run_with_iobinding(binding)
        hidden, stop, new_keys, new_values, *rest = binding.get_outputs()
        for new, cache in ((new_keys, self.kv[0]), (new_values, self.kv[1])):
            insert_slots(self.copy2d, cache.data_ptr(), new.data_ptr(), state.position, steps, state.capacity,
                         lm.layers * lm.kv_heads, lm.head_dim)
        state.position += steps
        return lm_outputs(hidden.numpy(), stop.numpy(), rest[0].numpy() if advance else None)

