"""The k-nearest-neighbour probe on cached features (DINO's and dinov2's eval_knn).

N = train rows, Q = query rows (val and test together), D = feature dim, C = classes, k_max = the
largest k asked for, P = independent train sets searched side by side (few-shot draws).

Rows are L2-normalized (a zero row stays zero) and compared by cosine similarity, computed in JAX
as blocked matrix products: the train side arrives in row blocks (an array cut into blocks, or a
FeatureReader's blocks for a cache larger than memory) and each block is compared with the queries
in query blocks of `query_block` rows, so at most query_block x (train block rows) similarities exist
at once. Each (query block, train block) product keeps its top k_max (lax.top_k) and merges them with
the running top k_max of the blocks before; equal similarities go to the lower train row.

Votes: each of the k nearest train rows votes for its class with weight exp(sim / T), T = 0.07
(DINO), or 1 (uniform votes). Every k of the grid comes from the same k_max neighbours (one pass).
Scores are the vote shares per class; the prediction is the first class with the most votes
(metrics.predict's rule; uniform votes then give scikit-learn's KNeighborsClassifier predictions).
Two classes keep featcache's one-logit layout: the score s1 - s0 (class 1 iff > 0). There is no
loss (vote shares are not a likelihood): loss columns stay empty, as ridge's do.

Selection: the k with the best val accuracy; ties go to the smaller k. Test data never takes part.

Never imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from featcache import metrics
from featcache.errors import UserError
from featcache.metrics import EpochRecord, RunSummary

DEFAULT_KS = (10, 20, 100, 200)  # DINO / dinov2
TEMPERATURE = 0.07  # DINO's T in exp(sim / T)
BLOCK_BYTES = 256 * 2 ** 20  # similarities held at once: query_block x train block x 4 bytes
QUERY_BLOCK = 1024  # query rows per similarity block (fewer when a train block is long)

Arrays = tuple[np.ndarray, np.ndarray]  # features (N, D), labels (N,)


def check_ks(ks: Sequence[int] | None, n_train: int) -> tuple[int, ...]:
    """Sorted distinct k values: DEFAULT_KS clipped to n_train when ks is None; UserError for a k below 1
    or above n_train when given."""
    if ks is None:
        return tuple(sorted({min(k, n_train) for k in DEFAULT_KS}))
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise UserError(f"k must be at least 1, got {ks[0] if ks else 'no value'}; give e.g. 10,20.")
    if ks[-1] > n_train:
        raise UserError(f"k = {ks[-1]} is larger than the {n_train} train rows; give k values up to {n_train}.")
    return tuple(ks)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) float32 rows scaled to unit L2 norm (computed in float64; a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def array_blocks(x: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    """(M, D) row blocks of x in order, the last one shorter."""
    for start in range(0, len(x), rows):
        yield x[start:start + rows]


def reader_blocks(reader, split: str, rows: int) -> Iterator[np.ndarray]:
    """(M, D) row blocks of a split read from a FeatureReader (featcache.cache), never the whole split at once."""
    for start in range(0, reader.rows(split), rows):
        yield reader.read(split, start, min(start + rows, reader.rows(split)))


# --------------------------------------------------------------------------- the compiled search

def _merge_queries(best_s, best_i, q, xb, valid, offset, k: int):
    """Top-k of one query block against one train block merged into the running top-k.

    best_s / best_i (B, k) float32 / int32; q (B, D); xb (M, D); valid (M,) bool; offset: train row of xb[0].
    """
    sims = jnp.dot(q, xb.T, precision=jax.lax.Precision.HIGHEST)  # (B, M)
    sims = jnp.where(valid[None, :], sims, -jnp.inf)
    block_s, block_j = jax.lax.top_k(sims, min(k, xb.shape[0]))
    # running best first: on equal similarity lax.top_k keeps the lower position, i.e. the lower train row
    s = jnp.concatenate([best_s, block_s], axis=1)
    i = jnp.concatenate([best_i, block_j.astype(jnp.int32) + offset], axis=1)
    top_s, pos = jax.lax.top_k(s, k)
    return top_s, jnp.take_along_axis(i, pos, axis=1)


@partial(jax.jit, static_argnames=("k",), donate_argnums=(0, 1))
def search_block(best_s, best_i, queries, xb, valid, offset, *, k: int):
    """Merge train block xb (M, D) (rows `valid`, first row `offset`) into the running top-k of every
    query: queries (G, B, D) in G blocks of B rows, best_s / best_i (G, B, k). One query block at a time."""
    def one(args):
        s, i, q = args
        return _merge_queries(s, i, q, xb, valid, offset, k)
    return jax.lax.map(one, (best_s, best_i, queries))


@partial(jax.jit, static_argnames=("k",))
def search_sets(queries, xs, valid, *, k: int):
    """Top-k of queries (G, B, D) among each of P small train sets xs (P, M, D) with valid (P, M): ONE program,
    vmapped over the sets. Returns sims (P, G, B, k) and positions into each set (P, G, B, k)."""
    def one(x, v):
        s = jnp.full(queries.shape[:2] + (k,), -jnp.inf, jnp.float32)
        i = jnp.full(queries.shape[:2] + (k,), -1, jnp.int32)
        return jax.lax.map(lambda a: _merge_queries(a[0], a[1], a[2], x, v, 0, k), (s, i, queries))
    return jax.vmap(one)(xs, valid)


def query_block_rows(num_queries: int, train_rows: int, *, block_bytes: int = BLOCK_BYTES) -> int:
    """Query rows per similarity block: at most QUERY_BLOCK and the queries, and block x train_rows x 4 bytes
    within block_bytes (at least one row)."""
    return int(max(1, min(QUERY_BLOCK, num_queries, block_bytes // (4 * max(1, train_rows)))))


def query_blocks(queries: np.ndarray, block: int) -> jax.Array:
    """(G, B, D) device array: queries (Q, D) normalized, padded with zero rows to G * B, cut in blocks of B."""
    q = normalize_rows(queries)
    groups = max(1, -(-len(q) // block))
    padded = np.zeros((groups * block, q.shape[1]), np.float32)
    padded[:len(q)] = q
    return jnp.asarray(padded.reshape(groups, block, q.shape[1]))


def nearest_neighbours(queries: np.ndarray, train_blocks: Iterable[np.ndarray], *, k: int,
                       block_bytes: int = BLOCK_BYTES, train_block_rows: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The k train rows most cosine-similar to each query, the train side read block by block.

    Args:
        queries: (Q, D) features (normalized here).
        train_blocks: (M, D) blocks of the train features in row order (normalized here); every block
            but the last must have the same rows (array_blocks / reader_blocks give that).
        k: neighbours kept (<= total train rows).
        block_bytes: bound on the similarities held at once (query block x train block x 4 bytes).
        train_block_rows: rows of the train blocks, to size the query blocks; None = read from the first block.

    Returns:
        sims (Q, k) float32, descending, and train rows (Q, k) int64.
    """
    blocks = iter(train_blocks)
    first = next(blocks, None)
    if first is None:
        raise ValueError("no train rows")
    rows = int(train_block_rows or len(first))
    q = query_blocks(queries, query_block_rows(len(queries), rows, block_bytes=block_bytes))
    best_s = jnp.full(q.shape[:2] + (k,), -jnp.inf, jnp.float32)
    best_i = jnp.full(q.shape[:2] + (k,), -1, jnp.int32)
    offset = 0
    for block in _chain(first, blocks):
        m = len(block)
        xb = np.zeros((rows, block.shape[1]), np.float32)  # padded to `rows`: one compiled shape
        xb[:m] = normalize_rows(block)
        best_s, best_i = search_block(best_s, best_i, q, jnp.asarray(xb), jnp.arange(rows) < m,
                                      jnp.int32(offset), k=k)
        offset += m
    if offset < k:
        raise ValueError(f"k = {k} neighbours asked among {offset} train rows")
    n = len(queries)
    return (np.asarray(best_s).reshape(-1, k)[:n], np.asarray(best_i).reshape(-1, k)[:n].astype(np.int64))


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


