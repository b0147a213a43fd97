import pytest
import torch

import netshrink
from netshrink.compress.methods.prune import NMSparsity, polynomial_keep
from netshrink.compress.methods import apply


def test_keeps_exact_count_of_largest_magnitudes(trained):
    reference = {n: m.weight.detach().clone() for n, m in trained.named_modules() if isinstance(m, torch.nn.Linear)}
    netshrink.prune(trained, keep=0.1)
    for name, dense in reference.items():
        w = trained.get_submodule(name).weight
        kept = w != 0
        assert int(kept.sum()) == round(0.1 * dense.numel())
        # every kept weight is at least as large as every dropped one, and kept values are unchanged
        assert dense[kept].abs().min() >= dense[~kept].abs().max()
        assert torch.equal(w[kept], dense[kept])


def test_per_layer_map_and_global_scope(trained):
    netshrink.prune(trained, keep={"fc1": 0.08, "fc2": 0.09, "*": 0.26})
    assert int((trained.fc1.weight != 0).sum()) == round(0.08 * trained.fc1.weight.numel())
    assert int((trained.fc3.weight != 0).sum()) == round(0.26 * trained.fc3.weight.numel())


def test_global_ranks_all_layers_together(trained):
    everything = torch.cat([trained.get_submodule(n).weight.detach().abs().flatten() for n in ("fc1", "fc2", "fc3")])
    threshold = everything.kthvalue(everything.numel() - round(0.2 * everything.numel()) + 1).values
    netshrink.prune(trained, keep=0.2, scope="global")
    kept = sum(int((trained.get_submodule(n).weight != 0).sum()) for n in ("fc1", "fc2", "fc3"))
    assert kept == round(0.2 * everything.numel())
    assert trained.fc1.weight[trained.fc1.weight != 0].abs().min() >= threshold


def test_fine_tuning_keeps_pruned_weights_at_exactly_zero(trained, digits):
    netshrink.prune(trained, keep=0.1)
    zero_before = trained.fc1.weight == 0
    netshrink.fit(trained, digits[0], epochs=1, lr=1e-2, progress=False)
    assert torch.all(trained.fc1.weight[zero_before] == 0)
    netshrink.bake(trained)
    assert not hasattr(trained.fc1, "parametrizations")
    assert torch.all(trained.fc1.weight[zero_before] == 0)


def test_the_mask_is_stored_as_booleans_with_a_float_copy_only_while_training(trained, digits, tmp_path):
    netshrink.prune(trained, keep=0.3)
    mask = trained.fc1.parametrizations.weight[0]
    assert mask.mask.dtype == torch.bool and trained.state_dict()["fc1.parametrizations.weight.0.mask"].dtype == torch.bool
    x = digits[1].tensors[0][:64]
    trained.train()
    with torch.no_grad():
        trained(x)
    netshrink.save(trained, tmp_path / "m.nsk")
    assert mask._multiplier is None  # no float copy without gradients (saving, evaluating in training mode)
    training_out = trained(x)  # the float copy serves the training steps
    assert mask._multiplier is not None and mask._multiplier.dtype == torch.float32
    trained.eval()
    assert mask._multiplier is None  # evaluating holds the booleans only
    assert torch.equal(trained(x), training_out)
    reference = torch.where(mask.mask, trained.fc1.parametrizations.weight.original, 0.0)
    assert torch.equal(trained.fc1.weight, reference)
    for _ in range(2):  # twice: a loaded mask replaces the float copy
        trained.train()
        trained(x)
        trained.load_state_dict({**trained.state_dict(), "fc1.parametrizations.weight.0.mask": ~mask.mask})
        assert torch.equal(trained.fc1.weight, torch.where(mask.mask, trained.fc1.parametrizations.weight.original, 0.0))


def test_pruning_again_tightens_instead_of_stacking(trained):
    netshrink.prune(trained, keep=0.5)
    netshrink.prune(trained, keep=0.25)
    assert len(trained.fc1.parametrizations.weight) == 1
    assert int((trained.fc1.weight != 0).sum()) == round(0.25 * trained.fc1.weight.numel())


@pytest.mark.parametrize("keep", [0, 1.5, -0.1, "half", True])
def test_bad_keep_is_rejected_before_anything_changes(trained, keep):
    before = trained.fc1.weight.detach().clone()
    with pytest.raises(netshrink.NetshrinkError, match="keep"):
        netshrink.prune(trained, keep=keep)
    assert torch.equal(trained.fc1.weight, before) and not hasattr(trained.fc1, "parametrizations")


def test_nothing_to_compress_and_unknown_target():
    with pytest.raises(netshrink.NetshrinkError, match="nothing to compress"):
        netshrink.prune(torch.nn.Sequential(torch.nn.ReLU()), keep=0.5)
    with pytest.raises(netshrink.NetshrinkError, match="matches no"):
        netshrink.prune(netshrink.build_model("mlp"), keep=0.5, targets=("conv9",))


def test_n_m_sparsity_against_groupwise_reference(rand_weight):
    conv = torch.nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        conv.weight.copy_(rand_weight)
    apply(torch.nn.Sequential(conv), NMSparsity(n=2, m=4))
    w = conv.weight.detach()
    groups = w.movedim(1, -1).reshape(-1, 4)
    dense_groups = rand_weight.movedim(1, -1).reshape(-1, 4)
    assert torch.all((groups != 0).sum(1) == 2)
    reference = dense_groups.abs().topk(2, dim=1).values.sum(1)
    assert torch.allclose(groups.abs().sum(1), reference)


def test_polynomial_schedule_reaches_target():
    assert polynomial_keep(0.1, 0.0) == 1.0
    assert polynomial_keep(0.1, 1.0) == pytest.approx(0.1)
    assert polynomial_keep(0.1, 0.5) < 0.5  # cubic: most pruning happens early
