"""`repage-demo-hash-1536`: the demo's embedding model, by feature hashing.

The demo store needs vectors of the collection's dimension (1536, as FLTR's
`text-embedding-3-small`), but must build offline, in seconds, with no model
download. So a chunk's vector is a signed feature-hashing embedding of its text:

- features: lower-cased word unigrams and bigrams (`\\w+` tokens);
- each feature is hashed with BLAKE2b (8 bytes, keyed by the model name so another
  hashing model would give other vectors); the hash picks a dimension
  (`h % dim`) and a sign (bit 63), and adds +-1 there;
- the vector is L2-normalised and float32. A text with no words gets the vector of
  one fixed feature: Milvus' COSINE metric has no meaning for a zero vector.

Deterministic across processes and machines (no Python `hash()` randomisation).
Texts sharing words get a positive cosine similarity, so similarity search on the
demo store still behaves like search. It is a stand-in, not a semantic model: the
slow path refuses to write vectors from any model other than the collection's
(docs/design.md §7.4); a demo collection is built with this one, named `MODEL_NAME`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np

MODEL_NAME = "repage-demo-hash-1536"
DEFAULT_DIM = 1536

_WORD = re.compile(r"\w+", re.UNICODE)
_KEY = MODEL_NAME.encode()
_SIGN_BIT = 1 << 63
_EMPTY = "\x00empty"  # not a \w+ token: no real text produces this feature


def features(text: str) -> list[str]:
    """Word unigrams and bigrams of a text, lower-cased."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _hash(feature: str) -> int:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, key=_KEY).digest()
    return int.from_bytes(digest, "little")


def embed(text: str, dim: int = DEFAULT_DIM) -> np.ndarray:
    """One text -> a unit float32 vector of `dim`."""
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    vector = np.zeros(dim, dtype=np.float64)  # accumulate in float64, store float32
    for feature in features(text) or [_EMPTY]:
        h = _hash(feature)
        vector[h % dim] += -1.0 if h & _SIGN_BIT else 1.0
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:  # features cancelled out exactly (rare): never hand Milvus a zero vector
        return embed("", dim)
    vector /= norm
    return vector.astype(np.float32)


def embed_all(texts: Iterable[str], dim: int = DEFAULT_DIM) -> list[list[float]]:
    """Vectors as plain lists, the form Milvus' insert takes."""
    return [embed(text, dim).tolist() for text in texts]
