import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde_diffusion as sd

TOYS = [sd.moons, sd.swiss_roll, sd.checkerboard, sd.rings, sd.gaussian_mixture]


@pytest.mark.parametrize("toy", TOYS, ids=lambda f: f.__name__)
def test_toy_sets_are_deterministic_float32_and_unit_scale(toy):
    x = toy(4000, seed=1)
    assert x.shape == (4000, 2) and x.dtype == np.float32
    np.testing.assert_array_equal(x, toy(4000, seed=1))
    assert not np.array_equal(x, toy(4000, seed=2))
    assert np.all(np.abs(x.mean(axis=0)) < 0.1)
    assert 0.3 < np.sqrt(np.mean(x**2)) < 1.5 and np.abs(x).max() < 3
    assert toy(1).shape == (1, 2)
    with pytest.raises(ValueError, match="n must be ≥ 1"):
        toy(0)
    with pytest.raises(TypeError, match="n must be an integer"):
        toy(2.5)


def test_checkerboard_only_fills_the_even_squares():
    x = sd.checkerboard(5000)
    cell = np.floor(x + 2).astype(int)
    assert np.all((cell >= 0) & (cell <= 3)) and np.all(cell.sum(axis=1) % 2 == 0)
    counts = np.bincount(4 * cell[:, 0] + cell[:, 1], minlength=16).reshape(4, 4)
    assert counts[0, 0] > 500 and counts[0, 1] == 0  # 8 squares of 625 on average


def test_rings_lie_on_the_given_radii():
    radii = (0.4, 1.3)
    r = np.linalg.norm(sd.rings(3000, radii=radii, noise=0.01), axis=1)
    distance = np.min(np.abs(r[:, None] - np.array(radii)), axis=1)
    assert distance.max() < 0.06 and 0.4 < np.mean(r > 0.85) < 0.6
    with pytest.raises(ValueError, match="radii"):
        sd.rings(10, radii=(1.0, -1.0))


def test_moons_and_swiss_roll_are_affine_images_of_scikit_learn():
    from sklearn.datasets import make_moons, make_swiss_roll

    raw, _ = make_moons(500, noise=0.05, random_state=3)
    np.testing.assert_allclose(sd.moons(500, seed=3) * 0.707 + [0.5, 0.25], raw, atol=1e-5)
    raw, t = make_swiss_roll(500, noise=0.0, random_state=3)
    radius = np.linalg.norm(sd.swiss_roll(500, seed=3, noise=0.0) * 6.8 + [2.0, 2 / (3 * np.pi)], axis=1)
    np.testing.assert_allclose(radius, t, rtol=1e-5)  # the spiral t (cos t, sin t)


def test_gaussian_mixture_samples_its_oracle():
    oracle = sd.gaussian_mixture_oracle()
    assert isinstance(oracle, sd.GaussianMixture)
    np.testing.assert_array_equal(oracle.means, sd.gaussian_mixture_oracle().means)
    np.testing.assert_array_equal(oracle.variances, sd.gaussian_mixture_oracle().variances)
    x = sd.gaussian_mixture(20000, seed=4)
    np.testing.assert_allclose(x, oracle.sample(jax.random.key(4), 20000), rtol=1e-6)
    np.testing.assert_allclose(x.mean(axis=0), oracle.mean(), atol=0.02)
    np.testing.assert_allclose(np.cov(x, rowvar=False), oracle.covariance(), atol=0.02)


def test_digits_images_and_labels():
    x, labels = sd.digits()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int32
    assert x.min() == -1 and x.max() == 1
    grey = (x + 1) * 8  # the original integer grey levels 0..16
    np.testing.assert_array_equal(grey, np.round(grey))
    np.testing.assert_array_equal(np.unique(labels), np.arange(10))


def _examples(n, event=(2,)):
    """x[i] is filled with i, so a batch tells which examples it holds."""
    return np.broadcast_to(np.arange(n, dtype=np.float64).reshape(-1, *([1] * len(event))), (n, *event))


