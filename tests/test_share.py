import numpy as np
import torch
from sklearn.cluster import KMeans

import netshrink
from netshrink.compress.methods.share import kmeans_1d


def test_kmeans_matches_sklearn_from_same_start():
    values = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    ours, assignment = kmeans_1d(values, 16, "linear", iterations=300)
    init = np.linspace(float(values.min()), float(values.max()), 16).reshape(-1, 1)
    reference = KMeans(16, init=init, n_init=1, max_iter=300, tol=0).fit(values.numpy().reshape(-1, 1).astype(np.float64))
    assert np.allclose(np.sort(reference.cluster_centers_.ravel()), ours.numpy(), atol=1e-4)
    assert torch.equal(ours[assignment], ours[(values[:, None] - ours[None]).abs().argmin(1)])


def test_share_keeps_zeros_and_value_count(trained, digits):
    netshrink.prune(trained, keep=0.2)
    zeros = trained.fc1.weight == 0
    netshrink.share(trained, bits=3)
    assert torch.all(trained.fc1.weight[zeros] == 0)
    assert torch.unique(trained.fc1.weight[~zeros]).numel() <= 8
    centroids = trained.fc1.parametrizations.weight[-1].centroids.detach().clone()
    assignment = trained.fc1.parametrizations.weight[-1].assignment.clone()
    netshrink.fit(trained, digits[0], epochs=1, lr=1e-3, progress=False)
    after = trained.fc1.parametrizations.weight[-1]
    assert not torch.equal(after.centroids.detach(), centroids)  # centroids learn
    assert torch.equal(after.assignment, assignment)  # assignments do not
    assert torch.all(trained.fc1.weight[zeros] == 0)
    assert torch.unique(trained.fc1.weight[~zeros]).numel() <= 8


def test_centroid_gradient_is_sum_of_member_gradients():
    from netshrink.compress.methods.share import Codebook

    w = torch.tensor([[0.1, 0.0, -0.5], [0.12, -0.52, 0.0]])
    centroids, assignment = kmeans_1d(w[w != 0], 2)
    full = torch.zeros(w.shape, dtype=torch.long)
    full[w != 0] = assignment
    book = Codebook(centroids, full, w != 0)
    upstream = torch.tensor([[1.0, 5.0, 2.0], [3.0, 7.0, 11.0]])
    (book(w) * upstream).sum().backward()
    assert torch.allclose(book.centroids.grad, torch.tensor([2.0 + 7.0, 1.0 + 3.0]))
