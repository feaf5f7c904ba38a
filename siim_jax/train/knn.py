"""Weighted k-NN classification on frozen features (DINO style), on device over a sharded feature bank.

Both sides are L2-normalised (x / max(||x||, 1e-12)); a query's k nearest bank rows by cosine similarity each
vote exp(sim / T) for their label, and the class with the largest summed vote wins. A bank with fewer than k
valid rows votes with all of them.

The bank (Nb, D) stays sharded along Nb over the mesh axes `batch_axes`: each device takes the top-min(k, local
rows) of its own shard (rows with bank_valid=False have similarity -inf), only those candidates (similarity,
label) are all-gathered across `batch_axes`, and the global top-k of the candidates votes; -inf candidates carry
no vote. Nothing of size Nb is ever gathered or sent to the host. Among exactly equal similarities the lower
bank index wins within a shard (lax.top_k), so ties may resolve differently from a host brute force.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 similarities (no TF32 / bf16 passes on GPU / TPU)


def _axes_tuple(batch_axes) -> tuple:
    return (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)


def _num_shards(mesh: Mesh, axes: tuple) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _normalise(x):
    """(N, D) -> float32 rows divided by max(L2 norm, 1e-12)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _pad_rows(x, multiple: int):
    """Zero-pads dim 0 up to a multiple of `multiple` (False for bool arrays: padded rows are invalid)."""
    extra = -x.shape[0] % multiple
    return x if extra == 0 else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def _gather(x, axes: tuple):
    """Concatenates x (Q, K) of every shard along dim 1 -> (Q, S * K), identical on every device."""
    return jax.lax.all_gather(x, axes, axis=1, tiled=True, to="invarying") if axes else x


def _shard_votes(bank, bank_labels, bank_valid, queries, *, k: int, temperature: float, num_classes: int,
                 axes: tuple):
    """Per-device body. bank (L, D) normalised rows of this shard, bank_labels (L,) int32, bank_valid (L,) bool;
    queries (Q, D) normalised, the same on every device. Returns votes (Q, C) float32, the same on every device."""
    sims = jnp.dot(queries, bank.T, precision=_HIGHEST)  # (Q, L)
    sims = jnp.where(bank_valid[None, :], sims, -jnp.inf)
    sims, index = jax.lax.top_k(sims, min(k, bank.shape[0]))
    sims, labels = _gather(sims, axes), _gather(bank_labels[index], axes)  # (Q, S * min(k, L))
    sims, index = jax.lax.top_k(sims, min(k, sims.shape[1]))
    labels = jnp.take_along_axis(labels, index, axis=1)
    voting = jnp.isfinite(sims)
    weights = jnp.where(voting, jnp.exp(sims / temperature), 0.0)
    labels = jnp.where(voting, labels, 0)  # invalid rows' labels may be anything; they add 0 to class 0
    rows = jnp.arange(queries.shape[0])[:, None]
    return jnp.zeros((queries.shape[0], num_classes), jnp.float32).at[rows, labels].add(weights)


@functools.lru_cache(maxsize=32)
def _votes_fn(mesh: Mesh, axes: tuple, k: int, temperature: float, num_classes: int):
    rows = PartitionSpec(axes or None)
    body = functools.partial(_shard_votes, k=k, temperature=temperature, num_classes=num_classes, axes=axes)

    def votes(bank, bank_labels, bank_valid, queries):
        shards = _num_shards(mesh, axes)
        bank, bank_labels, bank_valid = (_pad_rows(x, shards) for x in (bank, bank_labels, bank_valid))

        def local(bank, bank_labels, bank_valid, queries):
            return body(_normalise(bank), bank_labels, bank_valid, _normalise(queries))

        return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(axes or None, None), rows, rows,
                                                         PartitionSpec()),
                             out_specs=PartitionSpec())(bank, bank_labels.astype(jnp.int32),
                                                        bank_valid.astype(bool), queries)

    return jax.jit(votes)


def knn_votes(bank, bank_labels, bank_valid, queries, *, k: int, temperature: float, num_classes: int,
              mesh: Mesh, batch_axes) -> jax.Array:
    """bank (Nb, D) float, sharded along Nb over the mesh axes `batch_axes` (a tuple of names, e.g.
    ("data", "fsdp")); bank_labels (Nb,) int32 in [0, num_classes); bank_valid (Nb,) bool (False: padding, no
    vote); queries (Nq, D), replicated on every device. Returns votes (Nq, num_classes) float32, replicated:
    sum over the query's k most cosine-similar valid bank rows of exp(sim / temperature), per label.

    Nb need not divide the shard count (padded inside with invalid rows), but a bank that is already sharded
    over `batch_axes` is used in place. Compiled once per (mesh, axes, k, temperature, num_classes, shapes).
    """
    _check(bank, bank_labels, bank_valid, queries, k, temperature)
    fn = _votes_fn(mesh, _axes_tuple(batch_axes), int(k), float(temperature), int(num_classes))
    return fn(bank, bank_labels, bank_valid, queries)