def test_array_dataset_visits_every_example_once_per_epoch():
    n, batch_size = 10, 3
    ds = sd.ArrayDataset(_examples(n), seed=7)
    assert ds.event_shape == (2,) and ds.num_examples == n
    seen = np.concatenate([ds.batch(step, batch_size)[:, 0] for step in range(10)])  # 3 epochs
    assert seen.dtype == np.float32
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(seen[epoch * n : (epoch + 1) * n]), np.arange(n))
    assert not np.array_equal(seen[:n], seen[n : 2 * n])  # a new order each epoch
    # a batch larger than the data wraps: positions 0..24 are epochs 0, 1 and half of 2
    big = sd.ArrayDataset(_examples(n), seed=7).batch(0, 25)[:, 0]
    np.testing.assert_array_equal(big, seen[:25])


def test_array_dataset_is_deterministic_in_seed_and_step():
    ds = sd.ArrayDataset(_examples(50), seed=1)
    first = [ds.batch(step, 8) for step in range(12)]
    np.testing.assert_array_equal(ds.batch(5, 8), first[5])  # any order of requests
    fresh = sd.ArrayDataset(_examples(50), seed=1)
    for step in reversed(range(12)):
        np.testing.assert_array_equal(fresh.batch(step, 8), first[step])
    assert not np.array_equal(sd.ArrayDataset(_examples(50), seed=2).batch(0, 8), first[0])


def test_array_dataset_labels_follow_their_examples():
    x = _examples(12, event=(2, 2))
    ds = sd.ArrayDataset(jnp.asarray(x, dtype=jnp.float32), labels=np.arange(12) * 10, seed=3)
    for step in range(5):
        xb, lb = ds.batch(step, 5)
        assert xb.shape == (5, 2, 2) and lb.shape == (5,)
        np.testing.assert_array_equal(lb, xb[:, 0, 0] * 10)


def test_array_dataset_validation():
    with pytest.raises(ValueError, match="no examples"):
        sd.ArrayDataset(np.zeros((0, 2)))
    x = np.zeros((5, 3, 2))
    x[3, 1, 0], x[4, 2, 1] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"2 non-finite entries .* nan at index \(3, 1, 0\)"):
        sd.ArrayDataset(x)
    with pytest.raises(ValueError, match="non-finite"):  # overflows float32
        sd.ArrayDataset(np.full((2, 2), 1e300))
    with pytest.raises(ValueError, match=r"ndim ≥ 2, got shape \(5,\)"):
        sd.ArrayDataset(np.zeros(5))
    with pytest.raises(ValueError, match="real numbers"):
        sd.ArrayDataset(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match=r"labels of x have shape \(4,\), expected \(5,\)"):
        sd.ArrayDataset(np.zeros((5, 2)), labels=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="labels of x must be integers"):
        sd.ArrayDataset(np.zeros((5, 2)), labels=np.zeros(5))
    with pytest.raises(ValueError, match="expected"):
        sd.ArrayDataset(np.zeros((5, 2)), labels=np.zeros((5, 1), dtype=int))
    with pytest.raises(ValueError, match="seed"):
        sd.ArrayDataset(np.zeros((5, 2)), seed=-1)
    ds = sd.ArrayDataset(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="batch_size must be ≥ 1"):
        ds.batch(0, 0)
    with pytest.raises(ValueError, match="step must be ≥ 0"):
        ds.batch(-1, 2)


def _stream(n_batches, batch_size=4, labels=False):
    """Batch k is filled with k."""
    for k in range(n_batches):
        x = np.full((batch_size, 3), float(k))
        yield (x, np.full(batch_size, k)) if labels else x


def test_iterator_dataset_hands_out_checked_batches_in_order():
    ds = sd.IteratorDataset(_stream(5, labels=True))
    assert ds.event_shape == (3,) and ds.num_examples is None  # peeking keeps batch 0
    for step in range(3):
        x, labels = ds.batch(step, 4)
        assert x.dtype == np.float32 and np.all(x == step) and np.all(labels == step)
    with pytest.raises(ValueError, match="expected batch_size = 8"):
        ds.batch(3, 8)
    with pytest.raises(ValueError, match="stream ended after 5 batches"):
        ds.batch(6, 4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((4, 2), 1.0), r"batch 1 has event shape \(2,\), but the first batch had \(3,\)"),
        (np.array([[0.0, np.nan, 0.0]] * 4), r"batch 1 has 4 non-finite entries .* index \(0, 1\)"),
        (np.zeros(4), "ndim ≥ 2"),
        ((np.zeros((4, 3)), np.zeros(3, dtype=int)), r"labels of batch 1 have shape \(3,\)"),
    ],
    ids=["event_shape", "nan", "1d", "labels"],
)
def test_iterator_dataset_rejects_bad_batches(bad, message):
    ds = sd.IteratorDataset([np.zeros((4, 3)), bad])
    ds.batch(0, 4)
    with pytest.raises(ValueError, match=message):
        ds.batch(1, 4)


