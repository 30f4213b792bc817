"""VoxCPM's torch-free text frontend (ditarkit.runtime.tokenizer) against the `voxcpm` package's own.

The oracle is what the package runs: transformers 4.57's `LlamaTokenizerFast.from_pretrained(folder)`
wrapped by voxcpm's `mask_multichar_chinese_tokens`, on text prepared by the statements of
`VoxCPM._generate` (core.py) themselves. transformers 4.57 wants huggingface_hub<1.0 and
tokenizers<=0.23.0, which the venv does not have, so it lives in a folder of its own
(tests/tokenizer-oracle-requirements.txt says how to install it) and runs in a subprocess with
that folder first on PYTHONPATH; where it is not installed those tests skip and say so.

Without it, the package's wrapper still checks the CJK split and the id lookup, over a minimal
tokenizer object (`Fast4x`) that does what 4.57's source does with a tokenizer.json (read in
tokenization_utils_fast.py and models/llama/tokenization_llama_fast.py, and checked by the oracle
tests where it is installed).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from string import ascii_lowercase
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import BLOCK_TORCH
from voxcpm_oracle import tokenizer_json

from ditarkit.export.voxcpm.checkpoint import VoxCPMCheckpointError, import_voxcpm
from ditarkit.runtime.text import TextError
from ditarkit.runtime.tokenizer import TokenizerFrontend

tokenizers = pytest.importorskip("tokenizers", reason="the tokenizer frontend reads tokenizer.json with tokenizers")
# Importing voxcpm's model code (for its wrapper) runs torch.jit.script: known, and not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
ORACLE = Path(os.environ.get("DITARKIT_TOKENIZER_ORACLE", Path(sys.prefix) / "tokenizer-oracle"))
INSTALL_ORACLE = "pip install --no-deps --target .venv/tokenizer-oracle -r tests/tokenizer-oracle-requirements.txt"
VOXCPM = importlib.util.find_spec("voxcpm")
needs_voxcpm = pytest.mark.skipif(VOXCPM is None, reason="voxcpm==2.0.3 (the package oracle) is not installed")
needs_oracle = pytest.mark.skipif(
    VOXCPM is None or not (ORACLE / "transformers").is_dir(),
    reason=f"transformers 4.57 (the tokenizer oracle) is not installed in {ORACLE}: {INSTALL_ORACLE}",
)

TEXTS = [
    "hello", " hello", "hello ", "  hello   world  ", "hello\nworld", "hello\n\n \tworld\r\n!", "Hello, World!",
    "hello world 12 3.5", "1234567890", "....hello...", "don't stop - now: yes; no?",
    "你好", "你好世界", "hello你好world", "hello 你好", "hello你好世界", " 你好", "我们是中国人的",
    "你好，世界。", "好，", "世界和平", "我爱世界和平!", "こんにちは世界",
    "emoji 🙂 ok", "café", "x<s>y</s>z", "<|im_end|>hi", "\u3000全角\u3000space", "a\u00a0b",
    "tab\there", "\r\nline", "🙂", "!!!", "",
]
# (prompt_text, text): the package tokenises a continuation prompt's transcript and the text as one
# string, the transcript unprepared.
PROMPTS = [("hello  world\n", "你好"), (" 你好", "world"), ("", "hello"), ("世界", "和平 ok"), ("a\u3000", " b")]


# -- tokenizer.json files ---------------------------------------------------------------------------
def rich_tokenizer_json() -> dict[str, Any]:
    """A Llama-style tokenizer.json with what the synthetic one lacks: all 256 byte-fallback tokens
    (emoji, accents, kana become bytes), multi-character CJK tokens with and without "▁" (2, 3 and
    4 characters), a CJK token with punctuation, runs of "▁", digits and punctuation merges, and two
    added tokens beyond the model vocabulary: a CJK one whose characters are not in the vocabulary
    (split, they become <unk>) and a special one."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "▁" + ascii_lowercase + "HWT" + "0123456789" + ".,!?'-:;" + "你好世界我们是中国人的爱" + "，。":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "h"), ("e", "l"), ("l", "o"), ("▁h", "el"), ("▁hel", "lo"), ("▁", "w"), ("o", "r"),
              ("▁w", "or"), ("l", "d"), ("▁wor", "ld"), ("▁", "▁"), ("▁▁", "▁"), ("▁▁", "▁▁"), ("▁", "你"),
              ("▁你", "好"), ("你", "好"), ("世", "界"), ("你好", "世界"), ("我", "们"), ("中", "国"),
              ("中国", "人"), ("好", "，"), ("1", "2"), ("▁", "1"), (".", "."), ("..", "."), ("▁", "H"),
              ("▁H", "el"), ("'", "t"), ("▁", "W"), ("▁W", "or")]  # fmt: skip
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])]  # fmt: skip
    added += [
        {"id": len(vocab), "content": "世界和平", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": True, "special": False},
        {"id": len(vocab) + 1, "content": "<|im_end|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True},
    ]  # fmt: skip
    data = tokenizer_json()
    data["added_tokens"] = added
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return data


def _no_listed_specials(data: dict[str, Any]) -> dict[str, Any]:
    """<unk>, <s>, </s> in the vocabulary but not listed as added tokens: LlamaTokenizerFast adds them."""
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<unk>", "<s>", "</s>")]
    return data


def _absent_specials(data: dict[str, Any]) -> dict[str, Any]:
    """No <s> or </s> anywhere: LlamaTokenizerFast adds them with new ids (bos, then eos)."""
    data = _no_listed_specials(data)
    vocab = data["model"]["vocab"]
    for token in ("<s>", "</s>"):
        del vocab[token]
    data["model"]["vocab"] = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    shift = {t["id"]: len(data["model"]["vocab"]) + k for k, t in enumerate(data["added_tokens"])}
    for token in data["added_tokens"]:
        token["id"] = shift[token["id"]]
    return data


def _truncating(data: dict[str, Any]) -> dict[str, Any]:
    """Truncation to 3 and padding to 8 in the file: a transformers call without them turns both off."""
    data["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<unk>"}  # fmt: skip
    return data


def _metaspace(data: dict[str, Any]) -> dict[str, Any]:
    """The newer Llama layout: no normaliser, a Metaspace pre-tokeniser that prepends "▁" once."""
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    return data


TOKENIZERS: dict[str, Callable[[], dict[str, Any]]] = {
    "synthetic": tokenizer_json,  # the one tests/voxcpm_oracle.py writes into checkpoint folders
    "rich": rich_tokenizer_json,
    "rich-no-listed-specials": lambda: _no_listed_specials(rich_tokenizer_json()),
    "rich-absent-specials": lambda: _absent_specials(rich_tokenizer_json()),
    "rich-truncating": lambda: _truncating(rich_tokenizer_json()),
    "rich-metaspace": lambda: _metaspace(rich_tokenizer_json()),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint-style folder per tokenizer.json (from_pretrained reads a folder)."""
    root = tmp_path_factory.mktemp("tokenizers")
    made = {}
    for name, build in TOKENIZERS.items():
        (root / name).mkdir()
        (root / name / "tokenizer.json").write_text(json.dumps(build(), ensure_ascii=False), encoding="utf-8")
        made[name] = root / name
    return made


def frontend(folder: Path, **kwargs: Any) -> TokenizerFrontend:
    return TokenizerFrontend(folder / "tokenizer.json", kwargs.pop("max_tokens", 512), **kwargs)


def speakable(text: str) -> bool:
    return any(c.isalnum() for c in text)


# -- the package's text preparation, from its source --------------------------------------------------
@functools.cache
def package_prepare() -> Callable[[str], str]:
    """The `text = ...` statements at the top level of `VoxCPM._generate` (voxcpm/core.py), run as
    they are written: what the package does to its target text before tokenising it."""
    source = Path(VOXCPM.submodule_search_locations[0], "core.py").read_text(encoding="utf-8")
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "VoxCPM")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_generate")
    steps = [s for s in method.body if isinstance(s, ast.Assign) and [ast.unparse(t) for t in s.targets] == ["text"]]
    assert [ast.unparse(s) for s in steps] == ["text = text.replace('\\n', ' ')", "text = re.sub('\\\\s+', ' ', text)"]
    function = ast.parse("def prepare(text):\n    return text")
    function.body[0].body[:0] = steps
    namespace: dict[str, Any] = {"re": re}
    exec(compile(function, "voxcpm/core.py", "exec"), namespace)
    return namespace["prepare"]


# -- the oracle: transformers 4.57 + voxcpm's wrapper, in a subprocess ------------------------------
_ORACLE_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path
    import transformers
    from transformers import LlamaTokenizerFast
    # voxcpm/model/utils.py alone: the package's __init__ imports torchaudio, which is not needed here.
    path = Path(importlib.util.find_spec("voxcpm").submodule_search_locations[0]) / "model" / "utils.py"
    spec = importlib.util.spec_from_file_location("voxcpm_model_utils", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    request = json.load(sys.stdin)
    out = {"transformers": transformers.__version__, "results": {}}
    for name, folder in request["folders"].items():
        base = LlamaTokenizerFast.from_pretrained(folder)
        assert type(base).__name__ == "LlamaTokenizerFast", type(base)
        wrapped = utils.mask_multichar_chinese_tokens(base)
        out["results"][name] = {text: [wrapped.tokenize(text), wrapped(text)] for text in request["texts"]}
    print("ORACLE" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def oracle(folders: dict[str, Path]) -> dict[str, Any]:
    """{"transformers": version, "results": {tokenizer: {text: [tokens, ids]}}} for every text the
    package would tokenise: the prepared TEXTS, and each prompt's transcript + prepared text."""
    prepare = package_prepare()
    texts = sorted({prepare(t) for t in TEXTS} | {p + prepare(t) for p, t in PROMPTS})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ORACLE), os.environ.get("PYTHONPATH")])),
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    request = json.dumps({"folders": {k: str(v) for k, v in folders.items()}, "texts": texts})
    result = subprocess.run([sys.executable, "-c", _ORACLE_SCRIPT], input=request, capture_output=True, text=True,
                            env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("ORACLE"))
    return json.loads(line.removeprefix("ORACLE"))