@functools.lru_cache(maxsize=32)
def _top1_counts_fn(mesh: Mesh, axes: tuple, k: int, temperature: float, num_classes: int, query_chunk: int):
    rows = PartitionSpec(axes or None)
    matrix = PartitionSpec(axes or None, None)
    body = functools.partial(_shard_votes, k=k, temperature=temperature, num_classes=num_classes, axes=axes)
    shards = _num_shards(mesh, axes)

    def local(bank, bank_labels, bank_valid, queries, query_labels, query_valid):
        """Each device's query shard (Lq rows) is walked in local chunks of `chunk` rows; chunk i of every shard is
        all-gathered into one replicated (S * chunk, D) query chunk. The last chunk is shifted back to fit, and its
        rows that an earlier chunk already counted are masked out."""
        bank = _normalise(bank)
        local_rows = queries.shape[0]
        chunk = min(math.ceil(query_chunk / shards), local_rows)

        def step(i, counts):
            start = jnp.minimum(i * chunk, local_rows - chunk)
            take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=chunk, axis=0)
            fresh = (start + jnp.arange(chunk)) >= i * chunk
            q = _normalise(take(queries))
            if axes:
                q = jax.lax.all_gather(q, axes, axis=0, tiled=True, to="invarying")
            labels, counted = (_gather(x[None, :], axes)[0] for x in (take(query_labels), take(query_valid) & fresh))
            predicted = jnp.argmax(body(bank, bank_labels, bank_valid, q), axis=1)
            correct = jnp.sum((predicted == labels) & counted, dtype=jnp.int32)
            return counts + jnp.stack([correct, jnp.sum(counted, dtype=jnp.int32)])

        return jax.lax.fori_loop(0, math.ceil(local_rows / chunk), step, jnp.zeros((2,), jnp.int32))

    def counts(bank, bank_labels, bank_valid, queries, query_labels, query_valid):
        bank, bank_labels, bank_valid, queries, query_labels, query_valid = (
            _pad_rows(x, shards) for x in (bank, bank_labels, bank_valid, queries, query_labels, query_valid))
        return jax.shard_map(local, mesh=mesh, in_specs=(matrix, rows, rows, matrix, rows, rows),
                             out_specs=PartitionSpec())(
            bank, bank_labels.astype(jnp.int32), bank_valid.astype(bool), queries, query_labels.astype(jnp.int32),
            query_valid.astype(bool))

    return jax.jit(counts)


def knn_top1(bank, bank_labels, bank_valid, queries, query_labels, query_valid, *, k: int, temperature: float,
             num_classes: int, mesh: Mesh, batch_axes, query_chunk: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of knn_votes' argmax (lowest class among equal votes) over the queries with
    query_valid=True. bank, bank_labels, bank_valid as in knn_votes; queries (Nq, D), query_labels (Nq,) int32,
    query_valid (Nq,) bool, best sharded along Nq over `batch_axes` like the bank (any sharding works).

    Queries are classified `query_chunk` at a time (rounded up to a multiple of the shard count): each device
    contributes its next rows and only that chunk is all-gathered. One compiled call, a loop on device; the
    result is a Python float, the same on every process (every process passes the same global arrays).
    """
    _check(bank, bank_labels, bank_valid, queries, k, temperature)
    if not (len(query_labels) == len(query_valid) == len(queries)):
        raise ValueError(f"queries {queries.shape}, query_labels {query_labels.shape} and query_valid "
                         f"{query_valid.shape} must have the same number of rows")
    if query_chunk < 1:
        raise ValueError(f"query_chunk={query_chunk} must be >= 1")
    fn = _top1_counts_fn(mesh, _axes_tuple(batch_axes), int(k), float(temperature), int(num_classes),
                         int(query_chunk))
    counts = fn(bank, bank_labels, bank_valid, queries, query_labels, query_valid)  # (2,) int32, replicated
    correct, counted = np.asarray(counts).tolist()  # a local copy: no cross-process transfer
    if counted == 0:
        raise ValueError("knn_top1: no valid queries (query_valid is all False)")
    return correct / counted


def _check(bank, bank_labels, bank_valid, queries, k, temperature):
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {bank.shape} and queries {queries.shape} must be (N, D) with the same D")
    if not (bank_labels.shape == bank_valid.shape == bank.shape[:1]) or bank.shape[0] == 0:
        raise ValueError(f"bank {bank.shape}, bank_labels {bank_labels.shape}, bank_valid {bank_valid.shape}: "
                         "need the same number (>= 1) of rows")
    if int(k) < 1 or not temperature > 0:
        raise ValueError(f"k={k} must be >= 1 and temperature={temperature} > 0")
