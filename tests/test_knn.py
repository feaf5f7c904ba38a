"""On-device weighted k-NN (siim_jax.train.knn) against a NumPy brute force, on 1 and 8 (fake CPU) devices."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siim_jax.train import knn

TEMPERATURE = 0.07
CLASSES = 5
D = 16


def numpy_votes(bank, bank_labels, queries, k, temperature, num_classes):
    """Brute force (the former host implementation, in float64): votes (Nq, C) over a bank of valid rows only."""
    bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    sims = queries @ bank.T  # (Nq, Nb)
    k = min(k, bank.shape[0])
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
    votes = np.zeros((queries.shape[0], num_classes))
    np.add.at(votes, (np.arange(queries.shape[0])[:, None], bank_labels[nearest]), weights)
    return votes


def make_data(seed, num_bank, num_invalid_bank, num_query, num_invalid_query):
    """Class-clustered float32 features; the LAST rows of bank / queries are padding (valid=False) with junk
    labels, and the invalid bank rows are copies of queries, so that counting them would change every answer."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, D))
    bank_labels = rng.integers(0, CLASSES, num_bank).astype(np.int32)
    query_labels = rng.integers(0, CLASSES, num_query).astype(np.int32)
    bank = (centres[bank_labels] + 1.5 * rng.normal(size=(num_bank, D))).astype(np.float32)
    queries = (centres[query_labels] + 1.5 * rng.normal(size=(num_query, D))).astype(np.float32)
    bank_valid = np.arange(num_bank) < num_bank - num_invalid_bank
    query_valid = np.arange(num_query) < num_query - num_invalid_query
    bank[~bank_valid] = 3.0 * queries[:num_invalid_bank]
    bank_labels[~bank_valid] = CLASSES + 7
    query_labels[~query_valid] = -3
    return bank, bank_labels, bank_valid, queries, query_labels, query_valid


def reference(bank, bank_labels, bank_valid, queries, k):
    """NumPy votes over the valid bank rows, after checking that the data have no near-ties that float32 rounding
    could flip (k-th vs (k+1)-th similarity, best vs second-best class)."""
    bank64, queries64 = bank[bank_valid].astype(np.float64), queries.astype(np.float64)
    votes = numpy_votes(bank64, bank_labels[bank_valid], queries64, k, TEMPERATURE, CLASSES)
    sims = np.sort(queries64 @ bank64.T / np.linalg.norm(bank64, axis=1) /
                   np.linalg.norm(queries64, axis=1)[:, None], axis=1)[:, ::-1]
    if k < sims.shape[1]:
        assert np.min(sims[:, k - 1] - sims[:, k]) > 1e-5, "test data has a near-tie at the k-th neighbour"
    top2 = np.sort(votes, axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-4 * top2[:, 1]), "test data has a near-tie between classes"
    return votes


def mesh_4x2():
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))


def mesh_1x1():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))


# batch_axes=() is what batch_sharding gives when every batch mesh axis has size 1: nothing sharded or gathered.
MESHES = [(mesh_1x1, ("data",)), (mesh_1x1, ()), (mesh_4x2, ("data",)), (mesh_4x2, ("data", "fsdp"))]
MESH_IDS = ["1dev", "1dev-no-axes", "8dev-data", "8dev-data-fsdp"]


def shard_rows(mesh, axes, *arrays):
    """Places each array with dim 0 split over `axes` (the layout the loop's features come in)."""
    return [jax.device_put(a, NamedSharding(mesh, PartitionSpec(axes or None, *(None,) * (a.ndim - 1))))
            for a in arrays]


def test_fake_devices_available():
    assert len(jax.devices()) >= 8, "tests/conftest.py should give 8 fake CPU devices"


# 40 bank rows (5 per device on 8), 6 of them padding. k=7 > a shard's 5 rows; k=50 > the 34 valid rows.
@pytest.mark.parametrize("make_mesh,axes", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("k", [7, 50])
def test_votes_match_numpy(make_mesh, axes, k):
    mesh = make_mesh()
    bank, bank_labels, bank_valid, queries, _, _ = make_data(k, 40, 6, 12, 0)
    expected = reference(bank, bank_labels, bank_valid, queries, k)
    bank_d, labels_d, valid_d = shard_rows(mesh, axes, bank, bank_labels, bank_valid)
    votes = knn.knn_votes(bank_d, labels_d, valid_d, queries, k=k, temperature=TEMPERATURE, num_classes=CLASSES,
                          mesh=mesh, batch_axes=axes)
    assert votes.shape == (12, CLASSES) and votes.dtype == np.float32
    assert votes.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(votes), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(votes).argmax(1), expected.argmax(1))
    if k > 34:  # every valid row votes: each class receives the weights of all its valid bank rows
        assert np.all(np.count_nonzero(np.asarray(votes), axis=1) == len(np.unique(bank_labels[bank_valid])))


