"""A standard Triton model repository for a bundle: `ditar` (decoupled, streaming) and
`register_voice`, both on the python backend, both running the kit's own runtime.

    DIR/ditarkit-repository.json      what wrote it (the marker that lets a rewrite replace it)
    DIR/ditar/config.pbtxt            DIR/ditar/1/model.py
    DIR/ditar/bundle/                 the bundle (unless linked by path)
    DIR/register_voice/config.pbtxt   DIR/register_voice/1/model.py
    DIR/register_voice/voices/        registered voices (made on first use)

model.py is two lines that import the model from ditarkit.serve: the server's Python needs
ditarkit installed (`pip install ditarkit`), and then serves exactly what the runtime runs.
Triton ignores a model folder's non-numeric subfolders, so the bundle and the voices live in one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ditarkit.runtime import __version__
from ditarkit.runtime.fileio import atomic_dir
from ditarkit.runtime.manifest import load_manifest
from ditarkit.serve.protocol import (
    SPEECH_INPUTS,
    SPEECH_MODEL,
    SPEECH_OUTPUTS,
    VOICE_INPUTS,
    VOICE_MODEL,
    VOICE_OUTPUTS,
    TensorSpec,
)

MARKER = "ditarkit-repository.json"
BUNDLE_DIR = f"{SPEECH_MODEL}/bundle"  # relative to the repository root
# Inside a model folder: Triton takes every folder at the root for a model (and will not start
# with one that has no config.pbtxt), but ignores a model's non-numeric subfolders.
VOICE_DIR = f"{VOICE_MODEL}/voices"
# Parameters in config.pbtxt: paths relative to the repository root, so the folder can be
# copied to another machine (a GPU box, a Jetson) as it is.
PARAM_BUNDLE, PARAM_VOICES, PARAM_BACKEND, PARAM_THREADS = "bundle", "voice_store", "backend", "threads"
MAX_INSTANCES = 64

MODEL_PY = '''# Written by ditar-serve (ditarkit {version}): the model is ditarkit's own, so this
# repository serves what the kit's runtime runs. Needs `pip install ditarkit` in the server's Python.
{path_lines}from ditarkit.serve.triton_model import {cls} as TritonPythonModel  # noqa: F401
'''
# The python backend's stub starts its interpreter isolated from PYTHONPATH: a repository
# served locally names the folders this process imports ditarkit from, so the stub runs the
# same code as ditar-serve however ditarkit was installed.
PATH_LINES = "import sys\n\nsys.path[:0] = {paths!r}\n"


@dataclass(frozen=True)
class RepositorySettings:
    instances: int = 1  # instances of `ditar`: one synthesis each at a time
    backend: str = "auto"  # the runtime's backend choice, made in each instance
    threads: int | None = None  # ONNX Runtime threads per instance (None: the runtime's default)
    link_bundle: bool = False  # refer to the bundle by its absolute path instead of copying it
    voice_store: str | None = None  # absolute folder for voices (None: DIR/register_voice/voices)
    python_paths: tuple[str, ...] = ()  # folders model.py puts first on sys.path (local serving)


def write_repository(target: str | Path, bundle: str | Path, settings: RepositorySettings | None = None) -> Path:
    """Write the repository into a staging folder beside `target`, then swap it into place
    (an earlier repository at `target` is replaced; any other non-empty folder is refused)."""
    settings = settings or RepositorySettings()
    if not 1 <= settings.instances <= MAX_INSTANCES:
        raise ValueError(f"instances must be in [1, {MAX_INSTANCES}], got {settings.instances}")
    bundle = Path(bundle).resolve()
    load_manifest(bundle)  # BundleError, with its one line, before anything is written
    target = Path(target)

    def build(staging: Path) -> None:
        if settings.link_bundle:
            bundle_param = str(bundle)
        else:
            shutil.copytree(bundle, staging / BUNDLE_DIR)
            bundle_param = BUNDLE_DIR
        threads = "" if settings.threads is None else str(settings.threads)
        params = {PARAM_BUNDLE: bundle_param, PARAM_VOICES: settings.voice_store or VOICE_DIR,
                  PARAM_BACKEND: settings.backend, PARAM_THREADS: threads}
        models = {SPEECH_MODEL: ("SpeechModel", model_config(SPEECH_MODEL, SPEECH_INPUTS, SPEECH_OUTPUTS,
                                                             settings.instances, params, decoupled=True)),
                  VOICE_MODEL: ("VoiceModel", model_config(VOICE_MODEL, VOICE_INPUTS, VOICE_OUTPUTS, 1, params))}
        for name, (cls, config) in models.items():
            (staging / name / "1").mkdir(parents=True, exist_ok=True)
            (staging / name / "config.pbtxt").write_text(config, encoding="utf-8")
            path_lines = PATH_LINES.format(paths=list(settings.python_paths)) if settings.python_paths else ""
            model_py = MODEL_PY.format(version=__version__, cls=cls, path_lines=path_lines)
            (staging / name / "1" / "model.py").write_text(model_py, encoding="utf-8")
        info = {"kit_version": __version__, "bundle": str(bundle), "bundle_copied": not settings.link_bundle,
                "models": {SPEECH_MODEL: {"instances": settings.instances, "decoupled": True},
                           VOICE_MODEL: {"instances": 1, "decoupled": False}}}
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    atomic_dir(target, build, marker=MARKER)
    return target


def model_config(name: str, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec], instances: int,
                 params: dict[str, str], decoupled: bool = False) -> str:
    """config.pbtxt for one python-backend model. KIND_CPU: Triton assigns no GPU to a python
    model's process; the runtime picks TensorRT or CUDA itself where the bundle and the GPU allow."""
    lines = [f"name: {_quote(name)}", 'backend: "python"', "max_batch_size: 0"]
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    lines += ["input ["] + _tensors(inputs) + ["]", "output ["] + _tensors(outputs) + ["]"]
    lines.append(f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]")
    lines += [f"parameters {{ key: {_quote(k)} value {{ string_value: {_quote(v)} }} }}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def _tensors(specs: Iterable[TensorSpec]) -> list[str]:
    specs = list(specs)
    rows = []
    for i, spec in enumerate(specs):
        optional = " optional: true" if spec.optional else ""
        dims = ", ".join(str(d) for d in spec.dims)
        comma = "," if i + 1 < len(specs) else ""
        rows.append(f"  {{ name: {_quote(spec.name)} data_type: TYPE_{spec.dtype} dims: [ {dims} ]{optional} }}{comma}")
    return rows


def _quote(value: str) -> str:
    """A protobuf text-format string: quotes and backslashes escaped, bytes outside printable
    ASCII as octal escapes (text format has no \\u)."""
    out = []
    for byte in value.encode("utf-8"):
        char = chr(byte)
        out.append("\\" + char if char in '"\\' else char if 32 <= byte < 127 else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'
