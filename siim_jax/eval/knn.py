"""Weighted k-NN classification on frozen features (cosine similarity, votes exp(sim / T), DINO style)."""

import numpy as np


def knn_top1(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
             k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> float:
    """bank (Nb, D), queries (Nq, D) features; labels int. Returns top-1 accuracy in [0, 1]."""
    num_classes = int(max(bank_labels.max(), query_labels.max()) + 1) if num_classes is None else num_classes
    bank = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    sims = queries @ bank.T  # (Nq, Nb)
    k = min(k, bank.shape[0])
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
    votes = np.zeros((queries.shape[0], num_classes))
    np.add.at(votes, (np.arange(queries.shape[0])[:, None], bank_labels[nearest]), weights)
    return float(np.mean(votes.argmax(1) == query_labels))