# --------------------------------------------------------------------------- votes

def vote_shares(neighbour_labels: np.ndarray, sims: np.ndarray, *, ks: Sequence[int], num_classes: int,
                temperature: float | None = TEMPERATURE) -> Iterator[np.ndarray]:
    """For each k of ks (ascending), (Q, C) float64 vote shares of the k nearest rows.

    neighbour_labels (Q, k_max) int and sims (Q, k_max), nearest first; weight exp(sim / T), or 1 when
    temperature is None.
    """
    labels = np.asarray(neighbour_labels, dtype=np.int64)
    s = np.asarray(sims, dtype=np.float64)
    weights = np.ones_like(s) if temperature is None else np.exp(s / temperature)
    votes = np.zeros((len(labels), num_classes))
    rows = np.arange(len(labels))[:, None]
    done = 0
    for k in ks:
        np.add.at(votes, (np.broadcast_to(rows, (len(labels), k - done)), labels[:, done:k]), weights[:, done:k])
        done = k
        yield votes / votes.sum(axis=1, keepdims=True)


def head_scores(shares: np.ndarray, num_classes: int) -> np.ndarray:
    """(Q, K) scores in featcache's logit layout: s1 - s0 for two classes, the C shares otherwise."""
    return shares[:, 1:2] - shares[:, 0:1] if num_classes == 2 else shares


