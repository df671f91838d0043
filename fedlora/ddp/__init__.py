"""Distributed DP for SecAgg+: the distributed discrete Gaussian (Kairouz et al. 2021).

Each device clips, rotates, rounds and noises its update into integers mod 2^b
(:mod:`~fedlora.ddp.encoding`); SecAgg+ sums them; the coordinator decodes the noisy
mean. :mod:`~fedlora.ddp.params` holds the shared parameters and chooses them,
:mod:`~fedlora.ddp.rotation` the randomized Walsh–Hadamard rotation,
:mod:`~fedlora.ddp.discrete_gaussian` the noise. numpy only: no torch, no Flower, and
every random draw comes from an injected source.
"""

from __future__ import annotations

from fedlora.ddp.discrete_gaussian import sample_discrete_gaussian
from fedlora.ddp.encoding import decode, encode
from fedlora.ddp.params import DDPParams, bytes_per_value, choose_params, wrap_probability
from fedlora.ddp.rotation import padded_dimension, rotate, unrotate

__all__ = [
    "DDPParams",
    "bytes_per_value",
    "choose_params",
    "decode",
    "encode",
    "padded_dimension",
    "rotate",
    "sample_discrete_gaussian",
    "unrotate",
    "wrap_probability",
]
