"""VoxCPM's text frontend without torch or transformers: a Llama-style tokenizer.json -> the ids
the `voxcpm` package (2.0.3) puts in its text sequence.

The package tokenises with transformers 4.x `LlamaTokenizerFast.from_pretrained(folder)`, wrapped
by its `mask_multichar_chinese_tokens` (voxcpm/model/utils.py), and calls the wrapper's
`tokenize()` then `convert_tokens_to_ids()`. What that does over a `tokenizers.Tokenizer`, read
from transformers 4.57's source (tokenization_utils_fast.py, models/llama/tokenization_llama_fast.py)
and checked against it by tests/test_tokenizer.py:

* the backend is `Tokenizer.from_file(tokenizer.json)` as it stands: `tokenizer_file` given and
  no `add_prefix_space`, so no `from_slow` conversion and `legacy` changes nothing; the
  normaliser, pre-tokeniser and model are the file's (transformers 5.x rewrites legacy Llama
  normalisers, so leading spaces tokenise differently there: this matches 4.x);
* LlamaTokenizerFast's special tokens (bos `<s>`, eos `</s>`, unk `<unk>`, in that order) that
  the file does not already list as added tokens are added (`AddedToken(t, special=True)`: not
  normalised, so matched in the raw text; a token not in the vocabulary gets the next id);
* `tokenize(text)` is `encode(text, add_special_tokens=False).tokens`: no BOS/EOS (the template
  post-processor adds them only with special tokens), no truncation or padding (both switched
  off for a call without them, whatever tokenizer.json says), special tokens in the text kept
  whole (`split_special_tokens=False`);
* `convert_tokens_to_ids` looks each token string up again (`token_to_id`), the unknown-token id
  where it is absent.

The wrapper then replaces each token that, with every "▁" dropped, is a vocabulary entry of two
or more characters all in U+4E00..U+9FFF by its single characters (the "▁" lost), and the
package's `VoxCPM.generate` first maps newlines to spaces and collapses whitespace runs to one
space (core.py; no strip, its optional wetext normaliser off by default).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ditarkit.runtime.text import TextError

SPIECE_UNDERLINE = "\u2581"  # "▁": SentencePiece's space
CJK_FIRST, CJK_LAST = "\u4e00", "\u9fff"  # the wrapper's "Chinese character" range
_WHITESPACE = re.compile(r"\s+")
_SHOWN = 40  # characters of an offending text quoted in an error


def collapse_whitespace(text: str) -> str:
    """What `VoxCPM.generate` does to its target text before tokenising it (core.py)."""
    return _WHITESPACE.sub(" ", text.replace("\n", " "))


def _is_multichar_chinese(token: str) -> bool:
    return len(token) >= 2 and all(CJK_FIRST <= c <= CJK_LAST for c in token)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class TokenizerFrontend:
    """Maps text to the token ids VoxCPM's package would give it, from the bundle's tokenizer.json.

    `encode` returns the text's ids alone: unlike `TextFrontend.encode` (which wraps the DiTAR
    family's symbols in BOS/EOS) it adds no special ids, none of VoxCPM's markers (audio start 101,
    reference audio start/end 103/104, no BOS): the caller lays out the prompt. The package
    tokenises a continuation prompt's transcript and the target text as one string
    (`prompt_text + target_text`); pass the transcript as `prompt_text` to get those ids.

    Config once (the file, the model's limits), object once, `encode` per call; errors are one-line
    `TextError`s.
    """

    def __init__(self, path: str | Path, max_tokens: int, vocab_size: int | None = None, *,
                 sha256: str | None = None, unk_token: str | None = "<unk>", bos_token: str | None = "<s>",
                 eos_token: str | None = "</s>") -> None:
        """`path`: the tokenizer.json; `max_tokens`: the most ids one `encode` may return;
        `vocab_size`: the model's embedding rows (every id must be below it; None: unchecked);
        `sha256`: the file's expected checksum (the bundle's), checked where given;
        `unk_token`, `bos_token`, `eos_token`: LlamaTokenizerFast's defaults (a tokenizer_config.json
        beside the file may name others; the bundle carries tokenizer.json alone)."""
        try:
            from tokenizers import AddedToken, Tokenizer
        except ImportError:
            raise TextError("the tokenizer frontend needs the tokenizers package (pip install tokenizers)") from None
        if max_tokens < 1:
            raise TextError(f"max_tokens must be >= 1, got {max_tokens}")
        if vocab_size is not None and vocab_size < 1:
            raise TextError(f"vocab_size must be >= 1, got {vocab_size}")
        self.path = Path(path)
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise TextError(f"{self.path}: cannot read the tokenizer ({err.strerror or _one_line(err)})") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        if sha256 is not None and sha256.lower() != self.sha256:
            raise TextError(f"{self.path}: checksum {self.sha256[:12]}... is not the bundle's {sha256[:12]}...; "
                            "the file was changed or replaced")
        try:
            text = data.decode("utf-8")
            if not isinstance(json.loads(text), dict):
                raise ValueError("expected a JSON object")
            tokenizer = Tokenizer.from_str(text)
        except Exception as err:  # UnicodeDecodeError, JSONDecodeError; tokenizers raises plain Exception
            raise TextError(f"{self.path}: not a tokenizer.json ({_one_line(err)})") from None
        # As LlamaTokenizerFast.__init__: its special tokens the file does not list are added.
        listed = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        special = [t for t in (bos_token, eos_token, unk_token) if t is not None]  # transformers' order
        missing = [t for t in dict.fromkeys(special) if t not in listed]
        if missing:
            tokenizer.add_tokens([AddedToken(t, special=True) for t in missing])
        tokenizer.no_truncation()  # as a transformers call without truncation or padding
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = False
        self._tokenizer = tokenizer
        self._unk_id = tokenizer.token_to_id(unk_token) if unk_token is not None else None
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._multichar = frozenset(t for t in vocab if _is_multichar_chinese(t))

    @classmethod
    def from_spec(cls, spec: Any, folder: str | Path) -> TokenizerFrontend:
        """From a bundle's text spec (`tokenizer_file`, `tokenizer_sha256`, `max_tokens`,
        `vocab_size`) and the bundle's folder."""
        return cls(Path(folder) / spec.tokenizer_file, spec.max_tokens, spec.vocab_size,
                   sha256=spec.tokenizer_sha256 or None)

    def readable(self, text: str) -> str:
        """What the tokenizer reads: the text with newlines and whitespace runs made one space, as
        `VoxCPM.generate` prepares its target text (no lower-casing, spelling-out or strip)."""
        if not isinstance(text, str):
            raise TextError(f"text must be a string, got {type(text).__name__}")
        return collapse_whitespace(text)

    def sentences(self, text: str) -> list[str]:
        """The pieces one generation each speaks: the whole text, as the package generates it
        (its ids must fit `max_tokens`; `encode` says so where they do not)."""
        return [self.readable(text)]

    def tokens(self, text: str, *, prompt_text: str = "") -> list[str]:
        """The package wrapper's `tokenize(prompt_text + readable(text))`: for logs and tests."""
        if not isinstance(prompt_text, str):
            raise TextError(f"prompt_text must be a string, got {type(prompt_text).__name__}")
        pieces: list[str] = []
        for token in self._tokenizer.encode(prompt_text + self.readable(text), add_special_tokens=False).tokens:
            clean = token.replace(SPIECE_UNDERLINE, "")
            if clean in self._multichar:
                pieces.extend(clean)
            else:
                pieces.append(token)
        return pieces

    def encode(self, text: str, *, prompt_text: str = "") -> list[int]:
        """The ids of `text` (after `readable`), preceded by those of a continuation prompt's
        transcript, which the package joins to the text unprepared and tokenises with it. No
        special or marker ids are added."""
        clean = self.readable(text)
        if not clean.strip():
            raise TextError("empty text: nothing to say")
        if not any(c.isalnum() for c in clean):
            raise TextError(f"no speakable characters in text {text[:_SHOWN]!r}")
        ids = []
        for token in self.tokens(clean, prompt_text=prompt_text):
            index = self._tokenizer.token_to_id(token)
            if index is None:
                index = self._unk_id
            if index is None:
                raise TextError(f"token {token!r} of text {text[:_SHOWN]!r} is not in {self.path.name} "
                                "and it has no unknown token")
            if self.vocab_size is not None and index >= self.vocab_size:
                raise TextError(f"token {token!r} of text {text[:_SHOWN]!r} has id {index}, outside the model's "
                                f"vocabulary of {self.vocab_size}")
            ids.append(index)
        if len(ids) > self.max_tokens:
            raise TextError(f"text is {len(ids)} tokens, over the model's {self.max_tokens}; split it into sentences")
        return ids