def check_temperature(temperature: float | None) -> None:
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"The k-NN temperature must be a positive number, got {temperature:g}; DINO uses 0.07.")


# --------------------------------------------------------------------------- the probe

@dataclass(frozen=True)
class KnnFit:
    """Every k scored on val (and test, reported only), the k selected on val and its test scores."""

    ks: tuple[int, ...]
    temperature: float | None  # None = uniform votes
    val_acc: np.ndarray  # (len(ks),)
    test_acc: np.ndarray  # (len(ks),) reported only; never used to select
    selected: int  # index into ks
    test_scores: np.ndarray  # (N_test, K) of the selected k (head_scores layout)
    test_neighbours: np.ndarray  # (N_test, k_max) int64 train rows, nearest first
    summary: RunSummary
    history: list[EpochRecord]  # one record: the selected k (losses and lr nan, train acc nan)
    timings: dict  # search_s, seconds

    @property
    def k(self) -> int:
        return self.ks[self.selected]

    def to_dict(self) -> dict:
        """JSON-safe grid, as metrics.json would store it (extra["knn"])."""
        return {"ks": list(self.ks), "selected_k": self.k, "temperature": self.temperature,
                "votes": "uniform" if self.temperature is None else "exp(sim / T)",
                "rule": "best val acc; ties: smaller k", "val_acc": self.val_acc.tolist(),
                "test_acc": self.test_acc.tolist(), "timings": self.timings}


def select_k(val_acc: Sequence[float]) -> int:
    """Index of the selected k: best val acc, ties to the smaller k (metrics.select_epoch on ascending ks)."""
    nan = float("nan")
    return metrics.select_epoch([EpochRecord(epoch=i + 1, lr=nan, train_loss=nan, train_acc=nan, val_loss=nan,
                                             val_acc=float(a), seconds=nan) for i, a in enumerate(val_acc)])


