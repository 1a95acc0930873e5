"""featcache.knn: uniform votes give scikit-learn's brute-force cosine k-NN predictions exactly, the blocked
search (any block sizes, a cache read block by block) equals one product over everything, the temperature
votes follow exp(sim / T), k is selected on val, and a k above the train rows is a user error."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from featcache import metrics
from featcache.cache import FeatureReader
from featcache.errors import UserError
from featcache.knn import (QUERY_BLOCK, TEMPERATURE, array_blocks, check_ks, fit_knn, head_scores, nearest_neighbours,
                           query_block_rows, reader_blocks, select_k, vote_shares)

from synthetic import gaussian_problem, write_cache

KS = (1, 5, 10, 25)


def _cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float64) @ b.T.astype(np.float64)


def _assert_no_boundary_ties(queries, train, ks):
    """The data has no near-equal similarities at any k-th/(k+1)-th boundary, so the neighbour SET of every k
    is the same whatever the order of equal values or float32 rounding (what makes exact equality fair)."""
    s = -np.sort(-_cosine(queries, train), axis=1)
    for k in ks:
        if k < train.shape[0]:
            assert (s[:, k - 1] - s[:, k]).min() > 1e-5


@pytest.mark.parametrize("num_classes", [2, 4])
def test_uniform_votes_predict_what_sklearn_brute_cosine_predicts(num_classes):
    (x, y), (x_val, y_val), (x_test, y_test) = gaussian_problem(num_classes, n=(300, 60, 60), dim=8, seed=10)
    queries = np.concatenate([x_val, x_test])
    _assert_no_boundary_ties(queries, x, KS)
    sims, rows = nearest_neighbours(queries, array_blocks(x, 64), k=KS[-1])
    for k, shares in zip(KS, vote_shares(y[rows], sims, ks=KS, num_classes=num_classes, temperature=None)):
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x, y)
        ours = metrics.predict(head_scores(shares, num_classes), num_classes)
        np.testing.assert_array_equal(ours, ref.predict(queries))
    fit = fit_knn((x, y), (x_val, y_val), (x_test, y_test), num_classes=num_classes, ks=KS, temperature=None)
    ref = KNeighborsClassifier(n_neighbors=fit.k, metric="cosine", algorithm="brute").fit(x, y)
    np.testing.assert_array_equal(metrics.predict(fit.test_scores, num_classes), ref.predict(x_test))
    assert fit.summary.test_acc == ref.score(x_test, y_test)
    assert fit.test_scores.shape == (60, 1 if num_classes == 2 else num_classes)


def test_vote_ties_go_to_the_first_class_as_in_sklearn():
    # query at the origin-free direction (1, 0): two neighbours of class 2 and two of class 0, none closer
    train = np.array([[1, 0.1], [1, -0.2], [1, 0.3], [1, -0.4], [-1, 0]], dtype=np.float32)
    y = np.array([2, 0, 2, 0, 1])
    q = np.array([[1, 0]], dtype=np.float32)
    sims, rows = nearest_neighbours(q, [train], k=4)
    assert rows[0].tolist() == [0, 1, 2, 3]
    (shares,) = vote_shares(y[rows], sims, ks=[4], num_classes=3, temperature=None)
    assert shares[0].tolist() == [0.5, 0.0, 0.5]
    ref = KNeighborsClassifier(n_neighbors=4, metric="cosine", algorithm="brute").fit(train, y)
    assert metrics.predict(shares, 3).tolist() == ref.predict(q).tolist() == [0]


def test_blocked_search_equals_one_product_and_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 16)).astype(np.float32)
    q = rng.normal(size=(37, 16)).astype(np.float32)
    k = 20
    whole = nearest_neighbours(q, [x], k=k)
    for block_rows, block_bytes in ((7, 4 * 7 * 3), (50, 4 * 50 * 16), (203, 1 << 30)):
        sims, rows = nearest_neighbours(q, array_blocks(x, block_rows), k=k, block_bytes=block_bytes)
        np.testing.assert_array_equal(rows, whole[1])
        np.testing.assert_allclose(sims, whole[0], rtol=0, atol=1e-6)  # float32 products round by block shape
    ref = _cosine(q, x)
    order = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(whole[1], order)
    np.testing.assert_allclose(whole[0], np.take_along_axis(ref, order, axis=1), atol=1e-6)
    assert (np.diff(whole[0], axis=1) <= 0).all()


def test_similarity_blocks_stay_within_the_memory_bound():
    assert query_block_rows(50_000, 65_536, block_bytes=256 * 2 ** 20) == 1024 == QUERY_BLOCK
    assert query_block_rows(50_000, 1_000_000, block_bytes=256 * 2 ** 20) == 67  # 67 x 1e6 x 4 B <= 256 MiB
    assert query_block_rows(10, 100) == 10
    assert query_block_rows(10, 10 ** 12, block_bytes=1) == 1


def test_a_cache_read_block_by_block_gives_the_in_memory_result(tmp_path):
    train, val, test = gaussian_problem(3, n=(150, 30, 30), dim=8, seed=5)
    path = write_cache(tmp_path / "c.h5", {"train": train, "val": val, "test": test}, ["a", "b", "c"])
    in_memory = fit_knn(train, val, test, num_classes=3, ks=[3, 9])
    with FeatureReader(path) as reader:
        streamed = fit_knn((reader_blocks(reader, "train", 40), reader.labels("train")), val, test,
                           num_classes=3, ks=[3, 9], block_bytes=4 * 40 * 8)
    np.testing.assert_array_equal(streamed.test_neighbours, in_memory.test_neighbours)
    np.testing.assert_allclose(streamed.test_scores, in_memory.test_scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(streamed.val_acc, in_memory.val_acc)
    np.testing.assert_array_equal(streamed.test_acc, in_memory.test_acc)


def test_temperature_votes_weigh_each_neighbour_by_exp_sim_over_t():
    labels = np.array([[1, 0, 0, 2]])
    sims = np.array([[0.99, 0.9, 0.85, 0.5]])
    weighted = list(vote_shares(labels, sims, ks=[1, 3, 4], num_classes=3))
    uniform = list(vote_shares(labels, sims, ks=[3], num_classes=3, temperature=None))
    w = np.exp(sims[0] / TEMPERATURE)
    np.testing.assert_allclose(weighted[1][0], np.array([w[1] + w[2], w[0], 0]) / w[:3].sum())
    np.testing.assert_allclose(weighted[2][0], np.array([w[1] + w[2], w[0], w[3]]) / w.sum())
    assert weighted[0][0].tolist() == [0, 1, 0]
    # one very close neighbour outvotes two farther ones at T = 0.07, not with uniform votes
    assert metrics.predict(weighted[1], 3)[0] == 1 and metrics.predict(uniform[0], 3)[0] == 0


def test_k_is_selected_on_val_with_ties_to_the_smaller_k():
    assert select_k([0.5, 0.7, 0.7, 0.6]) == 1
    assert select_k([0.9, 0.7]) == 0
    train, val, test = gaussian_problem(2, n=(100, 40, 40), dim=8, seed=7)
    fit = fit_knn(train, val, test, num_classes=2, ks=[1, 3, 15, 31])
    assert fit.val_acc[fit.selected] == fit.val_acc.max()
    assert fit.selected == int(np.flatnonzero(fit.val_acc == fit.val_acc.max())[0])
    assert fit.history[0].val_acc == fit.val_acc[fit.selected] and fit.to_dict()["selected_k"] == fit.k


def test_default_ks_are_clipped_and_a_k_above_the_train_rows_is_a_user_error():
    assert check_ks(None, 1000) == (10, 20, 100, 200)
    assert check_ks(None, 15) == (10, 15)
    assert check_ks([20, 5, 5], 30) == (5, 20)
    with pytest.raises(UserError, match="k = 500 is larger than the 300 train rows; give k values up to 300"):
        check_ks([10, 500], 300)
    with pytest.raises(UserError, match="at least 1"):
        check_ks([0, 3], 300)
    train, val, test = gaussian_problem(2, n=(20, 10, 10), dim=4, seed=1)
    with pytest.raises(UserError, match="larger than the 20 train rows"):
        fit_knn(train, val, test, num_classes=2, ks=[21])
