import dataclasses

import numpy as np
import pytest
import torch

from painn_export import PaiNN, PaiNNConfig, TargetNormalization

# Small enough to be fast, big enough to have every code path (F even, >1 layer).
SMALL = PaiNNConfig(hidden_channels=16, num_layers=2, num_rbf=8, cutoff=5.0, max_neighbors=20)
GRADIENT = dataclasses.replace(SMALL, direct_forces=False)  # forces as -dE/dx (stress possible)


@pytest.fixture(autouse=True)
def _deterministic_precision():
    """No TF32 and a fixed seed in every test: results must not depend on the machine."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield


def make_model(config=SMALL, dtype=torch.float64, seed=0, normalization=None, perturb=0.05):
    """A PaiNN with random weights and fitted (non-trivial) scale factors."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PaiNN(config, normalization or TargetNormalization())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * perturb)
        for scale in model.layer_scales():
            scale.scale_factor.fill_(0.5 + float(torch.rand(1, generator=gen)))
    return model.to(dtype).eval()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
