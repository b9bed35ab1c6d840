"""CMMD, CLIP-FD, CLIP-KID and diversity against hand computations on small known embeddings."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from evaluator.distribution_metrics import MIN_SAMPLES, clip_fd, clip_kid, cmmd, concept_distribution, diversity


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clouds(seed: int = 0, n: int = 7, m: int = 5, d: int = 8, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=d) * 2
    return centre + rng.normal(size=(n, d)), centre + shift + rng.normal(size=(m, d))


def _rbf(a: np.ndarray, b: np.ndarray) -> float:
    return math.exp(-float(np.sum((a - b) ** 2)) / (2 * 10.0**2))


def test_cmmd_equals_the_double_loop_of_both_estimators():
    x, y = _clouds()
    u, v = _unit(x), _unit(y)
    n, m = len(u), len(v)
    within_u = [_rbf(u[i], u[j]) for i in range(n) for j in range(n) if i != j]
    within_v = [_rbf(v[i], v[j]) for i in range(m) for j in range(m) if i != j]
    cross = [_rbf(a, b) for a in u for b in v]
    unbiased = 1000 * (sum(within_u) / (n * (n - 1)) + sum(within_v) / (m * (m - 1)) - 2 * np.mean(cross))
    # The reference code's V-statistic: every pair, i = j (kernel 1) included.
    biased = 1000 * ((sum(within_u) + n) / n**2 + (sum(within_v) + m) / m**2 - 2 * np.mean(cross))
    assert cmmd(x, y) == pytest.approx(unbiased, abs=1e-6)
    assert cmmd(torch.tensor(x, dtype=torch.float32), y, unbiased=False) == pytest.approx(biased, abs=1e-6)
    assert cmmd(3 * x, y) == pytest.approx(cmmd(x, y), abs=1e-6)  # normalised first (in float32): the norm does not count
    assert cmmd(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-9)
    # A set against itself: the U-statistic is below 0 by 2/n of the mean within-set kernel distance.
    assert cmmd(x, x) == pytest.approx(-2000 / n * (1 - np.mean(within_u)), abs=1e-6)
    far, near = _clouds(shift=3.0), _clouds(shift=0.1)
    assert cmmd(*far) > cmmd(*near)


def _fd(mu1, s1, mu2, s2) -> float:
    """The Fréchet distance of two Gaussians with commuting (here diagonal) covariances."""
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.diag(s1) * np.diag(s2))))


def test_clip_fd_equals_the_closed_form_of_known_means_and_covariances():
    e = np.eye(3)
    # Means 0; covariances (over n - 1 = 3) diag(2/3, 2/3, 0) and diag(0, 2/3, 2/3): FD = 4/3 + 4/3 - 2 * 2/3.
    a, b = np.stack([e[0], -e[0], e[1], -e[1]]), np.stack([e[2], -e[2], e[1], -e[1]])
    assert clip_fd(a, b) == pytest.approx(4 / 3, abs=1e-6)
    assert clip_fd(a, b) == pytest.approx(_fd(np.zeros(3), np.diag([2, 2, 0]) / 3, np.zeros(3), np.diag([0, 2, 2]) / 3), abs=1e-6)
    # Unit vectors (cos t, +-sin t, 0) and (cos s, 0, +-sin s): means (cos t, 0, 0) and (cos s, 0, 0),
    # covariances 2 sin^2 t e2 e2' and 2 sin^2 s e3 e3', whose product is 0.
    t, s = 0.4, 1.1
    p = np.array([[math.cos(t), math.sin(t), 0], [math.cos(t), -math.sin(t), 0]])
    q = np.array([[math.cos(s), 0, math.sin(s)], [math.cos(s), 0, -math.sin(s)]])
    want = (math.cos(t) - math.cos(s)) ** 2 + 2 * math.sin(t) ** 2 + 2 * math.sin(s) ** 2
    assert clip_fd(p, 5 * q) == pytest.approx(want, abs=1e-6)
    x, _ = _clouds(n=40, d=4)
    assert clip_fd(x, x) == pytest.approx(0.0, abs=1e-5)


def _poly_mmd(u: np.ndarray, v: np.ndarray) -> float:
    """KID's unbiased estimate for one pair of equal-size subsets, kernel (a.b / d + 1)^3."""
    d, m = u.shape[1], len(u)
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    within = sum(k(u[i], u[j]) for i in range(m) for j in range(m) if i != j) + \
        sum(k(v[i], v[j]) for i in range(m) for j in range(m) if i != j)
    return within / (m * (m - 1)) - 2 * sum(k(a, b) for a in u for b in v) / m**2


