"""ditar-serve end to end on the tiny preset: a real Triton server (the tritonserver binary of
the nvidia-pytriton wheel) on 127.0.0.1 with free ports, started and stopped (SIGINT) here.
A stream equals offline synthesis, a registered voice equals the same reference sent inline,
concurrent streams complete, bad requests get the runtime's one line and the server keeps
serving, a client that leaves stops its generation, and ditar-loadtest reports in JSON. A tiny
VoxCPM v1 bundle (a model that continues from its reference) is served with the reference's
transcript and refused without it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from conftest import BLOCK_TORCH, speech_like

pytest.importorskip("tritonclient.grpc", reason="the serve tests need tritonclient[grpc] "
                    "(pip install --no-deps -r tests/serve-requirements.txt)")
if importlib.util.find_spec("pytriton") is None:
    pytest.skip("the serve tests need the tritonserver binary of nvidia-pytriton "
                "(pip install --no-deps -r tests/serve-requirements.txt)", allow_module_level=True)

from ditarkit.runtime.audio import AudioError  # noqa: E402
from ditarkit.runtime.sampler import NEVER_STOP, OptionsError  # noqa: E402
from ditarkit.runtime.synthesizer import Synthesizer  # noqa: E402
from ditarkit.runtime.text import TextError  # noqa: E402
from ditarkit.serve.cli import loadtest_main, serve_main  # noqa: E402
from ditarkit.serve.client import Client, RequestRefused  # noqa: E402
from ditarkit.serve.loadtest import listening_pid  # noqa: E402
from ditarkit.serve.protocol import MAX_REFERENCE_TEXT_CHARS, MAX_TEXT_CHARS  # noqa: E402
from ditarkit.serve.repository import MARKER  # noqa: E402
from ditarkit.serve.voices import VoiceStore  # noqa: E402

# The server runs the same graphs on the same ONNX Runtime build with the same thread count as
# this process, so a stream is bit-identical to offline synthesis here; 1e-5 is the runtime's
# own stream-vs-offline tolerance (fp32 summation order), kept in case thread counts differ.
STREAM_TOLERANCE = 1e-5
START_TIMEOUT = 120.0  # seconds for the server to load its models (about 3 s here, idle)
STOP_TIMEOUT = 30.0  # Triton's exit timeout is 5 s; unloading three stubs takes a few more
RATE = 24_000
SAMPLES_PER_PATCH = 4 * 600  # patch_size frames x hop: the first chunk is one patch
# Fixed-length options: the tiny preset's random stop head would end sentences at random.
OPTIONS = {"seed": 3, "cfg_scale": 1.5, "temperature": 0.5, "max_seconds": 1.0, "stop_threshold": NEVER_STOP}
TEXT = "The robot arm moved the red cube. Then it waited."
# Each of two concurrent streams is this long, so one takes several times longer to generate
# than a loaded machine may take to start the other (3 s of audio was once outrun by 18 ms).
CONCURRENT_SECONDS = 8.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningServer:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "ditarkit.serve", *args, "--host", "127.0.0.1",
                   "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        ready = threading.Event()
        self.banner: list[str] = []
        threading.Thread(target=self._read_banner, args=(ready,), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or not self.banner or not self.banner[-1].startswith("serving "):
            self.process.kill()
            raise AssertionError(f"ditar-serve did not start: {log_path.read_text()[-2000:]}")
        self.triton_pid = listening_pid(self.grpc_port)
        self.pids = tree_pids(self.triton_pid)  # tritonserver and one stub per model instance

    def _read_banner(self, ready: threading.Event) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.banner.append(line)
            if line.startswith("serving "):
                ready.set()
        ready.set()  # stdout closed: the process has exited (the caller checks poll())

    def server_log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(STOP_TIMEOUT)
        finally:
            self.log.close()


def tree_pids(pid: int | None) -> set[int]:
    found, pending = set(), [pid] if pid else []
    while pending:
        current = pending.pop()
        found.add(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            pending += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="session")
def bundle(tiny_fp32_bundle) -> Path:
    return tiny_fp32_bundle


@pytest.fixture(scope="session")
def reference() -> np.ndarray:
    return speech_like(2.0, RATE)


@pytest.fixture(scope="session")
def synth(bundle):
    with Synthesizer(bundle) as synth:
        yield synth


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    running = RunningServer([str(bundle), "--instances", "2"], tmp_path_factory.mktemp("log") / "server.log")
    assert len(running.pids) == 4, f"tritonserver + 2 ditar stubs + 1 register_voice stub: {running.pids}"
    yield running
    status = running.stop()
    assert status == 0, running.server_log()[-2000:]
    assert "stopped by SIGINT" in running.server_log()
    assert not [pid for pid in running.pids if alive(pid)], "tritonserver or a model stub outlived ditar-serve"


def stream_audio(client: Client, text: str = TEXT, **request) -> tuple[np.ndarray, list]:
    chunks = list(client.stream(text, **request))
    return np.concatenate([c.audio for c in chunks]), chunks


def offline(synth: Synthesizer, reference: np.ndarray, text: str = TEXT, **options) -> np.ndarray:
    return synth.synthesize(text, synth.voice(reference, RATE), synth.options(**options))


def test_stream_equals_offline_synthesis(server, synth, reference):
    with Client(server.url) as client:
        audio, chunks = stream_audio(client, audio=reference, sample_rate=RATE, **OPTIONS)
    expected = offline(synth, reference, **OPTIONS)
    assert audio.dtype == np.float32 and audio.shape == expected.shape == (2 * RATE,)  # 2 sentences x 1 s
    assert np.abs(audio - expected).max() <= STREAM_TOLERANCE
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True] and chunks[-1].audio.size == 0
    assert chunks[0].audio.size == SAMPLES_PER_PATCH  # the first chunk after one patch
    assert {c.sample_rate for c in chunks} == {RATE}


def test_registered_voice_gives_the_audio_of_the_same_reference_inline(server, reference):
    with Client(server.url) as client:
        voice = client.register_voice(reference, RATE)
        assert client.register_voice(reference, RATE).voice_id == voice.voice_id  # one id per voice
        assert voice.seconds == pytest.approx(2.0, abs=0.05)  # speech_like has no silence to trim
        by_id, _ = stream_audio(client, voice_id=voice.voice_id, **OPTIONS)
        inline, _ = stream_audio(client, audio=reference, sample_rate=RATE, **OPTIONS)
    assert by_id.shape == inline.shape and np.abs(by_id - inline).max() <= STREAM_TOLERANCE


def test_two_concurrent_streams_both_complete(server, synth, reference):
    options = [{**OPTIONS, "seed": seed, "max_seconds": CONCURRENT_SECONDS} for seed in (11, 12)]
    results: dict[int, tuple[np.ndarray, float, float]] = {}  # audio, first chunk at, end at
    go = threading.Barrier(2)

    def speak(i: int) -> None:
        with Client(server.url) as client:
            go.wait()
            chunks = client.stream(TEXT, audio=reference, sample_rate=RATE, **options[i])
            first = next(chunks)
            first_at = time.perf_counter()
            audio = np.concatenate([first.audio, *(c.audio for c in chunks)])
            results[i] = (audio, first_at, time.perf_counter())

    threads = [threading.Thread(target=speak, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [0, 1], "a stream did not complete"
    for i in (0, 1):
        assert np.abs(results[i][0] - offline(synth, reference, **options[i])).max() <= STREAM_TOLERANCE
    # served side by side by the two instances, not one after the other: each stream's first
    # chunk came before the other stream ended
    assert results[0][1] < results[1][2] and results[1][1] < results[0][2]


def _runtime_message(call) -> str:
    with pytest.raises((OptionsError, TextError, AudioError)) as err:
        call()
    return str(err.value)


# name -> (request overrides, the message the client must get: a string, or the runtime's own
# message for the same input, computed locally)
BAD_REQUESTS = {
    "empty text": ({"text": ""}, "text is empty"),
    "unspeakable text": ({"text": "?!? ..."}, lambda s, r: _runtime_message(lambda: list(s.stream("?!? ...", r)))),
    "text not UTF-8": ({"text": b"caf\xe9"}, "text is not UTF-8 (byte 0xe9 at offset 3)"),
    "oversized text": ({"text": "word " * 500}, f"over the server's limit of {MAX_TEXT_CHARS}"),
    "NaN audio": ({"audio": np.full(RATE, np.nan, np.float32)}, "reference_audio: array contains NaN"),
    "silent audio": ({"audio": np.zeros(2 * RATE, np.float32)}, "reference_audio: array is silent"),
    "short audio": ({"audio": speech_like(0.5, RATE)}, "at least 1.0 s is needed"),
    "bad sample rate": ({"sample_rate": 100}, "reference_sample_rate must be in [8000, 384000] Hz, got 100"),
    "unknown voice": ({"voice_id": 12345, "audio": None, "sample_rate": None}, "unknown voice_id 12345"),
    "voice and audio": ({"voice_id": 12345}, "send either voice_id or reference_audio, not both"),
    "no voice": ({"audio": None, "sample_rate": None}, "send reference_audio"),
    "oversized transcript": ({"reference_text": "w" * (MAX_REFERENCE_TEXT_CHARS + 1)},
                             f"reference_text is {MAX_REFERENCE_TEXT_CHARS + 1} characters, over the server's limit "
                             f"of {MAX_REFERENCE_TEXT_CHARS}"),
    "transcript not UTF-8": ({"reference_text": b"caf\xe9"}, "reference_text is not UTF-8 (byte 0xe9 at offset 3)"),
    "transcript with a voice_id": ({"voice_id": 12345, "audio": None, "sample_rate": None, "reference_text": "Hi."},
                                   "reference_text was sent without reference_audio"),
    "cfg out of range": ({"cfg_scale": 100.0}, lambda s, r: _runtime_message(lambda: s.options(cfg_scale=100.0))),
    "temperature": ({"temperature": 2.0}, lambda s, r: _runtime_message(lambda: s.options(temperature=2.0))),
    "nfe": ({"nfe": 0}, lambda s, r: _runtime_message(lambda: s.options(nfe=0))),
    "negative seed": ({"seed": -1}, lambda s, r: _runtime_message(lambda: s.options(seed=-1))),
    "NaN max_seconds": ({"max_seconds": float("nan")},
                        lambda s, r: _runtime_message(lambda: s.options(max_seconds=float("nan")))),
    "chunk_patches": ({"chunk_patches": 0}, "chunk_patches must be an integer in [1, 64], got 0"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_is_refused_in_one_line_and_the_next_succeeds(server, synth, reference, name):
    overrides, expected = BAD_REQUESTS[name]
    if callable(expected):
        expected = expected(synth, synth.voice(reference, RATE))
    request = {"text": TEXT, "audio": reference, "sample_rate": RATE, **OPTIONS, **overrides}
    with Client(server.url) as client:
        with pytest.raises(RequestRefused) as refused:
            list(client.stream(**{k: v for k, v in request.items() if v is not None}))
        message = str(refused.value)
        assert expected in message and "\n" not in message, message
        audio, _ = stream_audio(client, "Hi.", audio=reference, sample_rate=RATE, **OPTIONS)  # the same stream
    assert audio.size == RATE


def test_a_model_that_reads_no_transcript_ignores_one(server, reference):
    with Client(server.url) as client:
        plain = client.register_voice(reference, RATE)
        assert client.register_voice(reference, RATE, reference_text="Something else.").voice_id == plain.voice_id
        without, _ = stream_audio(client, "Hi.", audio=reference, sample_rate=RATE, **OPTIONS)
        given, _ = stream_audio(client, "Hi.", audio=reference, sample_rate=RATE, reference_text="Hello.", **OPTIONS)
    assert given.shape == without.shape and np.abs(given - without).max() <= STREAM_TOLERANCE


def test_voice_store_keeps_transcripts_and_still_reads_voices_kept_without(bundle, tmp_path):
    store = VoiceStore(tmp_path, bundle)
    latents = np.random.default_rng(0).standard_normal((25, 64)).astype(np.float32)
    legacy = hashlib.sha256(store.key.encode() + latents.tobytes()).digest()[:8]
    assert store.voice_id(latents) == int.from_bytes(legacy, "big") >> 1  # no transcript: the id it always had
    ids = [store.put(latents), store.put(latents, "Hello."), store.put(latents, "Hi.")]
    assert len(set(ids)) == 3 and store.put(latents, "Hello.") == ids[1]
    other = VoiceStore(tmp_path, bundle)  # another instance's process: reads the files
    assert [other.get(i).text for i in ids] == ["", "Hello.", "Hi."]
    assert all(np.array_equal(other.get(i).latents, latents) for i in ids)
    old, old_id = latents + 1, store.voice_id(latents + 1)  # kept before transcripts were: latents alone
    with open(store.folder / f"{old_id:016x}.npy", "wb") as fh:
        np.save(fh, old)
    assert other.get(old_id).text == "" and np.array_equal(other.get(old_id).latents, old)
    assert store.put(old) == old_id  # registered again: the old file stands for it
    assert sorted(p.suffix for p in store.folder.iterdir()) == [".npy", ".npz", ".npz", ".npz"]  # no temp files


def test_register_voice_refuses_broken_audio_and_keeps_serving(server, reference):
    with Client(server.url) as client:
        with pytest.raises(RequestRefused, match="reference_audio: array is silent"):
            client.register_voice(np.zeros(2 * RATE, np.float32), RATE)
        assert client.register_voice(reference, RATE).voice_id >= 0


LONG_TEXT, SENTENCES, PATCHES_EACH = "Keep talking. " * 20, 20, 100  # 2,000 patches if nobody stops it
LONG_OPTIONS = {**OPTIONS, "max_seconds": 10.0}
# A client process that dies after its first chunk: the server only sees the connection drop.
DYING_CLIENT = """
import sys, numpy as np
from ditarkit.serve.client import Client
chunks = Client(sys.argv[1]).stream({text!r}, audio=np.load(sys.argv[2]), sample_rate={rate}, **{options!r})
next(chunks)
print("first chunk", flush=True)
sys.stdin.read()  # until killed
"""


def cancellations(server) -> list[str]:
    return [row for row in server.server_log().splitlines() if "cancelled by the client" in row]


@pytest.mark.parametrize("how", ["closes its stream", "is killed"])
def test_a_client_that_leaves_stops_its_generation(server, reference, tmp_path, how):
    before = len(cancellations(server))
    if how == "closes its stream":
        with Client(server.url) as client:
            chunks = client.stream(LONG_TEXT, audio=reference, sample_rate=RATE, **LONG_OPTIONS)
            next(chunks)
            chunks.close()  # cancels the request on the server
    else:
        np.save(tmp_path / "ref.npy", reference)
        script = DYING_CLIENT.format(text=LONG_TEXT, rate=RATE, options=LONG_OPTIONS)
        client = subprocess.Popen([sys.executable, "-c", script, server.url, str(tmp_path / "ref.npy")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "first chunk"
        finally:
            client.kill()
            client.wait(10)
    deadline = time.monotonic() + 20
    while len(cancellations(server)) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(cancellations(server)) == before + 1, "the server did not notice the client leave"
    line = cancellations(server)[-1]
    patches = int(line.split("after ")[1].split(" patch")[0])
    assert patches < SENTENCES * PATCHES_EACH / 4, line  # stopped at its next patch, long before the end
    with Client(server.url) as client:
        audio, _ = stream_audio(client, "Hi.", audio=reference, sample_rate=RATE, **OPTIONS)
    assert audio.size == RATE


def test_loadtest_reports_latency_throughput_and_memory(server, reference, tmp_path):
    wav, out = tmp_path / "voice.wav", tmp_path / "load.json"
    sf.write(wav, reference, RATE)
    args = ["--url", server.url, "--ref", str(wav), "--streams", "2", "--requests", "4", "--duration", "60",
            "--max-seconds", "0.5", "--json", str(out)]
    result = CliRunner().invoke(loadtest_main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert json.loads(out.read_text()) == report
    assert report["requests"] == report["completed"] == 4 and report["errors"] == 0
    first, rtf = report["first_chunk_ms"], report["rtf"]
    assert 0 < first["p50"] <= first["p95"] <= first["max"] and 0 < rtf["p50"] <= rtf["p95"] <= rtf["max"]
    # 2 sentences of at most 0.5 s per request (the stop head may end one early)
    assert 0 < report["audio_seconds"] <= 4 * 2 * 0.5 + 1e-6 and report["audio_seconds_per_wall_second"] > 0
    assert report["server_pid"] == server.triton_pid
    assert report["server_rss_mib"]["before"] > 0 and report["server_rss_mib"]["after"] > 0
    assert "4/4" in result.stderr  # progress on stderr, never on stdout


def test_loadtest_only_targets_this_machine(tmp_path, reference):
    wav = tmp_path / "voice.wav"
    sf.write(wav, reference, RATE)
    result = CliRunner().invoke(loadtest_main, ["--url", "192.0.2.1:8001", "--ref", str(wav)])
    assert result.exit_code == 1 and "only targets this machine (loopback)" in result.stderr
    assert "Traceback" not in result.output


def test_write_repository_is_a_standard_triton_repository(bundle, tmp_path):
    target = tmp_path / "repo"
    result = CliRunner().invoke(serve_main, [str(bundle), "--write-repository", str(target), "--instances", "3"])
    assert result.exit_code == 0, result.output
    config = (target / "ditar" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "decoupled: true" in config and "count: 3 kind: KIND_CPU" in config
    assert '{ name: "text" data_type: TYPE_UINT8 dims: [ -1 ] }' in config
    transcript = '{ name: "reference_text" data_type: TYPE_UINT8 dims: [ -1 ] optional: true }'
    assert transcript in config and transcript in (target / "register_voice" / "config.pbtxt").read_text()
    assert 'key: "bundle" value { string_value: "ditar/bundle" }' in config  # relative: the folder travels
    assert "decoupled" not in (target / "register_voice" / "config.pbtxt").read_text()
    model_py = (target / "ditar" / "1" / "model.py").read_text()
    assert "from ditarkit.serve.triton_model import SpeechModel as TritonPythonModel" in model_py
    assert "sys.path" not in model_py  # the server's own ditarkit, as installed there
    assert (target / "ditar" / "bundle" / "manifest.json").read_bytes() == (bundle / "manifest.json").read_bytes()
    assert json.loads((target / MARKER).read_text())["models"]["ditar"]["instances"] == 3

    again = CliRunner().invoke(serve_main, [str(bundle), "--write-repository", str(target), "--link-bundle"])
    assert again.exit_code == 0, again.output  # an earlier repository is replaced whole
    assert not (target / "ditar" / "bundle").exists() and f'string_value: "{bundle.resolve()}"' in (
        target / "ditar" / "config.pbtxt").read_text()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    refused = CliRunner().invoke(serve_main, [str(bundle), "--write-repository", str(foreign)])
    assert refused.exit_code == 1 and "refusing to replace it" in refused.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_ditar_serve_refuses_bad_input_in_one_line(bundle, tmp_path):
    missing = CliRunner().invoke(serve_main, [str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "is not a ditarkit bundle" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(serve_main, [str(bundle), "--grpc-port", str(port), "--http-port", str(free_port())])
    assert busy.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    same = CliRunner().invoke(serve_main, [str(bundle), "--grpc-port", "9000", "--http-port", "9000"])
    assert same.exit_code == 2
    for result in (missing, busy, same):  # one line saying why (after click's usage, for a usage error)
        assert "Traceback" not in result.output and result.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_a_written_repository_serves_on_its_own(bundle, reference, tmp_path):
    """The copied repository, as it would go to a GPU box, served as it is. Triton's stub
    ignores PYTHONPATH, so this needs ditarkit.serve installed where an isolated Python sees it."""
    probe = subprocess.run([sys.executable, "-I", "-c", "import ditarkit.serve"], capture_output=True)
    if probe.returncode:
        pytest.skip("ditarkit.serve is not installed in this Python (pip install -e .): Triton's stub "
                    "starts an isolated interpreter, which ignores PYTHONPATH")
    target = tmp_path / "repo"
    assert CliRunner().invoke(serve_main, [str(bundle), "--write-repository", str(target)]).exit_code == 0
    running = RunningServer(["--repository", str(target)], tmp_path / "server.log")
    try:
        with Client(running.url) as client:
            voice = client.register_voice(reference, RATE)
            audio, _ = stream_audio(client, "Hi.", voice_id=voice.voice_id, **OPTIONS)
        assert audio.size == RATE
        assert list((target / "register_voice" / "voices").glob("*/*.npz"))  # kept inside the repository
    finally:
        assert running.stop() == 0


def test_serving_code_never_imports_torch():
    script = BLOCK_TORCH + textwrap.dedent("""
        import sys, types
        sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
        import ditarkit.serve.cli, ditarkit.serve.client, ditarkit.serve.loadtest, ditarkit.serve.triton_model
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 0, result.stderr


