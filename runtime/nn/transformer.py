"""Transformer Cells built from the existing ops: MultiHeadAttention, TransformerEncoderLayer,
BertEncoder and a small BERT classifier (BertSmall).

Everything is written with the functional ops API, so it traces into one graph in GRAPH_MODE
(forward, IR autodiff backward, optimizer update) and runs eagerly in PYNATIVE_MODE:

* Dense layers work on (batch * seq, hidden) rows (matmul + bias add, then a reshape);
* heads are split with reshape + transpose, scores with ``batch_matmul``, and the softmax is the
  ``softmax`` primitive; an optional additive attention mask broadcasts over heads and queries;
* post-LayerNorm residual blocks (BERT), GELU feed-forward, dropout on the attention
  probabilities and on each block's output (``hidden_dropout``).
"""
from __future__ import annotations

import math

import numpy as np

from runtime.nn.cell import Cell
from runtime.nn.layers import Dense, Dropout, Embedding, LayerNorm
from runtime.nn.parameter import Parameter
from runtime.nn.init import initializer
from runtime.ops import api as F


class MultiHeadAttention(Cell):
    """Self-attention over (batch, seq, hidden) with ``num_heads`` heads of hidden/num_heads each."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float = 0.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"MultiHeadAttention: hidden_size {hidden_size} is not a multiple of "
                             f"num_heads {num_heads}")
        self.hidden_size, self.num_heads = int(hidden_size), int(num_heads)
        self.head_dim = hidden_size // num_heads
        self.query = Dense(hidden_size, hidden_size, weight_init="xavier_uniform")
        self.key = Dense(hidden_size, hidden_size, weight_init="xavier_uniform")
        self.value = Dense(hidden_size, hidden_size, weight_init="xavier_uniform")
        self.output = Dense(hidden_size, hidden_size, weight_init="xavier_uniform")
        self.dropout = Dropout(1.0 - attention_dropout) if attention_dropout else None
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def extend_repr(self):
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}"

    def _heads(self, x, b, s):
        # (b*s, h) -> (b, s, nh, dh) -> (b, nh, s, dh)
        return F.transpose(F.reshape(x, (b, s, self.num_heads, self.head_dim)), (0, 2, 1, 3))

    def construct(self, x, mask=None):
        self.check(x.ndim == 3 and x.shape[-1] == self.hidden_size,
                   f"expects (batch, seq, {self.hidden_size}) but got {tuple(x.shape)}")
        b, s, h = x.shape
        rows = F.reshape(x, (b * s, h))
        q = self._heads(self.query(rows), b, s)
        k = self._heads(self.key(rows), b, s)
        v = self._heads(self.value(rows), b, s)
        scores = F.mul(F.batch_matmul(q, k, transpose_b=True), self.scale)   # (b, nh, s, s)
        if mask is not None:
            scores = F.add(scores, mask)                                      # (b, 1, 1, s) additive
        probs = F.softmax(scores, -1)
        if self.dropout is not None:
            probs = self.dropout(probs)
        ctx = F.batch_matmul(probs, v)                                        # (b, nh, s, dh)
        ctx = F.reshape(F.transpose(ctx, (0, 2, 1, 3)), (b * s, h))
        return F.reshape(self.output(ctx), (b, s, h))


class TransformerEncoderLayer(Cell):
    """BERT's post-LN block: x = LN(x + Drop(MHA(x))); x = LN(x + Drop(FFN(x))), FFN = Dense-GELU-Dense."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int | None = None,
                 hidden_dropout: float = 0.1, attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12):
        super().__init__()
        inter = intermediate_size or 4 * hidden_size
        self.attention = MultiHeadAttention(hidden_size, num_heads, attention_dropout)
        self.attention_norm = LayerNorm((hidden_size,), epsilon=layer_norm_eps)
        self.intermediate = Dense(hidden_size, inter, weight_init="xavier_uniform", activation="gelu")
        self.ffn_output = Dense(inter, hidden_size, weight_init="xavier_uniform")
        self.output_norm = LayerNorm((hidden_size,), epsilon=layer_norm_eps)
        self.dropout1 = Dropout(1.0 - hidden_dropout) if hidden_dropout else None
        self.dropout2 = Dropout(1.0 - hidden_dropout) if hidden_dropout else None

    def _drop(self, cell, x):
        return cell(x) if cell is not None else x

    def construct(self, x, mask=None):
        b, s, h = x.shape
        a = self._drop(self.dropout1, self.attention(x, mask))
        x = self.attention_norm(F.add(x, a))
        f = self.ffn_output(self.intermediate(F.reshape(x, (b * s, h))))
        f = self._drop(self.dropout2, F.reshape(f, (b, s, h)))
        return self.output_norm(F.add(x, f))


