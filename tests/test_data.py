"""rnn_jax.data: windows, shuffled and sequential training batches, evaluation batches.

Most tests use the corpus ``np.arange(N)``, where token value = position, so the
position of every window can be read off its first token.
"""

import numpy as np
import pytest

from rnn_jax import data

T = 5


def windows(n=200, num_steps=T, num_train=43, num_val=17):
    return data.make_windows(np.arange(n), num_steps, num_train, num_val)


# --- windows ----------------------------------------------------------------


def test_window_counts_and_shift():
    w = windows(n=100)
    assert w.num_windows == 100 - T
    x, y = w.take(np.arange(w.num_windows))
    assert x.shape == y.shape == (100 - T, T) and x.dtype == y.dtype == np.int32
    expect = np.arange(100 - T)[:, None] + np.arange(T)
    np.testing.assert_array_equal(x, expect)
    np.testing.assert_array_equal(y, expect + 1)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_windows_match_the_book_on_a_random_corpus():
    corpus = np.random.default_rng(0).integers(0, 28, size=60)
    w = data.make_windows(corpus, num_steps=4, num_train=30, num_val=20)
    book = np.array([corpus[i : i + 5] for i in range(len(corpus) - 4)])
    x, y = w.take(np.arange(w.num_windows))
    np.testing.assert_array_equal(x, book[:, :-1])
    np.testing.assert_array_equal(y, book[:, 1:])


def test_train_val_boundaries():
    w = windows()
    train = np.concatenate([b.x[b.weight > 0] for b in data.eval_batches(w, 8, "train")])
    val = np.concatenate([b.x[b.weight > 0] for b in data.eval_batches(w, 8, "val")])
    np.testing.assert_array_equal(train[:, 0], np.arange(43))
    np.testing.assert_array_equal(val[:, 0], np.arange(43, 43 + 17))
    np.testing.assert_array_equal(w.train_tokens, np.arange(43 + T))


def test_exactly_enough_windows_is_fine():
    w = data.make_windows(np.arange(60 + T), T, num_train=43, num_val=17)
    last = list(data.eval_batches(w, 17, "val"))[-1]
    assert last.y.max() == 60 + T - 1


def test_ids_are_a_read_only_int32_copy():
    ids = np.arange(100, dtype=np.int64)
    w = data.make_windows(ids, T, 10, 10)
    ids[0] = 99
    assert w.ids.dtype == np.int32 and w.ids[0] == 0
    with pytest.raises(ValueError):
        w.ids[0] = 1


def test_text_shorter_than_one_window():
    with pytest.raises(ValueError, match=r"4 tokens.*num_steps") as e:
        data.make_windows(np.arange(4), num_steps=4, num_train=1, num_val=1)
    assert "num_steps + 1 = 5" in str(e.value)


def test_too_many_windows_requested():
    with pytest.raises(ValueError, match="num_train") as e:
        data.make_windows(np.arange(100), num_steps=T, num_train=80, num_val=16)
    msg = str(e.value)
    assert "num_val" in msg and "96 windows" in msg and f"only {100 - T} windows" in msg