def test_iterator_dataset_resume_semantics():
    # from a callable: a fresh dataset skips ahead to the resumed step, and can go back
    ds = sd.IteratorDataset(lambda: _stream(10))
    assert np.all(ds.batch(6, 4) == 6)
    assert np.all(ds.batch(7, 4) == 7)
    assert np.all(ds.batch(2, 4) == 2)  # replayed from the start
    # a list replays too
    ds = sd.IteratorDataset(list(_stream(4)))
    assert np.all(ds.batch(3, 4) == 3) and np.all(ds.batch(1, 4) == 1)
    # a one-shot iterator skips ahead but cannot go back
    ds = sd.IteratorDataset(_stream(10))
    assert np.all(ds.batch(4, 4) == 4)
    assert np.all(ds.batch(5, 4) == 5)
    with pytest.raises(ValueError, match="step 3 is behind the stream .at step 6."):
        ds.batch(3, 4)
    with pytest.raises(TypeError, match="iterable of batches or a callable"):
        sd.IteratorDataset(3)


def test_as_dataset_dispatch():
    x = np.random.default_rng(0).normal(size=(6, 2))
    for arr in (x, jnp.asarray(x)):
        ds = sd.as_dataset(arr, seed=4)
        assert isinstance(ds, sd.ArrayDataset) and ds.seed == 4
        np.testing.assert_allclose(np.sort(ds.batch(0, 6), axis=0), np.sort(x, axis=0), rtol=1e-6)
    labelled = sd.as_dataset((x, np.arange(6)))
    assert isinstance(labelled, sd.ArrayDataset) and labelled.labels is not None
    assert sd.as_dataset(labelled) is labelled
    stream = sd.IteratorDataset(_stream(3))
    assert sd.as_dataset(stream) is stream and stream.batch(0, 4) is not None  # not consumed by the check

    class Custom:  # any object with the protocol's members
        event_shape, num_examples = (2,), None

        def batch(self, step, batch_size):
            return np.zeros((batch_size, 2))

    custom = Custom()
    assert sd.as_dataset(custom) is custom
    assert isinstance(sd.as_dataset(_stream(2)), sd.IteratorDataset)
    assert isinstance(sd.as_dataset(lambda: _stream(2)), sd.IteratorDataset)
    assert isinstance(sd.as_dataset([np.zeros((4, 3))]), sd.IteratorDataset)
    for bad, message in [(5, "cannot make a dataset of int"), ("digits", "str"), ((x, x, x), "read as .x, labels.")]:
        with pytest.raises(TypeError, match=message):
            sd.as_dataset(bad)


def test_train_test_split_partitions_the_examples():
    x, labels = _examples(40)[:, 0], np.arange(40) + 100
    (x_train, l_train), (x_test, l_test) = sd.train_test_split(x, labels, test_fraction=0.25, seed=2)
    assert len(x_test) == 10 and len(x_train) == 30
    np.testing.assert_array_equal(np.sort(np.concatenate([x_train, x_test])), x)
    np.testing.assert_array_equal(l_train, x_train + 100)
    np.testing.assert_array_equal(l_test, x_test + 100)
    train, test = sd.train_test_split(x, test_fraction=0.25, seed=2)
    np.testing.assert_array_equal(test, x_test)
    assert not np.array_equal(sd.train_test_split(x, test_fraction=0.25, seed=3)[1], x_test)
    with pytest.raises(ValueError, match="test_fraction"):
        sd.train_test_split(x, test_fraction=1.0)
    with pytest.raises(ValueError, match="empty part"):
        sd.train_test_split(x[:2], test_fraction=0.1)
    with pytest.raises(ValueError, match="labels have shape"):
        sd.train_test_split(x, labels[:5])
