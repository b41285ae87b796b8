"""Generate a small CLIP-format BPE tokenizer (vocab.json + merges.txt) offline.

The real CLIP vocabulary cannot be downloaded here, so the built-in models use a tokenizer
trained by this module on a small English corpus (the prompt templates plus common words).
It has the same file format, pre-tokenisation and special tokens as CLIP's, so CLIPTokenizer,
diffusers and optimum-intel load it like the real one. `python -m
amxtune_trainer.builtin.tokenizer` regenerates the shipped files in tiny_tokenizer/.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent / "tiny_tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Words the tests, the demo and the prompt templates use, so that they are single tokens.
CORPUS = """
a photo of the a rendering of a cropped photo of the the photo of a photo of a clean a photo
of a dirty a dark photo of the a photo of my a photo of the cool a close-up photo of a a bright
photo of the a cropped photo of a a photo of the a good photo of the a photo of one a close-up
photo of the a rendition of the a photo of the clean a rendition of a a photo of a nice a good
photo of a a photo of the nice a photo of the small a photo of the weird a photo of the large a
photo of a cool a photo of a small a painting in the style of a rendering in the style of a
cropped painting in the style of the painting in the style of a clean painting in the style of
a dirty painting in the style of a dark painting in the style of a picture in the style of a
cool painting in the style of a close-up painting in the style of a bright painting in the
style of a good painting in the style of a small painting in the style of a weird painting in
the style of a large painting in the style of
toy robot cat dog yellow red blue green white black beach city forest sky sun moon house car
tree flower mountain river high quality detailed art sculpture drawing portrait landscape on
in at with and by for from to is are sitting standing running man woman child bird fish boat
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _word_symbols(word: str, table: dict[int, str]) -> tuple[str, ...]:
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return tuple(symbols)


def train_bpe(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: first seen)."""
    table = bytes_to_unicode()
    counts = Counter(_word_symbols(w.lower(), table) for w in words if re.fullmatch(r"[a-z-]+", w))
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in counts.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: item[1])[0]
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, n in counts.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += n
        counts = merged
    return merges


def write_tokenizer(folder: Path, vocab_size: int | None = None, num_merges: int = 600,
                    corpus: list[str] | None = None) -> Path:
    """Write a CLIP-format tokenizer folder; `vocab_size` pads with unused entries (SD size).
    `corpus`: the words to learn merges from (default CORPUS)."""
    table = bytes_to_unicode()
    merges = train_bpe(CORPUS if corpus is None else corpus, num_merges)
    tokens = list(table.values()) + [c + "</w>" for c in table.values()]
    tokens += ["".join(pair) for pair in merges]
    tokens = list(dict.fromkeys(tokens))  # a merge can recreate an existing symbol
    if vocab_size is not None:
        if vocab_size < len(tokens) + 2:
            raise ValueError(f"vocab_size must be at least {len(tokens) + 2}")
        tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens) - 2)]
    tokens += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS},
                   indent=2) + "\n"
    )
    return folder


if __name__ == "__main__":
    print(write_tokenizer(SHIPPED_DIR))
