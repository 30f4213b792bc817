"""Triton Inference Server on this machine: the `tritonserver` binary that PyTriton's wheel
ships (with its python backend), run over a repository from repository.py.

PyTriton's own Python layer is not used: it hands tensors to the backend through the numpy
path that numpy 2 breaks (every output arrives empty), and it serves Python callables rather
than a repository, which is what a Triton server elsewhere runs. Driving the binary directly
serves the very repository `ditar-serve --write-repository` writes.

The server is a child process that cannot outlive us: it gets SIGINT when the thread that
started it ends, however it ends (PR_SET_PDEATHSIG), and `stop()` sends SIGINT (Triton's clean
shutdown; PyTriton's SIGTERM path orphans it), then waits for its model stubs and kills its
process group if anything is left. A workspace left by a process killed outright (SIGKILL skips
every cleanup) is removed by the next server.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ditarkit.serve.protocol import SPEECH_MODEL, VOICE_MODEL

EXIT_TIMEOUT_SECONDS = 5  # Triton waits this long for in-flight requests on shutdown (its default: 30)
START_TIMEOUT_SECONDS = 180.0  # models load in a few seconds; a slow disk or a big bundle takes longer
LOG_TAIL = 200  # lines of the server's log kept to explain a failed start
PR_SET_PDEATHSIG = 1
STUB_EXIT_SECONDS = 10.0  # stubs leave within a second of tritonserver; then they are killed
TRITON_ERROR = re.compile(r'^E\d{4} [\d:.]+ +\d+ [^\]]*\] "?(.*?)"?$')  # its message, without the prefix
# What the CPU-only binary logs at every start, as errors, with nothing wrong.
STARTUP_NOISE = ("CudaDriverHelper", "pinned memory pool", "CUDA driver version is insufficient")


class ServeError(RuntimeError):
    """The server cannot be started or has stopped, with the reason in one line."""


@dataclass(frozen=True)
class Address:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001

    @property
    def probe_host(self) -> str:  # where this machine reaches a server bound to `host`
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else "[::1]" if self.host == "::" else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.probe_host}:{self.grpc_port}"


WORKSPACE_PREFIX = "ditar-serve-"


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A temporary folder for one server (its repository, backend, voices), named by our pid,
    removed on leaving; first, those of ditar-serve processes that no longer run are removed."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{WORKSPACE_PREFIX}*-*"):
        pid = old.name[len(WORKSPACE_PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{WORKSPACE_PREFIX}{os.getpid()}-") as tmp:
        yield Path(tmp)


def triton_distribution() -> Path:
    """The folder holding bin/tritonserver and backends/python in the nvidia-pytriton wheel,
    found without importing pytriton (its Python layer is not needed)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("Triton is not installed: pip install nvidia-pytriton (see tests/serve-requirements.txt)")
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ServeError(f"{dist} has no bin/tritonserver: reinstall nvidia-pytriton")
    return dist


def prepare_backends(workspace: Path) -> Path:
    """backends/python with the stub built for this Python, as PyTriton lays it out (the wheel
    ships one stub per Python version beside the backend, and the backend looks in its folder)."""
    dist = triton_distribution()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"the Triton python backend has no stub for Python {version} (it has "
                         f"{sorted(p.name for p in (dist / 'python_backend_stubs').iterdir())})")
    backend = workspace / "backends" / "python"
    backend.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / name, backend / name)
    shutil.copy2(stub, backend / "triton_python_backend_stub")
    return workspace / "backends"


def server_environment() -> dict[str, str]:
    """The stub embeds libpython and finds its interpreter through PATH: put this Python's
    library folder first (else it may load the system's libpython of another patch release,
    and models fail with `_thread.RLock ... _recursion_count`) and this Python's bin first (so
    the stub runs in this environment, with its numpy, onnxruntime and ditarkit)."""
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(triton_distribution().parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [*libs, env.get("LD_LIBRARY_PATH", "")] if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def check_ports_free(address: Address) -> None:
    """Refuse a port in use before Triton starts (it would load every model first, then fail)."""
    for port in (address.http_port, address.grpc_port):
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address.host, port))
            except OSError as err:
                raise ServeError(f"cannot listen on {address.host}:{port}: {err.strerror}") from None


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGINT it when the process that started it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT)


class LocalTriton:
    """tritonserver over `repository`, started by start() and ended by stop() (also on leaving
    a `with` block). Its log lines go to `on_log` as they come."""

    def __init__(self, repository: Path, workspace: Path, address: Address = Address(),
                 on_log: Callable[[str], None] | None = None, verbose: bool = False) -> None:
        self.repository, self.workspace, self.address = repository, workspace, address
        self.on_log, self.verbose = on_log, verbose
        self.process: subprocess.Popen | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)

    def command(self, backends: Path) -> list[str]:
        a = self.address
        return [
            str(triton_distribution() / "bin" / "tritonserver"),
            "--model-repository", str(self.repository), "--backend-directory", str(backends),
            "--disable-auto-complete-config",  # config.pbtxt is the whole contract
            "--http-address", a.host, "--http-port", str(a.http_port),
            "--grpc-address", a.host, "--grpc-port", str(a.grpc_port),
            "--allow-metrics", "false", "--exit-timeout-secs", str(EXIT_TIMEOUT_SECONDS),
            # one shared-memory namespace per server, so two servers on one machine never meet
            "--backend-config", f"python,shm-region-prefix-name=ditar{os.getpid()}x{a.grpc_port}",
            "--log-verbose", "1" if self.verbose else "0",
        ]

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        backends = prepare_backends(self.workspace)
        self.process = subprocess.Popen(
            self.command(backends), env=server_environment(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            start_new_session=True,  # its own group: stop() can end it with its stubs
            preexec_fn=_die_with_parent)
        threading.Thread(target=self._pump_log, daemon=True, name="tritonserver-log").start()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise ServeError(f"tritonserver exited with status {self.process.returncode}: {self.failure()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"tritonserver was not ready after {timeout:.0f} s: {self.failure()}")
            time.sleep(0.2)

    def ready(self) -> bool:
        base = f"http://{self.address.probe_host}:{self.address.http_port}/v2"
        return all(_http_ok(url) for url in (f"{base}/health/ready", f"{base}/models/{SPEECH_MODEL}/ready",
                                             f"{base}/models/{VOICE_MODEL}/ready"))

    def failure(self) -> str:
        """The log line that says why: Triton's last error line (its final "failed to load all
        models" says less than the error before it), else the last line naming an error."""
        lines = [line for line in self.log_tail if not any(noise in line for noise in STARTUP_NOISE)]
        errors = [m.group(1) for m in map(TRITON_ERROR.match, lines) if m]
        named = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
        reason = (errors or named or ["no reason in its log"])[-1]
        return " ".join(reason.split())[:500]

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self) -> int | None:
        """SIGINT, then (after Triton's exit timeout and some slack) SIGKILL to its group."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGINT)
        try:
            status = process.wait(timeout=EXIT_TIMEOUT_SECONDS + 15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            status = process.wait()
        _end_group(process.pid)
        return status

    def __enter__(self) -> LocalTriton:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def _pump_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.log_tail.append(line)
            if self.on_log:
                self.on_log(line)


def _end_group(pgid: int, grace: float = STUB_EXIT_SECONDS) -> None:
    """tritonserver can exit before its model stubs have (they leave on their own a moment
    later): wait for its process group to empty, and kill what is left after `grace`."""
    deadline = time.monotonic() + grace
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Whether a process of this group still runs (zombies, waiting for their reaper, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
