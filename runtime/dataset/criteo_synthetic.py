"""A Criteo-like click log with a planted ground truth, so the best achievable AUC is known.

Rows look like Criteo's: a 0/1 label, 13 non-negative integer features (some missing) and 26
categorical features whose ids follow a per-field Zipf law over Criteo Kaggle's per-field
cardinalities (times ``vocab_scale``). The label is drawn from a logistic model

    logit = b + sum_f w_f(id_f) + sum_j beta_j log(1 + x_j) + c . tanh(sum_f u_f(id_f))

with a per-id wide weight ``w_f(id)`` and a rank-``rank`` interaction vector ``u_f(id)`` for every id
(the tanh of their sum couples all fields: not additive, yet what a deep tower over the embeddings
can represent; a missing value is a value of its own),
both derived from a hash of (seed, field, id) -- no table is stored, so a 33.8M-id vocabulary costs
nothing. The Bayes-optimal scorer is the logit itself, so the Bayes-optimal AUC of a sample is
``auc(labels, logits)`` -- printed next to a model's AUC on the same rows.

``write_text`` writes the rows in Criteo's text format (label, 13 ints, 26 8-digit hex strings,
tab-separated, empty = missing), which ``runtime.dataset.criteo`` reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.dataset.criteo import pack_rows
from runtime.models.wide_deep import auc

# Criteo Kaggle (Display Advertising Challenge) per-field cardinalities of the 26 categorical fields
CRITEO_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                        14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
NUM_DENSE, NUM_CAT = 13, 26
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _hash_normal(seed: int, field: int, ids: np.ndarray, k: int) -> np.ndarray:
    """A standard normal per (seed, field, id, k), by hashing (Box-Muller on two hashed uniforms)."""
    with np.errstate(over="ignore"):
        base = ids.astype(np.uint64) * np.uint64(0x100000001B3) + np.uint64((seed * 1_000_003 + field * 7919 + k
                                                                              * 104_729) & 0xFFFFFFFF)
    h1 = _splitmix(base)
    h2 = _splitmix(h1 ^ np.uint64(0xD1B54A32D192ED03))
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


@dataclass
class CriteoSample:
    label: np.ndarray   # (n,) int8
    dense: np.ndarray   # (n, 13) float64, nan = missing
    cat: np.ndarray     # (n, 26) int64 per-field ids, -1 = missing
    logit: np.ndarray   # (n,) float64, the true logit

    @property
    def bayes_auc(self) -> float:
        return auc(self.label, self.logit)


class CriteoSynthetic:
    """Generator of Criteo-like rows with a known logistic ground truth (see the module doc)."""

    def __init__(self, vocab_scale: float = 1.0, zipf: float = 1.15, rank: int = 4, wide_std: float = 0.6,
                 interaction_std: float = 0.35, dense_weight: float = 0.25, missing: float = 0.05,
                 bias: float = -1.2, seed: int = 0):
        if vocab_scale <= 0:
            raise ValueError(f"CriteoSynthetic: vocab_scale must be > 0, got {vocab_scale}")
        if zipf <= 1.0:
            raise ValueError(f"CriteoSynthetic: zipf must be > 1, got {zipf}")
        self.cardinalities = tuple(max(2, int(round(c * vocab_scale))) for c in CRITEO_CARDINALITIES)
        self.zipf, self.rank, self.seed = float(zipf), int(rank), int(seed)
        self.wide_std, self.interaction_std = float(wide_std), float(interaction_std)
        self.missing, self.bias = float(missing), float(bias)
        rng = np.random.default_rng([seed, 17])
        self.dense_beta = rng.normal(0.0, dense_weight, NUM_DENSE)
        self.dense_scale = rng.uniform(0.5, 3.0, NUM_DENSE)  # log-normal scales of the counts
        self._dense_center = 0.5 * self.dense_scale  # E[log1p(exp(|N(0,1)| s))] roughly; only shifts the bias
        self._perm = [(int(rng.integers(1, c)) | 1, int(rng.integers(0, c))) for c in self.cardinalities]

    @property
    def vocab_size(self) -> int:
        return sum(self.cardinalities)

    def _zipf_ids(self, rng, n: int, card: int) -> np.ndarray:
        """Ids 0..card-1 with P(rank r) ~ r^-s (continuous inverse CDF), ranks scattered over the ids."""
        s = self.zipf
        top = (card + 1.0) ** (1.0 - s)
        u = rng.random(n)
        r = np.floor((1.0 - u * (1.0 - top)) ** (1.0 / (1.0 - s))).astype(np.int64) - 1
        return np.clip(r, 0, card - 1)

    def _scatter(self, f: int, r: np.ndarray) -> np.ndarray:
        a, b = self._perm[f]
        card = self.cardinalities[f]
        while math.gcd(a, card) != 1:
            a += 2
        return (r * a + b) % card

    def sample(self, rows: int, seed: int = 0) -> CriteoSample:
        rng = np.random.default_rng([self.seed, seed, 3])
        cat = np.empty((rows, NUM_CAT), np.int64)
        logit = np.full(rows, self.bias)
        inter = np.zeros((rows, self.rank))
        ustd = 1.0 / math.sqrt(NUM_CAT)  # each coordinate of sum_f u_f(id_f) has unit variance
        for f, card in enumerate(self.cardinalities):
            ids = self._scatter(f, self._zipf_ids(rng, rows, card))
            ids[rng.random(rows) < self.missing] = -1  # the truth sees what the data shows: missing is a value
            key = np.where(ids < 0, card, ids)
            logit += self.wide_std * _hash_normal(self.seed, f, key, 0)
            u = np.stack([_hash_normal(self.seed, f, key, 1 + k) for k in range(self.rank)], 1) * ustd
            inter += u
            cat[:, f] = ids
        signs = np.where(np.arange(self.rank) % 2 == 0, 1.0, -1.0)
        logit += self.interaction_std * (np.tanh(inter) @ signs)  # a rank-r interaction across all fields
        counts = np.floor(np.exp(rng.normal(0.0, 1.0, (rows, NUM_DENSE)) * self.dense_scale)).astype(np.float64)
        counts[rng.random((rows, NUM_DENSE)) < self.missing] = np.nan
        logit += (np.log1p(np.nan_to_num(counts, nan=0.0)) - self._dense_center) @ self.dense_beta
        dense = counts
        label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
        return CriteoSample(label, dense, cat, logit)

    def hex_ids(self, field: int, ids: np.ndarray) -> np.ndarray:
        """The 8-digit hex string value of per-field ids (a 32-bit hash of (seed, field, id); -1 -> '')."""
        h = (_splitmix(ids.astype(np.uint64) * np.uint64(2654435761) + np.uint64(field * 97 + self.seed))
             >> np.uint64(32)).astype(np.uint32)
        out = np.char.mod("%08x", h.astype(np.int64))
        out[ids < 0] = ""
        return out

    def write_text(self, path, rows: int, seed: int = 0, chunk: int = 50_000) -> float:
        """Write ``rows`` rows in Criteo's text format; returns the Bayes-optimal AUC of those rows."""
        labels, logits = [], []
        with open(path, "w") as fh:
            for start in range(0, rows, chunk):
                s = self.sample(min(chunk, rows - start), seed=seed * 1_000_003 + start // chunk)
                labels.append(s.label)
                logits.append(s.logit)
                cols = [s.label.astype(str)]
                for j in range(NUM_DENSE):
                    col = np.char.mod("%d", np.nan_to_num(s.dense[:, j], nan=0).astype(np.int64))
                    col[np.isnan(s.dense[:, j])] = ""
                    cols.append(col)
                cols += [self.hex_ids(f, s.cat[:, f]) for f in range(NUM_CAT)]
                table = np.stack(cols, 1)
                fh.write("\n".join("\t".join(r) for r in table.tolist()))
                fh.write("\n")
        return auc(np.concatenate(labels), np.concatenate(logits))


def model_batches(gen: CriteoSynthetic, sample: CriteoSample, batch_size: int):
    """The sample as WideDeep batches with exact per-field ids (id 0 of a field = missing):
    (list of packed (B, 2, 39) int32 data, list of (B, 1) float32 labels, vocab size). Drops the remainder."""
    offs = np.cumsum((NUM_DENSE,) + tuple(c + 1 for c in gen.cardinalities))[:-1]
    ids = sample.cat + 1 + offs  # missing (-1) -> the field's id 0
    data, label = pack_rows(sample.label, sample.dense, ids)
    n = (len(label) // batch_size) * batch_size
    return ([data[i:i + batch_size] for i in range(0, n, batch_size)],
            [label[i:i + batch_size] for i in range(0, n, batch_size)],
            int(offs[-1] + gen.cardinalities[-1] + 1))