# 48 queries (6 per device on 8), 5 of them padding; query_chunk=32 -> 4 rows per device per chunk, so the second
# (last) chunk is shifted back and must not count rows twice. One device: chunks of 32, the second shifted.
@pytest.mark.parametrize("make_mesh,axes", MESHES, ids=MESH_IDS)
def test_top1_matches_numpy_sharded(make_mesh, axes):
    mesh = make_mesh()
    bank, bank_labels, bank_valid, queries, query_labels, query_valid = make_data(1, 40, 6, 48, 5)
    expected = reference(bank, bank_labels, bank_valid, queries, 7).argmax(1)
    accuracy = np.mean(expected[query_valid] == query_labels[query_valid])
    assert 0.2 < accuracy < 1.0  # a test that can tell counting errors apart
    arrays = shard_rows(mesh, axes, bank, bank_labels, bank_valid, queries, query_labels, query_valid)
    top1 = knn.knn_top1(*arrays, k=7, temperature=TEMPERATURE, num_classes=CLASSES, mesh=mesh, batch_axes=axes,
                        query_chunk=32)
    assert isinstance(top1, float)
    assert top1 == pytest.approx(accuracy, abs=1e-12)


def test_top1_uneven_host_arrays():
    """Nb=37 and Nq=45 (neither divides 8 shards, nor is Nq a multiple of the chunk), given as host arrays."""
    mesh, axes = mesh_4x2(), ("data", "fsdp")
    bank, bank_labels, bank_valid, queries, query_labels, query_valid = make_data(2, 37, 3, 45, 4)
    k = 9
    expected = reference(bank, bank_labels, bank_valid, queries, k).argmax(1)
    accuracy = np.mean(expected[query_valid] == query_labels[query_valid])
    top1 = knn.knn_top1(bank, bank_labels, bank_valid, queries, query_labels, query_valid, k=k,
                        temperature=TEMPERATURE, num_classes=CLASSES, mesh=mesh, batch_axes=axes, query_chunk=16)
    assert top1 == pytest.approx(accuracy, abs=1e-12)


def _collective_shapes(hlo_text: str) -> list[list[int]]:
    """Result shapes of every cross-device collective in compiled HLO text."""
    ops = r"(?:all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?"
    shapes = []
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(\(?[^=]*?)\s+" + ops + r"\(", line)
        if match:
            shapes += [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"\w+\[([\d,]*)\]",
                                                                                       match.group(1))]
    return shapes


def test_no_bank_sized_collective():
    """Compiled programs move only k candidates per shard and query chunks between devices, never bank rows."""
    mesh, axes = mesh_4x2(), ("data", "fsdp")
    num_bank, num_query, k = 8 * 13, 16, 3
    data = make_data(3, num_bank, 0, num_query, 0)
    arrays = shard_rows(mesh, axes, *data)
    votes_fn = knn._votes_fn(mesh, axes, k, TEMPERATURE, CLASSES)
    top1_fn = knn._top1_counts_fn(mesh, axes, k, TEMPERATURE, CLASSES, 16)
    for compiled in (votes_fn.lower(*arrays[:4]).compile(), top1_fn.lower(*arrays).compile()):
        shapes = _collective_shapes(compiled.as_text())
        assert shapes, "expected the candidate all-gather"
        for shape in shapes:
            assert num_bank not in shape and np.prod(shape) <= num_query * 8 * k, shape


def test_rejects_mismatched_shapes():
    mesh = mesh_1x1()
    bank, bank_labels, bank_valid, queries, _, _ = make_data(0, 8, 0, 4, 0)
    with pytest.raises(ValueError, match="same D"):
        knn.knn_votes(bank, bank_labels, bank_valid, queries[:, :3], k=2, temperature=0.1, num_classes=CLASSES,
                      mesh=mesh, batch_axes=("data",))
    with pytest.raises(ValueError, match="no valid queries"):
        knn.knn_top1(bank, bank_labels, bank_valid, queries, np.zeros(4, np.int32), np.zeros(4, bool), k=2,
                     temperature=0.1, num_classes=CLASSES, mesh=mesh, batch_axes=("data",))
