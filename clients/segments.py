"""A BU's share of one federated k-means iteration: per-cluster sums and counts of its customers.

The BU assigns each customer (one row of its consented, minimised features) to the nearest of the
round's centroids and returns, exactly, the sums of the customers' quantised features and their
number per cluster, as one int64 vector in the layout of `federation.segments.segments_layout`.
Nothing else about a customer leaves: noise is added to this vector (the BU's own under the local
placement) before it does. The quantisation and the clipping come from the public spec, so a
customer's contribution is bounded whatever the features or the centroids are.
"""

from __future__ import annotations

import numpy as np

from federation.segments import SegmentsSpec, assign, check_centroids, quantise


def segment_vector(features: np.ndarray, centroids: np.ndarray, spec: SegmentsSpec) -> np.ndarray:
    """int64 (clusters x dim sums, then clusters counts) for the round's `centroids` (float32 or
    float64, as they travel); `features` are the BU's (customers, dim) values in [0, 1]."""
    centres = check_centroids(centroids, spec)
    grid = quantise(features, spec)
    # Assignment on the quantised values, so that the pooled Lloyd step on the same grid matches.
    labels = assign(grid / spec.grid_steps, centres)
    clusters = len(centres)
    sums = np.zeros((clusters, spec.dim), dtype=np.int64)
    np.add.at(sums, labels, grid)
    counts = np.bincount(labels, minlength=clusters).astype(np.int64)
    return np.concatenate([sums.ravel(), counts])