# -- a model that continues from its reference (VoxCPM v1) reads the reference's transcript ------

VOX_RATE, VOX_TEXT, VOX_TRANSCRIPTS = 16_000, "hello hello", ("hell", "hello")
VOX_HOP, VOX_PATCH = 640, 2  # 16 kHz / 640: a second of reference is 12.5 patches, as in the release
# The prompt holds 1.2 s of reference (at least 1 s is needed, and a transcript-reading model
# refuses a longer one rather than cutting it); 10 patches of speech; the tokens of text and transcript.
VOX_LIMITS = {"max_tokens": 12, "max_seconds": 10.5 * VOX_PATCH * VOX_HOP / VOX_RATE,
              "max_prompt_seconds": 18.5 * VOX_PATCH * VOX_HOP / VOX_RATE}
VOX_OPTIONS = {"seed": 5, "max_seconds": 0.4, "stop_threshold": NEVER_STOP}  # 5 patches a request


@pytest.fixture(scope="module")
def voxcpm_bundle(tmp_path_factory) -> Path:
    """A tiny random VoxCPM v1 checkpoint (tests/voxcpm_oracle.py) with the release's VAE hop,
    so that a reference of more than a second fits its prompt, exported without a parity run
    (test_voxcpm_runtime.py checks the export; here the server is checked against the runtime)."""
    if importlib.util.find_spec("voxcpm") is None:
        pytest.skip("building a VoxCPM checkpoint needs the voxcpm package (tests/oracle-requirements.txt)")
    from voxcpm_oracle import build_package_model, tiny_config, write_checkpoint

    from ditarkit.export.voxcpm.export import export_voxcpm

    config = tiny_config("voxcpm")
    config["max_length"] = 64  # LM positions for the limits above
    config["audio_vae_config"].update(encoder_rates=[2, 5, 8, 8], decoder_rates=[8, 8, 5, 2], decoder_dim=32)
    root = tmp_path_factory.mktemp("voxcpm")
    folder = write_checkpoint(root / "checkpoint", config, build_package_model(config, seed=3))
    manifest, _ = export_voxcpm(folder, root / "bundle", parity=False, **VOX_LIMITS)
    assert manifest.config.prompt.needs_reference_text and manifest.config.audio.hop_length == VOX_HOP
    return root / "bundle"


