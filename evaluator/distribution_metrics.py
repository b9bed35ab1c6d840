"""Distances between two sets of CLIP image embeddings, and the spread of one set: pure functions
of embeddings (no model), so that the math is tested alone.

- `cmmd`: CMMD of Jayasumana et al., "Rethinking FID" (CVPR 2024);
- `clip_fd`: the Fréchet distance (FID's formula) on CLIP features, by torchmetrics;
- `clip_kid`: the kernel inception distance (Bińkowski et al., 2018) on CLIP features, by torchmetrics;
- `diversity`: mean pairwise cosine distance among one prompt's images across seeds (DreamBooth's DIV idea);
- `concept_distribution`: all four for a suite's concept images against the training images,
  as `evaluator.score.suite_metrics` reports them.

Every input is L2-normalised here: CMMD is defined on normalised CLIP embeddings, CLIP's geometry
is the cosine (as for CLIP-T and CLIP-I), and FD/KID then do not depend on a model's feature norm.
cmmd, clip_fd and clip_kid are lower-is-better (0 = the same distribution).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from evaluator.metrics import _as_matrix, _same_width, _unit

CMMD_SIGMA = 10.0  # the Gaussian RBF bandwidth of the paper and its reference code
CMMD_SCALE = 1000.0  # the paper's scale, "to make the metric more human readable"
MIN_SAMPLES = 2  # per set: every estimator here needs a pair (covariances, U-statistics)
KID_SUBSETS = 100  # torchmetrics' default number of subsets

Embeddings = torch.Tensor | np.ndarray


def _set(x: Embeddings, what: str, metric: str) -> torch.Tensor:
    t = _unit(x, what)
    if t.shape[0] < MIN_SAMPLES:
        raise ValueError(f"{metric} needs at least {MIN_SAMPLES} images in each set, got {t.shape[0]} {what}")
    return t.double()  # kernel means agree to ~5 digits; their difference needs float64


def _pair(generated: Embeddings, reference: Embeddings, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _set(generated, "generated", metric), _set(reference, "reference", metric)
    _same_width(x, y, "generated", "reference")
    return x, y


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp(min=0)


def cmmd(generated: Embeddings, reference: Embeddings, unbiased: bool = True) -> float:
    """CMMD: 1000 x the squared MMD with the Gaussian RBF kernel k(x, y) = exp(-|x - y|^2 / (2 sigma^2)),
    sigma = 10, between L2-normalised CLIP embeddings of two sets (n generated, m reference).

    unbiased=True (default) is the estimator the paper defines: the U-statistic of Gretton et al.
    (JMLR 2012, MMD^2_u) whose within-set means leave out i = j,
        1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j) - 2/(nm) sum_{i,j} k(x_i, y_j);
    it is unbiased, so it can be slightly negative for two draws of one distribution.
    unbiased=False is what the reference code (google-research/cmmd, distance.py) computes: the
    minimum-variance V-statistic (plain means over all n^2, m^2, nm pairs, i = j included). The two
    differ by 1000 [(1 - mean k_xx) / n + (1 - mean k_yy) / m] (off-diagonal means), O(1/n): about
    0.5 CMMD points on the toy world's 20 vs 18 images (bench/evaluator_metrics.py); and that term
    shrinks as the generated images grow alike, so the V-statistic rewards a collapsed LoRA. Hence
    the default.
    """
    x, y = _pair(generated, reference, "cmmd")
    gamma = 1.0 / (2.0 * CMMD_SIGMA**2)
    k_xx, k_yy = torch.exp(-gamma * _sq_dists(x, x)), torch.exp(-gamma * _sq_dists(y, y))
    k_xy = torch.exp(-gamma * _sq_dists(x, y))
    if unbiased:
        n, m = x.shape[0], y.shape[0]
        xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
        yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    else:
        xx, yy = k_xx.mean(), k_yy.mean()
    return float(CMMD_SCALE * (xx + yy - 2 * k_xy.mean()))


class PrecomputedFeatures(torch.nn.Module):
    """The feature extractor torchmetrics' FID and KID call on each `update`: our rows already are
    CLIP embeddings, so it hands them through. `num_features` spares FID the forward of a dummy
    random image that it runs to learn the width otherwise (an image this module cannot embed)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def clip_fd(generated: Embeddings, reference: Embeddings) -> float:
    """Fréchet distance between Gaussians fitted to the two sets of L2-normalised CLIP embeddings,
    |mu_g - mu_r|^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)), computed by torchmetrics'
    `FrechetInceptionDistance` (float64 sums, covariances over n - 1) fed through `PrecomputedFeatures`.

    Biased upwards for small sets and unreliable when the sets are smaller than the embedding
    width (the covariances are then singular): at a suite's ~20 images prefer `clip_kid` or `cmmd`.
    """
    # Imported here: torchmetrics takes seconds to import, and only a suite's scoring needs it.
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = _pair(generated, reference, "clip_fd")
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(x.shape[1]))
    fid.update(y, real=True)
    fid.update(x, real=False)
    return float(fid.compute())


