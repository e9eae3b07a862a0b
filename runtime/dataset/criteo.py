"""A streaming reader of Criteo click logs (the Kaggle and Terabyte text files) as a MindData source.

Format (plain or .gz): one example per line, tab-separated: label (0/1), 13 integer fields (I1..I13), 26
categorical fields (C1..C26, 32-bit hashes as hex strings); an empty field is missing.

Preprocessing (MindSpore's Wide&Deep model zoo): every row becomes 39 (id, value) pairs --

* integer field j: id ``j`` (one id per field), value ``log(1 + max(x, 0))`` (0 when missing);
* categorical field f: id ``offset_f + local``, value 1, where ``local`` comes from either a
  per-field vocabulary of the values seen at least ``min_count`` times in the training files
  (``CriteoVocab.build``; rarer or unseen values and missing ones share the field's id 0, like
  the zoo's threshold), or hashing into ``buckets_per_field`` buckets (``CriteoVocab.hashed``:
  no pass over the data, a fixed vocabulary size).

``criteo_dataset(paths, vocab, batch_size)`` is a ``GeneratorDataset`` (one reading thread that
splits and checks lines, ``batch_size`` rows per item) followed by a parallel ``map`` that turns a
block of raw fields into the model's batch ``(data, label)``: ``data`` the packed (B, 2, 39) int32
input of ``runtime.models.wide_deep`` and ``label`` (B, 1) float32.

Bad lines -- a wrong number of fields, a label other than 0/1, a non-integer count, a categorical
value that is not hex -- raise ``CriteoFormatError`` naming the file and line; with
``skip_bad_lines=True`` they are counted and skipped instead, and the count (with the first few
places) is reported by ``reader.bad_lines`` and a warning at the end of every pass. Nothing is dropped
silently.
"""
from __future__ import annotations

import gzip
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.dataset.ops import GeneratorDataset

NUM_DENSE, NUM_CAT = 13, 26
NUM_FIELDS = NUM_DENSE + NUM_CAT
_HEX = frozenset("0123456789abcdefABCDEF")


class CriteoFormatError(ValueError):
    """A line of a Criteo file does not follow the format (the message names file and line)."""