def score_ks(labels: np.ndarray, sims: np.ndarray, split_labels: Sequence[np.ndarray], *, ks: Sequence[int],
             num_classes: int, temperature: float | None) -> np.ndarray:
    """(len(ks), splits) accuracy of every k on each split; labels / sims (Q, k_max) are the splits' query
    rows one after another, split_labels their true labels in that order."""
    cuts = np.cumsum([0] + [len(y) for y in split_labels])
    out = []
    for shares in vote_shares(labels, sims, ks=ks, num_classes=num_classes, temperature=temperature):
        pred = metrics.predict(head_scores(shares, num_classes), num_classes)
        out.append([metrics.accuracy(pred[a:b], y) for a, b, y in zip(cuts[:-1], cuts[1:], split_labels)])
    return np.asarray(out, dtype=np.float64)


def fit_knn(train: tuple[np.ndarray | Iterable[np.ndarray], np.ndarray], val: Arrays, test: Arrays, *,
            num_classes: int, ks: Sequence[int] | None = None, temperature: float | None = TEMPERATURE,
            block_bytes: int = BLOCK_BYTES, train_block_rows: int = 65536,
            class_names: Sequence[str] | None = None) -> KnnFit:
    """The k-NN probe: neighbours of val and test rows among train rows in one pass, k selected on val.

    Args:
        train: (features, labels (N,)): features an (N, D) array, or (M, D) row blocks in row order
            (reader_blocks for a cache larger than memory); labels in memory.
        val, test: (features (N, D), labels (N,)) in memory.
        num_classes: C >= 2.
        ks: the k values; None = DEFAULT_KS clipped to the train rows.
        temperature: T of the vote weights exp(sim / T); None = uniform votes.
        block_bytes: bound on the similarities held at once.
        train_block_rows: rows per train block when train features are an array.
        class_names: C names for the summary.

    Returns:
        KnnFit (summary.training_time = seconds of the search and the votes).
    """
    t0 = time.perf_counter()
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    features, y_train = train
    y_train = np.asarray(y_train, dtype=np.int64)
    ks = check_ks(ks, len(y_train))
    check_temperature(temperature)
    (x_val, y_val), (x_test, y_test) = [(np.asarray(x), np.asarray(y, dtype=np.int64)) for x, y in (val, test)]
    for split, y in (("train", y_train), ("val", y_val), ("test", y_test)):
        if len(y) == 0:
            raise UserError(f"The {split} split is empty; the k-NN probe needs train, val and test rows.")
    in_memory = isinstance(features, np.ndarray)
    block_rows = min(train_block_rows, len(y_train)) if in_memory else None
    blocks = array_blocks(features, block_rows) if in_memory else features
    sims, rows = nearest_neighbours(np.concatenate([x_val, x_test]), blocks, k=ks[-1], block_bytes=block_bytes,
                                    train_block_rows=block_rows)
    search_s = time.perf_counter() - t0
    labels = y_train[rows]  # (Q, k_max)
    acc = score_ks(labels, sims, [y_val, y_test], ks=ks, num_classes=num_classes, temperature=temperature)
    selected = select_k(acc[:, 0])
    test_part = slice(len(y_val), None)
    shares = list(vote_shares(labels[test_part], sims[test_part], ks=ks[:selected + 1], num_classes=num_classes,
                              temperature=temperature))[-1]
    scores = head_scores(shares, num_classes)
    seconds = time.perf_counter() - t0
    nan = float("nan")
    history = [EpochRecord(epoch=1, lr=nan, train_loss=nan, train_acc=nan, val_loss=nan,
                           val_acc=float(acc[selected, 0]), seconds=seconds)]
    summary = metrics.summarize(history, 0, test_logits=scores, test_labels=y_test, class_names=names,
                                train_seconds=seconds, diverged=False)
    summary = dataclasses.replace(summary, test_loss=nan)
    return KnnFit(ks=ks, temperature=temperature, val_acc=acc[:, 0], test_acc=acc[:, 1], selected=selected,
                  test_scores=scores, test_neighbours=rows[test_part], summary=summary, history=history,
                  timings={"search_s": search_s, "seconds": seconds})
