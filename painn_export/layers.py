"""Small building blocks shared with upstream OCP/GemNet, with its numerics.

Module and parameter names follow upstream (``atom_emb.embeddings.weight``,
``radial_basis.rbf.offset``, ``scale_factor``) so that upstream state_dicts
load with ``strict=True``. Every constant is created with an explicit dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from painn_export.config import PaiNNConfig


def const(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d CPU tensor of ``like``'s dtype, for arithmetic with ``like``.

    A 0-d CPU tensor acts as a scalar on any device (no host-to-device copy)
    and rounds exactly as a Python float would in ``like``'s dtype. Unlike a
    Python float, it keeps its dtype through tracing: torch.onnx (2.13)
    stores Python scalars as float32 constants, which loses digits in float64
    graphs.
    """
    return torch.tensor(value, dtype=like.dtype)


# ScaledSiLU divides SiLU by 0.6 so that its output has roughly unit variance
# for unit-variance input (GemNet's choice, kept for checkpoint compatibility).
SILU_SCALE = 1.0 / 0.6


class ScaledSiLU(nn.Module):
    """``silu(x) / 0.6``, elementwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x) * const(SILU_SCALE, x)


class AtomEmbedding(nn.Module):
    """Learned embedding of the atomic number: row ``Z - 1`` of a table.

    Input ``[n_atoms]`` int64 atomic numbers in ``1..num_elements``;
    output ``[n_atoms, F]``.
    """

    def __init__(self, emb_size: int, num_elements: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(num_elements, emb_size)
        bound = math.sqrt(3.0)  # unit-variance uniform initialisation
        nn.init.uniform_(self.embeddings.weight, a=-bound, b=bound)

    def forward(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        return self.embeddings(atomic_numbers - 1)  # [n_atoms, F]


class GaussianSmearing(nn.Module):
    """``exp(coeff * (d - μ_k)^2)`` with ``μ_k`` evenly spaced on [start, stop]."""

    def __init__(self, start: float, stop: float, num_gaussians: int) -> None:
        super().__init__()
        offset = torch.linspace(start, stop, num_gaussians, dtype=torch.float32)
        # Upstream derives the width from the float32 spacing; keep that exact value.
        self.coeff = -0.5 / (offset[1] - offset[0]).item() ** 2
        self.register_buffer("offset", offset)

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        diff = d_scaled.view(-1, 1) - self.offset.view(1, -1)  # [n_edges, K]
        return torch.exp(const(self.coeff, diff) * torch.pow(diff, 2))


class SphericalBesselBasis(nn.Module):
    """``sqrt(2/c^3) * sin(ω_k d/c) / (d/c)`` with learnable ``ω_k`` (init ``kπ``)."""

    def __init__(self, num_radial: int, cutoff: float) -> None:
        super().__init__()
        self.norm_const = math.sqrt(2.0 / cutoff**3)
        freqs = math.pi * torch.arange(1, num_radial + 1, dtype=torch.float32)
        self.frequencies = nn.Parameter(freqs)

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        d = d_scaled[:, None]  # [n_edges, 1]
        return const(self.norm_const, d) / d * torch.sin(self.frequencies * d)  # [n_edges, K]


class BernsteinBasis(nn.Module):
    """Bernstein polynomials of ``exp(-γ d/c)`` with learnable ``γ`` (softplus)."""

    def __init__(self, num_radial: int, pregamma_initial: float = 0.45264) -> None:
        super().__init__()
        prefactor = [math.comb(num_radial - 1, k) for k in range(num_radial)]
        self.register_buffer("prefactor", torch.tensor(prefactor, dtype=torch.float32), persistent=False)
        self.pregamma = nn.Parameter(torch.tensor(pregamma_initial, dtype=torch.float32))
        exp1 = torch.arange(num_radial, dtype=torch.int64)
        self.register_buffer("exp1", exp1[None, :], persistent=False)
        self.register_buffer("exp2", (num_radial - 1 - exp1)[None, :], persistent=False)

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        gamma = torch.nn.functional.softplus(self.pregamma)
        exp_d = torch.exp(-gamma * d_scaled)[:, None]  # [n_edges, 1]
        return self.prefactor * exp_d**self.exp1 * (1 - exp_d) ** self.exp2


class PolynomialEnvelope(nn.Module):
    """``1 + a x^p + b x^(p+1) + c x^(p+2)`` for ``x < 1``, else 0 (smooth to 2nd order)."""

    def __init__(self, exponent: int) -> None:
        super().__init__()
        p = float(exponent)
        self.p = p
        self.a = -(p + 1) * (p + 2) / 2
        self.b = p * (p + 2)
        self.c = -p * (p + 1) / 2

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        x = d_scaled
        env = (
            1
            + const(self.a, x) * x ** const(self.p, x)
            + const(self.b, x) * x ** const(self.p + 1, x)
            + const(self.c, x) * x ** const(self.p + 2, x)
        )
        return torch.where(d_scaled < 1, env, torch.zeros_like(d_scaled))


class ExponentialEnvelope(nn.Module):
    """``exp(-x^2 / ((1 - x)(1 + x)))`` for ``x < 1``, else 0 (SpookyNet)."""

    def forward(self, d_scaled: torch.Tensor) -> torch.Tensor:
        env = torch.exp(-(d_scaled**2) / ((1 - d_scaled) * (1 + d_scaled)))
        return torch.where(d_scaled < 1, env, torch.zeros_like(d_scaled))


class RadialBasis(nn.Module):
    """Radial basis times envelope of ``d / cutoff``.

    Input distances ``[n_edges]`` Å; output ``[n_edges, num_rbf]``.
    """

    def __init__(self, config: PaiNNConfig) -> None:
        super().__init__()
        self.inv_cutoff = 1.0 / config.cutoff
        if config.envelope == "polynomial":
            self.envelope: nn.Module = PolynomialEnvelope(config.envelope_exponent)
        else:
            self.envelope = ExponentialEnvelope()
        if config.rbf == "gaussian":
            self.rbf: nn.Module = GaussianSmearing(0.0, 1.0, config.num_rbf)
        elif config.rbf == "spherical_bessel":
            self.rbf = SphericalBesselBasis(config.num_rbf, config.cutoff)
        else:
            self.rbf = BernsteinBasis(config.num_rbf)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        d_scaled = distance * const(self.inv_cutoff, distance)  # [n_edges]
        return self.envelope(d_scaled)[:, None] * self.rbf(d_scaled)  # [n_edges, K]


class ScaleFactor(nn.Module):
    """A fitted constant multiplier; identity while unfitted (stored value 0).

    Upstream fits these on data and stores them as ``scale_factor`` (a
    parameter that takes no gradient). The unfitted case is resolved with
    ``torch.where`` rather than Python control flow so that it traces.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.tensor(0.0, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.where(self.scale_factor == 0, torch.ones_like(self.scale_factor), self.scale_factor)
        return x * scale