@pytest.fixture(scope="module")
def voxcpm_synth(voxcpm_bundle):
    with Synthesizer(voxcpm_bundle) as synth:
        yield synth


@pytest.fixture(scope="module")
def voxcpm_server(voxcpm_bundle, tmp_path_factory):
    running = RunningServer([str(voxcpm_bundle)], tmp_path_factory.mktemp("log") / "voxcpm.log")
    yield running
    assert running.stop() == 0, running.server_log()[-2000:]


@pytest.fixture(scope="module")
def voxcpm_reference() -> np.ndarray:
    return speech_like(1.2, VOX_RATE)


def test_a_model_that_continues_from_its_reference_is_served_with_its_transcript(
        voxcpm_server, voxcpm_synth, voxcpm_reference):
    ref = {"audio": voxcpm_reference, "sample_rate": VOX_RATE}
    with Client(voxcpm_server.url) as client:
        voices = [client.register_voice(voxcpm_reference, VOX_RATE, reference_text=t) for t in VOX_TRANSCRIPTS]
        assert voices[0].voice_id != voices[1].voice_id  # the same audio, another transcript: another voice
        assert client.register_voice(voxcpm_reference, VOX_RATE, VOX_TRANSCRIPTS[0]).voice_id == voices[0].voice_id
        by_id = [stream_audio(client, VOX_TEXT, voice_id=v.voice_id, **VOX_OPTIONS)[0] for v in voices]
        inline, _ = stream_audio(client, VOX_TEXT, **ref, reference_text=VOX_TRANSCRIPTS[0], **VOX_OPTIONS)
    options = voxcpm_synth.options(**VOX_OPTIONS)
    for transcript, audio in zip(VOX_TRANSCRIPTS, by_id, strict=True):
        voice = voxcpm_synth.voice(voxcpm_reference, VOX_RATE, text=transcript)
        expected = voxcpm_synth.synthesize(VOX_TEXT, voice, options)
        assert audio.shape == expected.shape == (5 * VOX_PATCH * VOX_HOP,)
        assert np.abs(audio - expected).max() <= STREAM_TOLERANCE
    assert np.abs(inline - by_id[0]).max() <= STREAM_TOLERANCE
    assert np.abs(by_id[0] - by_id[1]).max() > 0  # the transcript is read: it changes the speech