class BertEncoder(Cell):
    """Token + position embeddings, LayerNorm, dropout, then ``num_layers`` encoder layers.

    Input: integer token ids (batch, seq); output: hidden states (batch, seq, hidden).
    """

    def __init__(self, vocab_size: int = 1000, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                 intermediate_size: int | None = None, max_position: int = 512, hidden_dropout: float = 0.1,
                 attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.word_embeddings = Embedding(vocab_size, hidden_size, embedding_table="normal")
        self.position_embeddings = Parameter(initializer("normal", (max_position, hidden_size)))
        self.embedding_norm = LayerNorm((hidden_size,), epsilon=layer_norm_eps)
        self.embedding_dropout = Dropout(1.0 - hidden_dropout) if hidden_dropout else None
        self._layer_names = []
        for i in range(num_layers):
            name = f"layer{i}"
            setattr(self, name, TransformerEncoderLayer(hidden_size, num_heads, intermediate_size, hidden_dropout,
                                                        attention_dropout, layer_norm_eps))
            self._layer_names.append(name)

    def construct(self, ids, mask=None):
        self.check(ids.ndim == 2, f"expects token ids (batch, seq) but got {tuple(ids.shape)}")
        b, s = ids.shape
        self.check(s <= self.position_embeddings.shape[0],
                   f"sequence length {s} exceeds max_position {self.position_embeddings.shape[0]}")
        pos = F.slice(self.position_embeddings, (0, 0), (s, self.hidden_size))
        x = F.add(self.word_embeddings(ids), pos)                        # (b, s, h) + (s, h)
        x = self.embedding_norm(x)
        if self.embedding_dropout is not None:
            x = self.embedding_dropout(x)
        for name in self._layer_names:
            x = getattr(self, name)(x, mask)
        return x


class BertSmall(Cell):
    """A small BERT classifier: BertEncoder, tanh pooler on the first token, Dense to the classes.

    The default configuration is the benchmark's "BERT-small": 4 layers, hidden 256, 4 heads.
    """

    def __init__(self, vocab_size: int = 1000, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                 num_classes: int = 2, intermediate_size: int | None = None, max_position: int = 512,
                 hidden_dropout: float = 0.1, attention_dropout: float = 0.1):
        super().__init__()
        self.encoder = BertEncoder(vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_position,
                                   hidden_dropout, attention_dropout)
        self.pooler = Dense(hidden_size, hidden_size, weight_init="xavier_uniform", activation="tanh")
        self.classifier = Dense(hidden_size, num_classes, weight_init="xavier_uniform")

    def construct(self, ids):
        h = self.encoder(ids)
        b, s, d = h.shape
        first = F.reshape(F.slice(h, (0, 0, 0), (b, 1, d)), (b, d))
        return self.classifier(self.pooler(first))


def bert_batch(batch: int, seq: int, vocab: int = 1000, num_classes: int = 2, seed: int = 0):
    """A deterministic synthetic batch (ids, labels) for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int64)
    labels = (ids[:, 0] % num_classes).astype(np.int64)
    return ids, labels
