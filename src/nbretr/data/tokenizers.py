"""Tokenisers with one call signature: ``tok(texts, max_words) -> (ids, mask)``, both
LongTensor ``[B, max_words]``: start token, tokens (truncated to ``max_words - 2``), end
token, then padding 0 (mask 1 on real tokens), as the reference builds CLIP inputs.

- :class:`WordTokenizer`: word-level vocabulary built from captions, for the tiny model
  trained on the embedded dataset.
- :func:`load_clip_tokenizer`: the tokenizer of a real CLIP checkpoint — the one shipped in a
  local Hugging Face CLIP folder, or, for OpenAI ``.pt`` archives (which carry none), one
  built in memory from CLIP's BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` (a path you
  give, one next to the checkpoint, ``$NBRETR_CLIP_BPE``, or open_clip's copy when that
  package is installed). Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import torch

_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def _pack(seqs: Sequence[Sequence[int]], max_words: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    if max_words < 2:
        raise ValueError(f"max_words must be >= 2 (start and end tokens), got {max_words}")
    ids = torch.zeros(len(seqs), max_words, dtype=torch.long)
    mask = torch.zeros(len(seqs), max_words, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = [start] + list(s)[: max_words - 2] + [end]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class WordTokenizer:
    """Lower-cased word-level tokenizer. Ids: 0 ``<pad>``, 1 ``<start>``, 2 ``<end>``,
    3 ``<unk>``, then words by decreasing frequency (ties alphabetical)."""

    SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")

    def __init__(self, vocab: Sequence[str]):
        if list(vocab[: len(self.SPECIALS)]) != list(self.SPECIALS):
            raise ValueError(f"vocab must start with {self.SPECIALS}")
        self.itos = list(vocab)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.start_id, self.end_id, self.unk_id = 0, 1, 2, 3

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD_RE.findall(text.lower())

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 1) -> "WordTokenizer":
        counts = Counter(w for c in captions for w in cls.split(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(cls.SPECIALS) + words)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in self.split(text)]

    def __call__(self, texts: str | Sequence[str], max_words: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        return _pack([self.encode(t) for t in texts], max_words, self.start_id, self.end_id)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"type": "word", "vocab": self.itos}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        return cls(data["vocab"])


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer_from_bpe(bpe_path: str | os.PathLike):
    """A transformers CLIP tokenizer built in memory from CLIP's BPE merges file (the
    ``.txt.gz`` OpenAI ships; plain text accepted), with the same vocabulary order as
    OpenAI's ``SimpleTokenizer``: 256 byte symbols, their ``</w>`` forms, one entry per merge,
    then ``<|startoftext|>``, ``<|endoftext|>``."""
    from transformers import CLIPTokenizerFast

    p = Path(bpe_path)
    raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
    lines = raw.decode("utf-8").split("\n")
    merges = [ln for ln in lines[1: 49152 - 256 - 2 + 1] if ln.strip()]
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizerFast(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)


class ClipTokenizer:
    """Wraps a transformers CLIP tokenizer with the ``(texts, max_words) -> (ids, mask)``
    call; ``.hf`` is the wrapped tokenizer."""

    def __init__(self, hf_tokenizer):
        # captions are tokenised once in the main process, before DataLoader workers fork:
        # keep the Rust tokenizer from warning about (and disabling) its thread pool then
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.hf = hf_tokenizer
        self.start_id = int(hf_tokenizer.convert_tokens_to_ids("<|startoftext|>"))
        self.end_id = int(hf_tokenizer.convert_tokens_to_ids("<|endoftext|>"))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def __call__(self, texts: str | Sequence[str], max_words: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.hf(list(texts), add_special_tokens=False, truncation=True,
                      max_length=max(max_words - 2, 1))["input_ids"]
        return _pack(enc, max_words, self.start_id, self.end_id)

    def save(self, path: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(path))


def _find_bpe(near: Path | None) -> Path | None:
    cands = []
    if os.environ.get("NBRETR_CLIP_BPE"):
        cands.append(Path(os.environ["NBRETR_CLIP_BPE"]))
    if near is not None:
        cands.append(near / BPE_NAME)
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin:
        cands.append(Path(spec.origin).parent / BPE_NAME)
    return next((c for c in cands if c.is_file()), None)


def load_clip_tokenizer(path: str | os.PathLike | None = None) -> ClipTokenizer:
    """The tokenizer for a real CLIP checkpoint.

    ``path`` may be a local Hugging Face CLIP folder (its own tokenizer files, loaded with
    ``local_files_only=True``), a BPE merges file (``bpe_simple_vocab_16e6.txt.gz``), an OpenAI
    ``.pt`` archive (then the BPE file is looked for next to it), or None (then
    ``$NBRETR_CLIP_BPE`` or open_clip's copy). Raises FileNotFoundError saying what to pass.
    """
    p = Path(path) if path is not None else None
    if p is not None and p.is_dir():
        if any((p / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            from transformers import CLIPTokenizerFast
            return ClipTokenizer(CLIPTokenizerFast.from_pretrained(str(p), local_files_only=True))
        bpe = _find_bpe(p)
    elif p is not None and p.is_file() and (p.name.endswith(".txt.gz") or p.name.endswith(".txt")):
        bpe = p
    elif p is not None and not p.exists():
        raise FileNotFoundError(f"CLIP tokenizer: {p} does not exist")
    else:
        bpe = _find_bpe(p.parent if p is not None else None)
    if bpe is None:
        raise FileNotFoundError(
            f"CLIP tokenizer: no tokenizer files for {path!s}. OpenAI .pt checkpoints carry no "
            f"tokenizer: pass the path of CLIP's BPE vocabulary ({BPE_NAME}), put it next to the "
            "checkpoint, set NBRETR_CLIP_BPE, or use a Hugging Face CLIP folder.")
    return ClipTokenizer(clip_tokenizer_from_bpe(bpe))
