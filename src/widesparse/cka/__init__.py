"""Linear CKA, full-batch and mini-batch (Kornblith et al. 2019; Nguyen, Raghu & Kornblith, ICLR 2021).

docs/theory.md §4.4. For a minibatch of ``n`` examples with features ``X`` (flattened per example) the linear Gram
``K = X X^T`` is U-centred (``K^U``: zero diagonal, then the row/column means of the unbiased estimator
removed), and ``HSIC_1(K, L) = <K^U, L^U> / (n (n - 3))``. Mini-batch CKA sums the cross term and both self
terms over all minibatches and divides once::

    CKA_mb = sum_i HSIC_1(K_i, L_i) / sqrt(sum_i HSIC_1(K_i, K_i) * sum_i HSIC_1(L_i, L_i))

All ``La x Lb`` layer pairs of one minibatch come from one matrix product of the flattened U-centred Grams
(the trick of Google's ``efficient_CKA.py``). The Grams of all layers of one width are one batched, symmetric
product (lower block triangle only); accumulators are always float64.

This module knows no model class: it takes tensors, any ``nn.Module`` plus module names (forward hooks), or a
model offering ``forward_intermediates(x, intermediates_only=True)`` and ``feature_names()``.
"""

from widesparse.cka.compare import CKAResult, compare, diagonal_mean, run_comparison
from widesparse.cka.gram import F64, gram_matrices, linear_cka, u_center
from widesparse.cka.minibatch import MinibatchCKA
from widesparse.cka.taps import FeatureTap, features

__all__ = [
    "linear_cka",
    "gram_matrices",
    "u_center",
    "MinibatchCKA",
    "FeatureTap",
    "features",
    "CKAResult",
    "compare",
    "diagonal_mean",
    "run_comparison",
    "F64",
]
