"""Derive the CLIP tokenizer files (vocab.json, merges.txt) from open-clip-torch's BPE file.

The BPE merge list `bpe_simple_vocab_16e6.txt.gz` ships inside the open-clip-torch wheel (MIT,
see LICENSE-open_clip beside this file). CLIP's vocabulary is the 256 byte symbols, the same
with an end-of-word mark, one entry per merge, then the two special tokens: 49,408 in all.
Run it once when the vocabulary must be rebuilt: `python -m prompts.clip_tokenizer.derive GZ_FILE`.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
VOCAB_SIZE = 49408
# CLIP uses the first 49152 - 256 - 2 merges of the file (its line 0 is a version header).
MERGE_COUNT = VOCAB_SIZE - 256 - 256 - 2


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable-character table, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def derive(gz_file: Path, out_dir: Path = HERE) -> None:
    """Write vocab.json and merges.txt for `transformers.CLIPTokenizer` into `out_dir`."""
    lines = gzip.open(gz_file, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    derive(Path(sys.argv[1]))