def _parse_line(line: str, where):
    """(label, dense list (None = missing), cat list of int (-1 = missing)) or raise CriteoFormatError."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != 1 + NUM_FIELDS:
        raise CriteoFormatError(f"{where()}: expected {1 + NUM_FIELDS} tab-separated fields (label, 13 integers, "
                                f"26 hex ids), got {len(parts)}")
    lab = parts[0]
    if lab not in ("0", "1"):
        raise CriteoFormatError(f"{where()}: the label must be 0 or 1, got {lab!r}")
    dense = []
    for j in range(NUM_DENSE):
        v = parts[1 + j]
        if v == "":
            dense.append(None)
            continue
        try:
            dense.append(int(v))
        except ValueError:
            raise CriteoFormatError(f"{where()}: integer field I{j + 1} is {v!r}, not an integer") from None
    cat = []
    for f in range(NUM_CAT):
        v = parts[1 + NUM_DENSE + f]
        if v == "":
            cat.append(-1)
            continue
        if len(v) > 16 or not _HEX.issuperset(v):
            raise CriteoFormatError(f"{where()}: categorical field C{f + 1} is {v!r}, not a hex id")
        cat.append(int(v, 16))
    return int(lab), dense, cat


@dataclass
class CriteoVocab:
    """Maps the raw categorical values of each field to model ids (see the module doc)."""
    sizes: tuple                        # per categorical field, including its id 0 (rare / unseen / missing)
    maps: list | None = None            # per field: dict raw value -> local id (threshold mode)
    buckets: int | None = None          # hashing mode
    offsets: tuple = field(init=False)

    def __post_init__(self):
        offs, o = [], NUM_DENSE
        for s in self.sizes:
            offs.append(o)
            o += s
        self.offsets = tuple(offs)

    @property
    def vocab_size(self) -> int:
        return NUM_DENSE + sum(self.sizes)

    @classmethod
    def hashed(cls, buckets_per_field: int) -> "CriteoVocab":
        if buckets_per_field < 2:
            raise ValueError(f"CriteoVocab.hashed: buckets_per_field must be >= 2, got {buckets_per_field}")
        return cls(sizes=(int(buckets_per_field),) * NUM_CAT, buckets=int(buckets_per_field))

    @classmethod
    def build(cls, paths, min_count: int = 100, skip_bad_lines: bool = False) -> "CriteoVocab":
        """One pass over ``paths`` counting every (field, value); values seen >= min_count times get an id."""
        counts = [dict() for _ in range(NUM_CAT)]
        reader = CriteoReader(paths, skip_bad_lines=skip_bad_lines)
        for _, _, cat in reader.rows():
            for f, v in enumerate(cat):
                if v >= 0:
                    c = counts[f]
                    c[v] = c.get(v, 0) + 1
        maps = []
        for c in counts:
            keep = sorted(v for v, k in c.items() if k >= min_count)
            maps.append({v: i + 1 for i, v in enumerate(keep)})
        return cls(sizes=tuple(len(m) + 1 for m in maps), maps=maps)

    def local_ids(self, f: int, raw: np.ndarray) -> np.ndarray:
        """Local ids (0 = rare, unseen or missing) of the raw values of categorical field ``f``."""
        if self.buckets is not None:
            h = (raw.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
            out = (h % np.uint64(self.buckets - 1)).astype(np.int64) + 1
            out[raw < 0] = 0
            return out
        m = self.maps[f]
        return np.fromiter((m.get(v, 0) for v in raw.tolist()), np.int64, len(raw))


class CriteoReader:
    """Streams rows of Criteo text files, checking every line (see the module doc)."""

    def __init__(self, paths, skip_bad_lines: bool = False):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("CriteoReader: no files given")
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"CriteoReader: no such file: {p}")
        self.paths = [Path(p) for p in paths]
        self.skip_bad_lines = bool(skip_bad_lines)
        self.bad_lines = 0
        self.bad_examples: list[str] = []
        self._lock = threading.Lock()

    def rows(self):
        """Yields (label, dense, cat) per good line; counts (or raises on) bad ones."""
        bad = 0
        examples: list[str] = []
        for path in self.paths:
            opener = gzip.open if path.suffix == ".gz" else open  # the Terabyte days come gzipped
            with opener(path, "rt", encoding="ascii", errors="replace", newline="\n") as fh:
                for lineno, line in enumerate(fh, 1):
                    try:
                        yield _parse_line(line, lambda: f"{path}:{lineno}")
                    except CriteoFormatError as e:
                        if not self.skip_bad_lines:
                            raise
                        bad += 1
                        if len(examples) < 5:
                            examples.append(str(e))
        with self._lock:
            self.bad_lines = bad
            self.bad_examples = examples
        if bad:
            warnings.warn(f"CriteoReader: skipped {bad} bad line(s) in {', '.join(map(str, self.paths))}; first: "
                          + "; ".join(examples), stacklevel=2)

    def blocks(self, batch_size: int, drop_remainder: bool = True):
        """Yields (label (B,) int8, dense (B, 13) float64 with nan, cat (B, 26) int64 with -1) of batch_size rows."""
        lab, den, cat = [], [], []
        for y, d, c in self.rows():
            lab.append(y)
            den.append([np.nan if v is None else v for v in d])
            cat.append(c)
            if len(lab) == batch_size:
                yield np.array(lab, np.int8), np.array(den, np.float64), np.array(cat, np.int64)
                lab, den, cat = [], [], []
        if lab and not drop_remainder:
            yield np.array(lab, np.int8), np.array(den, np.float64), np.array(cat, np.int64)


def pack_rows(label, dense, cat_ids):
    """(label (B,), dense (B, 13) raw counts with nan, model ids of the 26 categorical fields (B, 26)) ->
    (packed (B, 2, 39) int32 data, (B, 1) float32 label): the zoo's ids and values, packed for WideDeep."""
    b = label.shape[0]
    vals = np.ones((b, NUM_FIELDS), np.float32)
    vals[:, :NUM_DENSE] = np.log1p(np.maximum(np.nan_to_num(dense, nan=0.0), 0.0))
    data = np.empty((b, 2, NUM_FIELDS), np.int32)
    data[:, 0, :NUM_DENSE] = np.arange(NUM_DENSE)
    data[:, 0, NUM_DENSE:] = cat_ids
    data[:, 1] = vals.view(np.int32)
    return data, label.astype(np.float32).reshape(b, 1)


def preprocess(vocab: CriteoVocab):
    """The map operation: raw block -> (packed (B, 2, 39) int32 data, (B, 1) float32 label)."""
    def criteo_preprocess(label, dense, cat):
        ids = np.empty(cat.shape, np.int64)
        for f in range(NUM_CAT):
            ids[:, f] = vocab.offsets[f] + vocab.local_ids(f, cat[:, f])
        return pack_rows(label, dense, ids)
    return criteo_preprocess


def criteo_dataset(paths, vocab: CriteoVocab, batch_size: int, num_parallel_workers: int = 2,
                   skip_bad_lines: bool = False, drop_remainder: bool = True):
    """MindData pipeline: Criteo text -> batches (data (B, 2, 39) int32, label (B, 1) float32).

    Returns (dataset, reader); ``reader.bad_lines`` counts the lines skipped in the last pass."""
    reader = CriteoReader(paths, skip_bad_lines=skip_bad_lines)

    def criteo_blocks():
        return reader.blocks(batch_size, drop_remainder)

    src = GeneratorDataset(criteo_blocks, ["label", "dense", "cat"])
    ds = src.map(preprocess(vocab), input_columns=["label", "dense", "cat"], output_columns=["data", "label"],
                 num_parallel_workers=num_parallel_workers)
    return ds, reader
