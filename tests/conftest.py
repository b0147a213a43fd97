import pytest
import torch

from netshrink.data import load_dataset
from netshrink.models import build_model
from netshrink.train import fit


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="session")
def trained_state(digits):
    """A LeNet-300-100 trained on 8x8 digits (seconds), as a state dict to copy from."""
    model = build_model("lenet-300-100", (1, 8, 8))
    fit(model, digits[0], epochs=15, lr=2e-3, batch_size=64, progress=False)
    return model.state_dict()


@pytest.fixture
def trained(trained_state):
    model = build_model("lenet-300-100", (1, 8, 8))
    model.load_state_dict(trained_state)
    return model


@pytest.fixture
def rand_weight():
    return torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
