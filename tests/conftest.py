import pytest
import torch

from netshrink.zoo.datasets import load_dataset
from netshrink.zoo.models import build_model
from netshrink.training.fit import fit


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


@pytest.fixture
def make_tiny_bert():
    """A factory of tiny BERTs from a transformers config: random weights, no download, no dropout."""
    transformers = pytest.importorskip("transformers")

    def make():
        config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        return transformers.BertModel(config).eval()

    return make