def test_a_model_that_continues_from_its_reference_refuses_one_without_transcript(
        voxcpm_server, voxcpm_synth, voxcpm_reference):
    reason = _runtime_message(lambda: voxcpm_synth.voice(voxcpm_reference, VOX_RATE))
    with Client(voxcpm_server.url) as client:
        refusals = []
        for call in (lambda: client.register_voice(voxcpm_reference, VOX_RATE),
                     lambda: client.register_voice(voxcpm_reference, VOX_RATE, reference_text="  "),
                     lambda: list(client.stream(VOX_TEXT, audio=voxcpm_reference, sample_rate=VOX_RATE,
                                                **VOX_OPTIONS))):
            with pytest.raises(RequestRefused) as refused:
                call()
            refusals.append(str(refused.value))
        audio, _ = stream_audio(client, VOX_TEXT, audio=voxcpm_reference, sample_rate=VOX_RATE,
                                reference_text=VOX_TRANSCRIPTS[0], **VOX_OPTIONS)  # the same stream goes on
    for message in refusals:
        assert message == f"reference_text: {reason}" and "\n" not in message, message
    assert audio.size == 5 * VOX_PATCH * VOX_HOP


def test_loadtest_passes_the_reference_transcript(voxcpm_server, voxcpm_reference, tmp_path):
    wav = tmp_path / "voice.wav"
    sf.write(wav, voxcpm_reference, VOX_RATE, subtype="FLOAT")
    args = ["--url", voxcpm_server.url, "--ref", str(wav), "--text", VOX_TEXT, "--streams", "1", "--requests", "2",
            "--max-seconds", "0.4", "--exact-length", "-q"]
    for register in ([], ["--inline-voice"]):
        result = CliRunner().invoke(loadtest_main, [*args, *register, "--ref-text", VOX_TRANSCRIPTS[0]])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["completed"] == 2 and report["errors"] == 0, report["error_messages"]
        assert report["plan"]["reference_text"] == VOX_TRANSCRIPTS[0]
    refused = CliRunner().invoke(loadtest_main, args)  # registering the voice fails, in one line
    assert refused.exit_code == 1 and "reference_text: this model continues from its reference" in refused.stderr
    assert "Traceback" not in refused.output