def clip_kid(generated: Embeddings, reference: Embeddings, subsets: int = KID_SUBSETS,
             subset_size: int | None = None, seed: int = 0) -> float:
    """KID: the unbiased squared MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 between
    L2-normalised CLIP embeddings, averaged over `subsets` random subsets of `subset_size` images of
    each set, computed by torchmetrics' `KernelInceptionDistance` fed through `PrecomputedFeatures`.

    subset_size: default min(n, m), the most a set of that size allows (torchmetrics draws without
    replacement, and KID's original 1000 is far above a suite's ~20 images): the smaller set is then
    used whole in every subset and the larger one subsampled. Larger values are refused.
    seed: the subsets are drawn with this seed in a forked RNG, so a trial's score is reproducible
    and the caller's global torch RNG (training noise, dropout) is left as it was.
    """
    from torchmetrics.image.kid import KernelInceptionDistance  # lazy, as in clip_fd

    x, y = _pair(generated, reference, "clip_kid")
    most = min(x.shape[0], y.shape[0])
    size = most if subset_size is None else subset_size
    if not MIN_SAMPLES <= size <= most:
        raise ValueError(f"clip_kid subset_size must be in [{MIN_SAMPLES}, {most}] (the smaller set's size), got {size}")
    with warnings.catch_warnings():
        # "will save all extracted features in buffer": we hand it the features we already hold.
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(x.shape[1]), subsets=subsets, subset_size=size)
    kid.update(y, real=True)
    kid.update(x, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, _std = kid.compute()
    return float(mean)


def diversity(embeddings: Embeddings, prompts: list[str]) -> float:
    """Mean pairwise cosine distance (1 - cos) among the images of each prompt (its seeds), then the
    mean over the prompts that have at least two images. 0: every seed draws the same picture
    (a collapsed LoRA); 1: a prompt's images are orthogonal in CLIP space. Higher is more varied, which is
    not better on its own (noise is varied too): read it beside cmmd or clip_i."""
    emb = _unit(embeddings, "embeddings").double()
    if len(prompts) != emb.shape[0]:
        raise ValueError(f"need one prompt per embedding: got {emb.shape[0]} embeddings and {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    means = []
    for rows in groups.values():
        if len(rows) >= MIN_SAMPLES:
            u, k = emb[rows], len(rows)
            off_diagonal_cos = ((u @ u.T).sum() - (u * u).sum()) / (k * (k - 1))
            means.append(1.0 - off_diagonal_cos)
    if not means:
        raise ValueError(f"diversity needs at least {MIN_SAMPLES} images of one prompt (seeds), "
                         f"got {emb.shape[0]} images of {len(groups)} prompt(s)")
    return float(torch.stack(means).mean())


DISTRIBUTION_FUNCTIONS = {"cmmd": cmmd, "clip_fd": clip_fd, "clip_kid": clip_kid}


def concept_distribution(concept_emb: Embeddings, keys: list[tuple[str, int]],
                         train_emb: Embeddings | None) -> dict[str, float | None]:
    """cmmd, clip_fd and clip_kid of a suite's concept images against the training images, and the
    diversity of the concept prompts across their seeds (keys: (prompt, seed) of each row).

    Rows with the same prompt and seed are one image drawn twice (a trigger-test prompt that
    repeats a natural one, at the same seeds): each counts once. A value is None when its inputs do
    not allow it: no training images, fewer than MIN_SAMPLES images in a set, no prompt with two seeds.
    """
    if len(keys) != len(concept_emb):
        raise ValueError(f"need one (prompt, seed) per concept image: got {len(concept_emb)} images and {len(keys)} keys")
    rows: dict[tuple[str, int], int] = {}
    for i, (prompt, seed) in enumerate(keys):
        rows.setdefault((prompt, int(seed)), i)
    emb = _as_matrix(concept_emb, "concept_emb")[list(rows.values())]
    prompts = [prompt for prompt, _ in rows]
    enough = train_emb is not None and emb.shape[0] >= MIN_SAMPLES and len(train_emb) >= MIN_SAMPLES
    out = {name: (fn(emb, train_emb) if enough else None) for name, fn in DISTRIBUTION_FUNCTIONS.items()}
    seeded = len(prompts) > len(set(prompts))  # some prompt has two images
    out["diversity"] = diversity(emb, prompts) if seeded else None
    return out
