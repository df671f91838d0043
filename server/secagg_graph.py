"""How many devices hold shares of each device's secrets in a SecAgg+ round, and how many
of them it takes to rebuild one: the degree k and the threshold t of the share graph.

SecAgg (Bonawitz et al. 2017) shares every device's two secrets (the seed of its own
mask, and the key its pairwise masks come from) with every other device: O(n²) key
agreements and shares per round. SecAgg+ (Bell et al. 2020, "Secure single-server
aggregation with (poly)logarithmic overhead") shares them only with the device's k
neighbours in a random k-regular graph (Flower: a ring of the shuffled devices, each
with the k − 1 nearest and itself) and shows that k = O(log n) keeps both guarantees:

* **robustness**: the round completes if, for every device, at least t of its share
  holders are still there at the unmask stage (for a device that dropped, t shares of
  its key let the coordinator remove its pairwise masks from the others' vectors; for
  a survivor, t shares of its seed remove its own mask);
* **privacy**: the coordinator, together with any devices colluding with it, learns
  nothing beyond the sum unless it holds t shares of some honest device's secrets.

:func:`share_graph` sets t to a strict majority of the k share holders, t = ⌊k/2⌋ + 1:
a coordinator can then never get t shares of both secrets of one device (one of the
two is all it can ask a majority for), and fewer than t colluding neighbours learn
nothing. It then takes the smallest odd k for which a fraction ``dropout_rate`` of
independent dropouts leaves some device with fewer than t surviving share holders with
probability at most 2^-:data:`FAILURE_BITS` per round (a union bound over the n devices
of the binomial tail P[Bin(k − 1, 1 − δ) < t]). The same bound, read with "colludes"
for "drops out", is the chance that colluders with the coordinator, a fraction δ of the
fleet, hold t shares of some device's secrets. So δ is the price of both: a larger
δ tolerates more dropouts and more colluders for a denser graph. k grows like
c·log₂ n (c ≈ 1/(2(½ − δ)²·log₂ e) from Hoeffding), while the full graph grows like n:

    δ = 0.1:  n = 10 → k = 10 (full), 100 → 35, 1,000 → 39, 10,000 → 43
    δ = 0.3:  n = 100 → 100 (full), 1,000 → 213, 10,000 → 239

Where no k < n meets the bound, every device shares with every other (k = n).
"""

from __future__ import annotations

import math
from functools import lru_cache

from scipy.stats import binom

FAILURE_BITS = 20
"""A round fails (or colluders reach a threshold) with probability at most 2^-20 ≈ 1e-6."""

DEFAULT_DROPOUT_RATE = 0.1
"""``secagg.dropout_rate`` unless the config says otherwise."""


def majority(shares: int) -> int:
    """The smallest strict majority of ``shares`` share holders (at least 2)."""
    return max(shares // 2 + 1, 2)


@lru_cache(maxsize=1024)
def sparse_degree(sampled: int, dropout_rate: float) -> int:
    """The smallest odd k (or ``sampled``) whose majority threshold survives ``dropout_rate``.

    A device's k − 1 other share holders each survive with probability 1 − δ; the round
    needs t = ⌊k/2⌋ + 1 of them for every one of the ``sampled`` devices.
    """
    if not 0.0 <= dropout_rate < 0.5:
        raise ValueError(f"dropout_rate must be in [0, 0.5), got {dropout_rate!r}")
    bound = 2.0**-FAILURE_BITS / sampled
    k = 3
    while k < sampled:
        if binom.cdf(majority(k) - 1, k - 1, 1.0 - dropout_rate) <= bound:
            return k
        k += 2
    return sampled


def share_graph(
    sampled: int,
    num_shares: float | None,
    reconstruction_threshold: float | None,
    dropout_rate: float = DEFAULT_DROPOUT_RATE,
) -> tuple[int, int]:
    """(k share holders per device, threshold t) for a SecAgg+ round of ``sampled`` devices.

    ``num_shares``: None for the sparse graph of :func:`sparse_degree`; a fraction of the
    sampled devices as Flower reads it (1.0: every device, the full graph; otherwise
    rounded, made odd, and all of them if that leaves 2 or fewer).
    ``reconstruction_threshold``: None for a strict majority of k; a fraction of k as
    Flower reads it (rounded, at least 2).
    """
    if num_shares is None:
        shares = sparse_degree(sampled, dropout_rate)
    else:
        shares = round(num_shares * sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = sampled
    if reconstruction_threshold is None:
        threshold = majority(shares)
    else:
        threshold = max(round(reconstruction_threshold * shares), 2)
    return shares, min(threshold, shares)


def degree_factor(sampled: int, dropout_rate: float = DEFAULT_DROPOUT_RATE) -> float:
    """c in k = c·log₂ n for the sparse graph at ``sampled`` devices (for reports)."""
    return sparse_degree(sampled, dropout_rate) / math.log2(sampled)