@needs_oracle
def test_the_oracle_is_transformers_4_llama_tokenizer_fast(oracle: dict[str, Any]) -> None:
    assert oracle["transformers"].startswith("4.57."), oracle["transformers"]
    assert set(oracle["results"]) == set(TOKENIZERS)


@needs_oracle
@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokens_and_ids_are_the_packages(name: str, folders: dict[str, Path], oracle: dict[str, Any]) -> None:
    prepare, expected = package_prepare(), oracle["results"][name]
    ours = frontend(folders[name])
    for text in TEXTS:
        tokens, ids = expected[prepare(text)]
        assert ours.tokens(text) == tokens, (name, text)
        if speakable(text):
            assert ours.encode(text) == ids, (name, text)
    for prompt_text, text in PROMPTS:
        tokens, ids = expected[prompt_text + prepare(text)]
        assert ours.tokens(text, prompt_text=prompt_text) == tokens, (name, prompt_text, text)
        assert ours.encode(text, prompt_text=prompt_text) == ids, (name, prompt_text, text)


@needs_oracle
def test_the_oracle_covers_what_it_is_meant_to(folders: dict[str, Path], oracle: dict[str, Any]) -> None:
    """The richer files exercise each behaviour (else the comparisons above prove less than they say)."""
    rich, prepare = oracle["results"]["rich"], package_prepare()
    backend = tokenizers.Tokenizer.from_file(str(folders["rich"] / "tokenizer.json"))
    unsplit = {t: backend.encode(prepare(t), add_special_tokens=False).tokens for t in TEXTS}
    assert "▁你好" in unsplit["hello 你好"] and rich[prepare("hello 你好")][0] == ["▁hello", "你", "好"]  # "▁" lost
    assert "你好世界" in unsplit["hello你好世界"] and rich[prepare("hello你好世界")][0] == ["▁hello", *"你好世界"]
    assert "中国人" in unsplit["我们是中国人的"]
    assert rich[prepare("好，")][0] == ["▁", "好，"]  # CJK with punctuation: kept whole
    assert rich[prepare("emoji 🙂 ok")][0].count("<0xF0>") == 1  # byte fallback
    unk = rich_tokenizer_json()["model"]["vocab"]["<unk>"]
    assert rich[prepare("世界和平")][1].count(unk) == 2  # an added CJK token's characters, not in the vocabulary
    unlisted = oracle["results"]["rich-no-listed-specials"][prepare("x<s>y</s>z")][0]
    assert "<s>" in unlisted and "</s>" in unlisted  # added by LlamaTokenizerFast, matched whole
    absent = oracle["results"]["rich-absent-specials"][prepare("x<s>y</s>z")][1]
    vocab = json.loads((folders["rich-absent-specials"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert max(absent) == len(vocab["model"]["vocab"]) + len(vocab["added_tokens"]) + 1  # <s>, </s> appended
    assert len(oracle["results"]["rich-truncating"][prepare("hello world 12 3.5")][1]) > 3


# -- without the oracle: the package's wrapper over a 4.x-like tokenizer -----------------------------
class Fast4x:
    """What voxcpm uses of transformers 4.57's LlamaTokenizerFast.from_pretrained(folder), over
    `tokenizers`, as its source reads: the backend is Tokenizer.from_file(tokenizer.json) (no
    from_slow: add_prefix_space is None); `<s>`, `</s>`, `<unk>` are added as special AddedTokens
    where the file does not list them; `vocab` is get_vocab(with_added_tokens=True); `tokenize` is
    encode(text, add_special_tokens=False).tokens with truncation and padding off;
    `convert_tokens_to_ids` is token_to_id, else the <unk> id."""

    def __init__(self, path: Path) -> None:
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        listed = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        missing = [t for t in ("<s>", "</s>", "<unk>") if t not in listed]
        if missing:
            self._tokenizer.add_tokens([tokenizers.AddedToken(t, special=True) for t in missing])
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        unk = self._tokenizer.token_to_id("<unk>")
        return [unk if (i := self._tokenizer.token_to_id(t)) is None else i for t in tokens]


@pytest.fixture(scope="module")
def mask_multichar_chinese_tokens() -> Callable[[Any], Any]:
    """The package's wrapper, imported through the loader's placeholders for transformers and torchaudio."""
    if VOXCPM is None:
        pytest.skip("voxcpm==2.0.3 (the package oracle) is not installed")
    with contextlib.suppress(VoxCPMCheckpointError):
        import_voxcpm("voxcpm")
    return sys.modules["voxcpm.model.utils"].mask_multichar_chinese_tokens


@needs_voxcpm
@pytest.mark.parametrize("name", TOKENIZERS)
def test_cjk_split_and_ids_are_the_package_wrappers(name: str, folders: dict[str, Path],
                                                    mask_multichar_chinese_tokens: Callable[[Any], Any]) -> None:
    wrapped = mask_multichar_chinese_tokens(Fast4x(folders[name] / "tokenizer.json"))
    prepare, ours = package_prepare(), frontend(folders[name])
    for text in TEXTS:
        assert ours.tokens(text) == wrapped.tokenize(prepare(text)), (name, text)
        if speakable(text):
            assert ours.encode(text) == wrapped(prepare(text)), (name, text)
    for prompt_text, text in PROMPTS:
        assert ours.encode(text, prompt_text=prompt_text) == wrapped(prompt_text + prepare(text)), (name, text)


@needs_voxcpm
def test_readable_is_the_packages_text_preparation(folders: dict[str, Path]) -> None:
    prepare, ours = package_prepare(), frontend(folders["synthetic"])
    for text in TEXTS:
        assert ours.readable(text) == prepare(text), text


def test_encode_adds_no_special_or_marker_ids(folders: dict[str, Path]) -> None:
    ours = frontend(folders["synthetic"], vocab_size=128)
    assert ours.encode("hello") == [15]  # "▁hello": no BOS (1), EOS (2) or audio start (101)
    assert ours.encode("hello 你好") == [15, 4, 9, 10]  # "你好" (16) split into "你" (9), "好" (10)
    assert ours.encode("你好", prompt_text="hello ") == ours.encode("hello 你好")


def test_sha256_is_the_files(folders: dict[str, Path]) -> None:
    path = folders["rich"] / "tokenizer.json"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert TokenizerFrontend(path, 64).sha256 == digest
    spec = SimpleNamespace(tokenizer_file="tokenizer.json", tokenizer_sha256=digest.upper(), max_tokens=8,
                           vocab_size=1000)  # fmt: skip
    built = TokenizerFrontend.from_spec(spec, folders["rich"])
    assert (built.max_tokens, built.vocab_size, built.sha256) == (8, 1000, digest)


def _write(tmp_path: Path, content: bytes | str) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


_BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda d: d / "absent.json", "cannot read the tokenizer"),
    "a folder": (lambda d: d, "cannot read the tokenizer"),
    "empty": (lambda d: _write(d, ""), "not a tokenizer.json"),
    "not UTF-8": (lambda d: _write(d, b"\xff\xfe{"), "not a tokenizer.json"),
    "not JSON": (lambda d: _write(d, "{tokenizer"), "not a tokenizer.json"),
    "a JSON list": (lambda d: _write(d, "[1, 2]"), "expected a JSON object"),
    "no model": (lambda d: _write(d, "{}"), "not a tokenizer.json"),
    "a broken model": (lambda d: _write(d, json.dumps(dict(tokenizer_json(), model={"type": "BPE", "vocab": 3}))),
                       "not a tokenizer.json"),
    "truncated": (lambda d: _write(d, json.dumps(tokenizer_json())[:200]), "not a tokenizer.json"),
}  # fmt: skip


def _one_line_error(call: Callable[[], Any], message: str) -> None:
    with pytest.raises(TextError) as caught:
        call()
    assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize("case", _BAD_FILES)
def test_a_bad_tokenizer_file_is_one_line(case: str, tmp_path: Path) -> None:
    make, message = _BAD_FILES[case]
    _one_line_error(lambda: TokenizerFrontend(make(tmp_path), 64), message)


def test_bad_text_and_limits_are_one_line(folders: dict[str, Path], tmp_path: Path) -> None:
    path = folders["rich"] / "tokenizer.json"
    ours = TokenizerFrontend(path, 6, vocab_size=1000)
    for text in ("", "   ", "\n\t\r\n"):
        _one_line_error(lambda: ours.encode(text), "empty text")  # noqa: B023
    for text in ("!!!", "🙂 🙂", "，。"):
        _one_line_error(lambda: ours.encode(text), "no speakable characters")  # noqa: B023
    _one_line_error(lambda: ours.encode("hello " * 7), "tokens, over the model's 6; split it")
    _one_line_error(lambda: ours.encode(None), "text must be a string")  # type: ignore[arg-type]
    _one_line_error(lambda: ours.encode("hi", prompt_text=3), "prompt_text must be a string")  # type: ignore[arg-type]
    small = TokenizerFrontend(path, 64, vocab_size=100)
    _one_line_error(lambda: small.encode("hello\nworld"), "outside the model's vocabulary of 100")
    no_unk = TokenizerFrontend(path, 64, unk_token=None)
    _one_line_error(lambda: no_unk.encode("世界和平"), "is not in tokenizer.json and it has no unknown token")
    _one_line_error(lambda: TokenizerFrontend(path, 64, sha256="0" * 64), "checksum")
    _one_line_error(lambda: TokenizerFrontend(path, 0), "max_tokens must be >= 1")
    _one_line_error(lambda: TokenizerFrontend(path, 8, vocab_size=0), "vocab_size must be >= 1")


def test_the_frontend_runs_without_torch_or_transformers(folders: dict[str, Path]) -> None:
    script = BLOCK_TORCH + textwrap.dedent(f"""
        class NoTransformers:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("transformers is blocked in this test")
        sys.meta_path.insert(0, NoTransformers())
        from ditarkit.runtime.tokenizer import TokenizerFrontend
        ids = TokenizerFrontend({str(folders["synthetic"] / "tokenizer.json")!r}, 64, 128).encode("hello 你好")
        assert ids == [15, 4, 9, 10], ids
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        print("ran without torch")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ran without torch" in result.stdout
