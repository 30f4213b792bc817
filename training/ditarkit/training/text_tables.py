"""Starting a model that reads another text frontend from a trained one (characters ->
lexicon): the tables indexed by text ids are carried over row by row, by what each id means,
so the LM and LocDiT keep what they learnt and only the new units start fresh."""

from __future__ import annotations

import torch

from ditarkit.reference.model import DiTAR
from ditarkit.runtime.config import TextConfig

# Weights with one row per text id (the cursor's: one block of rows per window offset).
TEXT_TABLES = ("text_embedding.weight", "text_cursor.embedding.weight")


def unit_ids(text: TextConfig) -> dict[str, int]:
    """What each id of a text config's vocabulary means: special tokens by number, then the
    symbols (characters) and the phonemes, which never collide (upper- against lower-case)."""
    units = {f"<special {i}>": i for i in range(text.NUM_SPECIAL)}
    units.update({c: text.NUM_SPECIAL + i for i, c in enumerate(text.symbols)})
    units.update({p: text.NUM_SPECIAL + len(text.symbols) + i for i, p in enumerate(text.phonemes)})
    return units


def _carry(old: torch.Tensor, new: torch.Tensor, pairs: list[tuple[int, int]], blocks: int,
           old_vocab: int, new_vocab: int) -> torch.Tensor:
    """`new` with the rows of `pairs` (old id, new id) copied from `old` in every block; the
    other rows keep their directions at the copied rows' mean norm, so no unit starts quieter."""
    out = new.clone()
    old_rows = torch.tensor([o for o, _ in pairs])
    new_rows = torch.tensor([n for _, n in pairs])
    fresh = torch.ones(new_vocab, dtype=torch.bool)
    fresh[new_rows] = False
    for block in range(blocks):
        copied = old[block * old_vocab + old_rows]
        out[block * new_vocab + new_rows] = copied
        rows = out[block * new_vocab : (block + 1) * new_vocab]  # a view: scaled in place
        if fresh.any():
            norms = rows[fresh].norm(dim=-1, keepdim=True).clamp(min=1e-12)
            rows[fresh] = rows[fresh] / norms * copied.norm(dim=-1).mean()
    return out


def carry_text_tables(model: DiTAR, source: DiTAR) -> dict[str, torch.Tensor]:
    """The text tables of `model` (another frontend than `source`'s) with every row whose
    unit both read taken from `source`; refused in one line when they share no unit."""
    old_ids, new_ids = unit_ids(source.config.text), unit_ids(model.config.text)
    pairs = [(old_ids[u], new_ids[u]) for u in old_ids if u in new_ids]
    if len(pairs) <= source.config.text.NUM_SPECIAL:
        raise SystemExit("error: the two text frontends share no symbol: nothing to carry over")
    old_vocab, new_vocab = source.config.text.vocab_size, model.config.text.vocab_size
    ours, theirs = model.state_dict(), source.state_dict()
    return {name: _carry(theirs[name], ours[name], pairs, ours[name].shape[0] // new_vocab, old_vocab, new_vocab)
            for name in TEXT_TABLES if name in ours and name in theirs}
