import numpy as np
import pytest
import scipy.linalg

import sde_diffusion as sd


def _gaussian(rng, n, d, shift):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return shift + rng.normal(size=(n, d)) @ a.T


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    fa, fb = _gaussian(rng, 400, 6, 0.0), _gaussian(rng, 300, 6, 0.5)
    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    # the usual FID form tr((Σa Σb)^{1/2}), through a general (Schur) matrix square root
    cross = np.real(np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)))
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b) - 2 * cross
    np.testing.assert_allclose(sd.frechet_distance(fa, fb), expected, rtol=1e-9)
    np.testing.assert_allclose(sd.frechet_distance(fb, fa), expected, rtol=1e-9)
    assert abs(sd.frechet_distance(fa, fa)) < 1e-9


def test_frechet_distance_of_1d_gaussians_is_the_closed_form():
    # W2²(N(m_a, s_a²), N(m_b, s_b²)) = (m_a − m_b)² + (s_a − s_b)², with the fitted moments
    rng = np.random.default_rng(1)
    fa, fb = 1.0 + 2.0 * rng.normal(size=(500, 1)), -0.5 + 0.3 * rng.normal(size=(200, 1))
    expected = (fa.mean() - fb.mean()) ** 2 + (fa.std(ddof=1) - fb.std(ddof=1)) ** 2
    np.testing.assert_allclose(sd.frechet_distance(fa, fb), expected, rtol=1e-10)
    # and the population value for many samples
    fa, fb = 1.0 + 2.0 * rng.normal(size=(200_000, 1)), -0.5 + 0.3 * rng.normal(size=(200_000, 1))
    np.testing.assert_allclose(sd.frechet_distance(fa, fb), 1.5**2 + 1.7**2, rtol=0.01)


def test_frechet_distance_validation():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        sd.frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"features_b must have shape \(n, d\) with n ≥ 2"):
        sd.frechet_distance(np.zeros((5, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="features_a contains non-finite"):
        sd.frechet_distance(np.full((5, 2), np.nan), np.zeros((5, 2)))


def test_digits_classifier_is_accurate_and_cached():
    (x_train, y_train), (x_test, y_test) = sd.digits_split()
    assert len(x_test) == 449 and len(x_train) == 1348
    classifier = sd.digits_classifier()
    assert classifier.accuracy(x_test, y_test) >= 0.95
    assert classifier.features(x_test).shape == (449, 64)
    np.testing.assert_array_equal(classifier.predict(x_test[:, :, :, 0]), classifier.predict(x_test.reshape(-1, 64)))
    again = sd.digits_classifier()  # the cached weights, not a second training run
    assert again is not classifier and again.head.kernel.get_value() is classifier.head.kernel.get_value()


def test_digits_classifier_training_is_deterministic_in_its_seed():
    (_, _), (x_test, _) = sd.digits_split()
    cached = sd.digits_classifier(0).features(x_test)
    np.testing.assert_array_equal(sd.train_digits_classifier(0).features(x_test), cached)
    assert not np.allclose(sd.train_digits_classifier(1, steps=10).features(x_test), cached)


def _blur(images):
    """3×3 binomial blur with edge padding."""
    kernel = np.outer([1, 2, 1], [1, 2, 1]) / 16
    padded = np.pad(images[..., 0], ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = sum(kernel[i, j] * padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3))
    return out[..., None]


def test_digits_frechet_distance_ranks_real_above_degraded_digits():
    (x_train, _), (x_test, _) = sd.digits_split()
    rng = np.random.default_rng(0)
    real = sd.digits_frechet_distance(x_train)
    assert real == sd.digits_frechet_distance(x_train, reference=x_test)  # default reference: held-out
    degraded = {
        "uniform noise": rng.uniform(-1, 1, x_train.shape),
        "shuffled pixels": x_train.reshape(-1, 64)[:, rng.permutation(64)],
        "blurred": _blur(x_train),
    }
    for name, images in degraded.items():
        assert sd.digits_frechet_distance(images) > 10 * real, name
    assert sd.digits_frechet_distance(x_test, reference=x_test) < 1e-6
    with pytest.raises(ValueError, match="8×8 digit images"):
        sd.digits_frechet_distance(np.zeros((10, 7, 7, 1)))