def test_clip_kid_equals_the_polynomial_kernel_mmd():
    x, y = _clouds(n=6, m=6)
    u, v = _unit(x), _unit(y)
    # Equal sizes: every subset is the whole of both sets, so each of the subsets gives this value.
    assert clip_kid(x, y) == pytest.approx(_poly_mmd(u, v), rel=1e-6)
    assert clip_kid(y, x) == pytest.approx(_poly_mmd(u, v), rel=1e-6)
    # 5 generated vs 3 reference: the reference whole, the generated subsampled to 3. The mean over
    # many random subsets approaches the mean over all C(5, 3) of them.
    x, y = _clouds(seed=2, n=5, m=3)
    u, v = _unit(x), _unit(y)
    each = [_poly_mmd(u[list(c)], v) for c in itertools.combinations(range(5), 3)]
    draws = 2000
    assert clip_kid(x, y, subsets=draws) == pytest.approx(np.mean(each), abs=4 * np.std(each) / math.sqrt(draws))
    assert clip_kid(x, y, subset_size=2) != pytest.approx(clip_kid(x, y), abs=1e-12)
    with pytest.raises(ValueError, match=r"subset_size must be in \[2, 3\]"):
        clip_kid(x, y, subset_size=4)


def test_clip_kid_is_seeded_and_leaves_the_global_rng_alone():
    x, y = _clouds(n=9, m=4)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    first = clip_kid(x, y)
    assert torch.equal(torch.rand(3), want)
    assert clip_kid(x, y) == first
    assert clip_kid(x, y, seed=1) != first


def test_diversity_of_identical_orthogonal_and_mixed_prompts():
    e = np.eye(4)
    assert diversity(np.stack([e[0]] * 4), ["p"] * 4) == pytest.approx(0.0, abs=1e-12)
    assert diversity(e, ["p"] * 4) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(7, 5))
    prompts = ["a", "a", "a", "b", "b", "c", "a"]  # c has one image: no pair, left out
    u = _unit(emb)

    def mean_distance(rows):
        return np.mean([1 - u[i] @ u[j] for i in rows for j in rows if i < j])

    want = np.mean([mean_distance([0, 1, 2, 6]), mean_distance([3, 4])])  # per prompt, then over prompts
    assert diversity(emb, prompts) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match=f"at least {MIN_SAMPLES} images of one prompt"):
        diversity(emb[:3], ["a", "b", "c"])
    with pytest.raises(ValueError, match="one prompt per embedding"):
        diversity(emb, ["a"])


@pytest.mark.parametrize("metric", [cmmd, clip_fd, clip_kid])
def test_bad_inputs_are_clear_errors(metric):
    x, y = _clouds()
    name = metric.__name__
    with pytest.raises(ValueError, match=f"{name} needs at least 2 images in each set, got 1 generated"):
        metric(x[:1], y)
    with pytest.raises(ValueError, match="got 1 reference"):
        metric(x, y[:1])
    with pytest.raises(ValueError, match="must be 2-D"):
        metric(x[0], y)
    bad = x.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric(bad, y)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        metric(x, y[:, :4])


def test_concept_distribution_counts_a_repeated_image_once_and_reports_none_without_inputs():
    x, train = _clouds(seed=5, n=6, m=4)
    keys = [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    out = concept_distribution(x, keys, train)
    assert out == pytest.approx({"cmmd": cmmd(x, train), "clip_fd": clip_fd(x, train), "clip_kid": clip_kid(x, train),
                                 "diversity": diversity(x, [p for p, _ in keys])})
    # The trigger test repeating prompt "a" at seeds 0 and 1: the same two images again.
    again = concept_distribution(np.concatenate([x, x[:2]]), [*keys, ("a", 0), ("a", 1)], train)
    assert again == pytest.approx(out)
    assert concept_distribution(x, keys, None) == {"cmmd": None, "clip_fd": None, "clip_kid": None,
                                                   "diversity": out["diversity"]}
    one_each = concept_distribution(x[:1], keys[:1], train[:1])
    assert one_each == dict.fromkeys(("cmmd", "clip_fd", "clip_kid", "diversity"))
    assert concept_distribution(x, [(p, 0) for p in "uvwxyz"], train)["diversity"] is None  # no prompt has two seeds
