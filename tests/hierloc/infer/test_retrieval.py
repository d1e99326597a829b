"""Retrieval baseline: the nearest training feature by cosine, FAISS and numpy agreeing."""

import numpy as np
import pytest

from hierloc.infer.retrieval import RetrievalIndex


def test_nearest_by_cosine_and_backends_agree():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(500, 16)).astype(np.float32)
    q = train[[3, 77, 420]] * np.array([[2.0], [0.5], [10.0]], dtype=np.float32)  # same directions, other norms
    for faiss in (True, False):
        res = RetrievalIndex(train, use_faiss=faiss).search(q, k=3)
        assert list(res.rows[:, 0]) == [3, 77, 420]
        np.testing.assert_allclose(res.similarity[:, 0], 1.0, atol=1e-5)
        assert np.all(np.diff(res.similarity, axis=1) <= 1e-6)
    other = rng.normal(size=(200, 16)).astype(np.float32)
    a = RetrievalIndex(train).search(other, k=5)
    b = RetrievalIndex(train, use_faiss=False).search(other, k=5)
    assert (a.rows == b.rows).mean() > 0.99  # float32 near-ties only


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        RetrievalIndex(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="NaN"):
        RetrievalIndex(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"queries must be \(B, 2\)"):
        RetrievalIndex(np.ones((3, 2))).search(np.ones((1, 3)))