@pytest.mark.parametrize("name", ["num_steps", "num_train", "num_val"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_window_arguments_must_be_positive_ints(name, bad):
    args = dict(num_steps=T, num_train=10, num_val=10)
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        data.make_windows(np.arange(100), **args)


def test_ids_must_be_integer_vector():
    with pytest.raises(ValueError, match="1-D"):
        data.make_windows(np.zeros((10, 10), np.int32), T, 1, 1)
    with pytest.raises(ValueError, match="integers"):
        data.make_windows(np.zeros(100), T, 1, 1)


# --- shuffled window batches -------------------------------------------------


def test_batches_are_deterministic():
    w = windows()
    a = data.train_batch(w, 8, seed=3, epoch=2, step=1)
    b = data.train_batch(w, 8, seed=3, epoch=2, step=1)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert a.x.dtype == np.int32 and a.y.dtype == np.int32 and a.weight.dtype == np.float32


def test_epochs_and_seeds_reorder():
    w = windows()
    first = data.train_batch(w, 8, seed=3, epoch=0, step=0).x[:, 0]
    assert not np.array_equal(first, data.train_batch(w, 8, seed=3, epoch=1, step=0).x[:, 0])
    assert not np.array_equal(first, data.train_batch(w, 8, seed=4, epoch=0, step=0).x[:, 0])


def test_epoch_order_is_the_documented_permutation():
    w = windows()
    perm = np.random.default_rng([7, 5]).permutation(43)
    got = np.concatenate([data.train_batch(w, 10, 7, 5, s).x[:, 0] for s in range(4)])
    np.testing.assert_array_equal(got, perm[:40])


@pytest.mark.parametrize("batch_size", [1, 8, 43, 50])
def test_every_training_window_once_per_epoch(batch_size):
    w = windows()
    steps = data.steps_per_epoch(w, batch_size)
    assert steps == -(-43 // batch_size)
    batches = [data.train_batch(w, batch_size, 0, 1, s) for s in range(steps)]
    starts = np.concatenate([b.x[b.weight > 0, 0] for b in batches])
    assert sorted(starts.tolist()) == list(range(43))
    assert sum(b.weight.sum() for b in batches) == 43
    for b in batches:
        assert b.x.shape == b.y.shape == (batch_size, T) and b.weight.shape == (batch_size,)
        np.testing.assert_array_equal(b.y, b.x + 1)


def test_partial_batch_padding_has_weight_zero():
    w = windows()  # 43 = 5 * 8 + 3
    last = data.train_batch(w, 8, seed=0, epoch=0, step=5)
    np.testing.assert_array_equal(last.weight, [1, 1, 1, 0, 0, 0, 0, 0])
    # padding repeats the valid rows, so it never reads outside the training windows
    np.testing.assert_array_equal(last.x[3:6], last.x[:3])
    # the weighted per-token mean equals the plain mean over the valid rows
    loss = np.random.default_rng(1).random((8, T))
    weighted = (loss * last.weight[:, None]).sum() / (last.weight.sum() * T)
    assert np.isclose(weighted, loss[:3].mean())


def test_full_batches_have_all_weights_one():
    w = windows()
    for s in range(5):
        assert data.train_batch(w, 8, 0, 0, s).weight.tolist() == [1.0] * 8


def test_step_out_of_range():
    w = windows()
    with pytest.raises(ValueError, match=r"step must be < steps_per_epoch = 6"):
        data.train_batch(w, 8, 0, 0, 6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
        (dict(epoch=-1), "epoch"),
        (dict(step=-1), "step"),
        (dict(partition="random"), "partition"),
    ],
)
def test_train_batch_argument_errors(kwargs, name):
    args = dict(batch_size=8, seed=0, epoch=0, step=0, partition="windows") | kwargs
    with pytest.raises(ValueError, match=name):
        data.train_batch(windows(), **args)


def test_unknown_partition_in_steps_per_epoch():
    with pytest.raises(ValueError, match="partition must be one of windows, sequential"):
        data.steps_per_epoch(windows(), 8, partition="bucket")


# --- evaluation batches -----------------------------------------------------


@pytest.mark.parametrize("split, count, first", [("train", 43, 0), ("val", 17, 43)])
def test_eval_batches_in_order_with_padding(split, count, first):
    w = windows()
    batches = list(data.eval_batches(w, 8, split))
    assert len(batches) == data.eval_steps(w, 8, split) == -(-count // 8)
    assert all(b.x.shape == (8, T) for b in batches)
    assert sum(b.weight.sum() for b in batches) == count
    valid = np.concatenate([b.x[b.weight > 0, 0] for b in batches])
    np.testing.assert_array_equal(valid, np.arange(first, first + count))
    assert batches[-1].weight[-1] == 0


def test_eval_bad_arguments_are_refused_when_called():
    """(As a generator it refused them only when the first batch was drawn.)"""
    with pytest.raises(ValueError, match="split must be one of train, val"):
        data.eval_batches(windows(), 8, "test")
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        data.eval_batches(windows(), 0)


# --- sequential batches -----------------------------------------------------


@pytest.mark.parametrize("num_train", [43, 49])  # 49: one token short of a 5th batch
def test_sequential_steps_per_epoch_is_constant(num_train):
    w = windows(num_train=num_train)
    assert data.steps_per_epoch(w, 2, "sequential") == num_train // (2 * T) == 4
    for epoch in range(20):  # all offsets 0..T-1 come up
        for step in range(4):
            b = data.train_batch(w, 2, 9, epoch, step, "sequential")
            assert b.x.shape == b.y.shape == (2, T)
            assert b.y.max() < num_train + T  # only the tokens the training windows cover


def test_sequential_offsets_cover_all_values():
    w = windows()
    firsts = {int(data.train_batch(w, 2, 9, e, 0, "sequential").x[0, 0]) for e in range(40)}
    assert firsts == set(range(T))


def test_sequential_rows_continue_across_batches():
    corpus = np.random.default_rng(0).integers(0, 28, size=500)
    w = data.make_windows(corpus, num_steps=T, num_train=300, num_val=100)
    steps = data.steps_per_epoch(w, 4, "sequential")
    for epoch in range(3):
        batches = [data.train_batch(w, 4, 1, epoch, s, "sequential") for s in range(steps)]
        xs = np.concatenate([b.x for b in batches], axis=1)
        ys = np.concatenate([b.y for b in batches], axis=1)
        for r in range(4):  # each row is one contiguous stretch of the corpus
            start = np.flatnonzero(
                [np.array_equal(corpus[i : i + xs.shape[1]], xs[r]) for i in range(T + 300)]
            )
            assert start.size >= 1
            np.testing.assert_array_equal(ys[r], corpus[start[0] + 1 : start[0] + 1 + xs.shape[1]])
        for a, b in zip(batches, batches[1:], strict=False):
            np.testing.assert_array_equal(b.x[:, 0], a.y[:, -1])


def test_sequential_continuity_on_arange():
    w = windows(n=500, num_train=300, num_val=100)
    steps = data.steps_per_epoch(w, 3, "sequential")
    assert steps == 300 // (3 * T)
    for epoch in range(4):
        batches = [data.train_batch(w, 3, 0, epoch, s, "sequential") for s in range(steps)]
        for a, b in zip(batches, batches[1:], strict=False):
            np.testing.assert_array_equal(b.x[:, 0], a.x[:, -1] + 1)
            np.testing.assert_array_equal(b.x[:, 0], a.y[:, -1])
        for b in batches:
            np.testing.assert_array_equal(b.y, b.x + 1)
            np.testing.assert_array_equal(b.weight, np.ones(3, np.float32))
        # the streams are disjoint, consecutive stretches of the corpus
        x = np.concatenate([b.x for b in batches], axis=1)
        np.testing.assert_array_equal(np.diff(x.reshape(-1)), np.ones(x.size - 1))


def test_sequential_is_deterministic_and_depends_on_epoch():
    w = windows(n=500, num_train=300, num_val=100)
    a = data.train_batch(w, 3, 5, 2, 1, "sequential")
    b = data.train_batch(w, 3, 5, 2, 1, "sequential")
    np.testing.assert_array_equal(a.x, b.x)
    offsets = {int(data.train_batch(w, 3, 5, e, 0, "sequential").x[0, 0]) for e in range(10)}
    assert len(offsets) > 1


def test_sequential_zero_batches():
    w = windows(num_train=43)
    with pytest.raises(ValueError, match=r"batch_size.*num_steps") as e:
        data.steps_per_epoch(w, 9, "sequential")  # 9 * 5 = 45 > 43
    assert "needs num_steps = 5 tokens" in str(e.value)
    with pytest.raises(ValueError, match="0 batches per epoch"):
        data.train_batch(w, 9, 0, 0, 0, "sequential")


@pytest.mark.parametrize("bad", [-1, 2**31])
def test_ids_outside_int32_token_range_are_refused(bad):
    """Negative ids, and ids beyond int32 (they wrapped around to negative ones)."""
    ids = np.arange(20, dtype=np.int64)
    ids[3] = bad
    with pytest.raises(ValueError, match=rf"ids must be in \[0, 2\*\*31\).*got {bad}"):
        data.make_windows(ids, 4, 4, 2)
