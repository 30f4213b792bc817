"""A bounded load test: N concurrent streaming clients against a server on this machine.

Bounded in count and time: at most `requests` requests in all, none started after `duration`
seconds, each given up after `timeout`; then it stops by itself. Loopback only: a load test
is for a server of ours on this machine, never for another host.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ditarkit.serve.client import Client, RegisteredVoice
from ditarkit.serve.protocol import one_line
from ditarkit.serve.server import ServeError

MAX_STREAMS, MAX_REQUESTS, MAX_DURATION = 64, 10_000, 3600.0
SHOWN_ERRORS = 5  # distinct error messages kept in the report


@dataclass(frozen=True)
class LoadPlan:
    url: str
    text: str
    audio: np.ndarray  # the reference voice, mono
    sample_rate: int
    streams: int = 4
    requests: int = 16
    duration: float = 60.0
    timeout: float = 120.0
    register: bool = True  # register the voice once and send its id (else the audio every time)
    options: dict[str, Any] = field(default_factory=dict)
    reference_text: str = ""  # what the reference says (models that continue from it need it)


@dataclass
class RequestResult:
    first_chunk_seconds: float | None = None
    wall_seconds: float = 0.0
    audio_seconds: float = 0.0
    chunks: int = 0
    error: str | None = None


def check_loopback(url: str) -> tuple[str, int]:
    """host:port -> (host, port), refusing anything that is not this machine. Names are not
    resolved (no lookup leaves the machine either): localhost or a loopback address only."""
    host, _, port = url.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServeError(f"--url must be host:port (the server's gRPC port), got {url!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ServeError(f"the load test only targets this machine (loopback): give 127.0.0.1, ::1 or localhost, "
                         f"not {host}")
    return host, int(port)


def run_load(plan: LoadPlan, log: Callable[[str], None], server_pid: int | None = None) -> dict[str, Any]:
    _, port = check_loopback(plan.url)
    pid = server_pid or listening_pid(port)
    rss_before = tree_rss_mib(pid)
    voice: dict[str, Any] = {"audio": plan.audio, "sample_rate": plan.sample_rate,
                             "reference_text": plan.reference_text}
    if plan.register:
        with Client(plan.url, plan.timeout) as client:
            registered: RegisteredVoice = client.register_voice(plan.audio, plan.sample_rate, plan.reference_text)
        voice = {"voice_id": registered.voice_id}
        log(f"voice {registered.voice_id} registered ({registered.seconds:.1f} s)")
    results: list[RequestResult] = []
    lock = threading.Lock()
    budget = [plan.requests]
    start = time.perf_counter()
    deadline = start + plan.duration

    def take() -> bool:
        with lock:
            if budget[0] == 0 or time.perf_counter() > deadline:
                return False
            budget[0] -= 1
            return True

    def worker() -> None:
        with Client(plan.url, plan.timeout) as client:
            while take():
                result = one_request(client, plan.text, {**voice, **plan.options})
                with lock:
                    results.append(result)
                    log(f"{len(results)}/{plan.requests}: " + (f"error: {result.error}" if result.error else
                        f"{result.audio_seconds:.2f} s in {result.wall_seconds:.2f} s, "
                        f"first chunk {1000 * (result.first_chunk_seconds or 0):.0f} ms"))

    threads = [threading.Thread(target=worker, name=f"loadtest-{i}") for i in range(plan.streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return report(plan, results, wall, pid, rss_before, tree_rss_mib(pid))


def one_request(client: Client, text: str, request: dict[str, Any]) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    try:
        for chunk in client.stream(text, **request):
            if result.first_chunk_seconds is None and chunk.audio.size:
                result.first_chunk_seconds = time.perf_counter() - start
            result.audio_seconds += chunk.audio.size / chunk.sample_rate
            result.chunks += 1
    except ServeError as err:
        result.error = one_line(err)
    result.wall_seconds = time.perf_counter() - start
    return result


def report(plan: LoadPlan, results: list[RequestResult], wall: float, pid: int | None,
           rss_before: float | None, rss_after: float | None) -> dict[str, Any]:
    good = [r for r in results if r.error is None and r.audio_seconds > 0]
    first = [1000 * r.first_chunk_seconds for r in good if r.first_chunk_seconds is not None]
    rtf = [r.wall_seconds / r.audio_seconds for r in good]
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    audio = sum(r.audio_seconds for r in good)
    return {
        "url": plan.url, "streams": plan.streams, "requests": len(results), "completed": len(good),
        "errors": sum(errors.values()),
        "error_messages": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:SHOWN_ERRORS]),
        "wall_seconds": round(wall, 3), "audio_seconds": round(audio, 3),
        "audio_seconds_per_wall_second": round(audio / wall, 3) if wall > 0 else None,
        "first_chunk_ms": _quantiles(first), "rtf": _quantiles(rtf, digits=4),
        "server_pid": pid, "server_rss_mib": {"before": rss_before, "after": rss_after},
        "plan": {k: v for k, v in asdict(plan).items() if k not in ("audio", "url", "streams")}
                | {"reference_seconds": round(len(plan.audio) / plan.sample_rate, 2)},
    }


def _quantiles(values: list[float], digits: int = 1) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), digits), "p95": round(float(p95), digits), "max": round(max(values), digits)}


def listening_pid(port: int) -> int | None:
    """The process listening on this TCP port of this machine (Linux /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {link.readlink().name for link in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            return int(proc.name)
    return None


def tree_rss_mib(pid: int | None) -> float | None:
    """Resident memory of a process and its descendants (tritonserver and its model stubs)."""
    if pid is None:
        return None
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return round(total / 1024, 1)
