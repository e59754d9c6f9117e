"""Every supported architecture prunes to level 0.5 structurally and round-trips through the model format."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_core import ARCHS, PruneSpec, build_model, count_params, get_criterion, load_model, prune_to_level, save_model
from prune_core.model_format import ModelCard

NUM_CLASSES = 10
ALL_ARCHS = sorted(ARCHS)


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, NUM_CLASSES).eval()


def _input(arch: str, batch: int = 2) -> torch.Tensor:
    size = ARCHS[arch].image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prune_half_the_parameters(arch, tmp_path):
    model = _model(arch)
    scores = get_criterion("l1").score(model)
    outcome = prune_to_level(model, scores, PruneSpec(0.5), ARCHS[arch].image_size)
    pruned = outcome.model.eval()

    assert abs(outcome.achieved_level - 0.5) <= 0.03, f"{arch}: removed {outcome.achieved_level:.3f} of parameters"
    assert count_params(model) == outcome.params_before  # the source model is untouched
    with torch.no_grad():
        out = pruned(_input(arch))
    assert out.shape == (2, NUM_CLASSES)
    for name, module in pruned.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            assert module.out_channels >= 1 and module.in_channels >= 1, name

    # the model format rebuilds the exact pruned structure
    card = save_model(pruned, ModelCard(arch, NUM_CLASSES, [str(i) for i in range(NUM_CLASSES)], ARCHS[arch].image_size), tmp_path / "m")
    loaded, loaded_card = load_model(tmp_path / "m")
    assert count_params(loaded) == count_params(pruned) == card.params
    with torch.no_grad():
        assert torch.equal(loaded(_input(arch)), pruned(_input(arch)))


@pytest.mark.parametrize("arch", ["cifar_resnet18", "mobilenet_v2", "densenet121"])
def test_level_zero_is_identity(arch):
    model = _model(arch)
    outcome = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.0), ARCHS[arch].image_size)
    with torch.no_grad():
        assert torch.equal(outcome.model.eval()(_input(arch)), model(_input(arch)))
    assert outcome.params_after == outcome.params_before


@pytest.mark.parametrize("arch", ["cifar_resnet18", "cifar_mobilenet_v2", "googlenet"])
def test_global_allocation(arch):
    model = _model(arch)
    outcome = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.5, allocation="global"), ARCHS[arch].image_size)
    assert abs(outcome.achieved_level - 0.5) <= 0.03
    with torch.no_grad():
        assert outcome.model.eval()(_input(arch)).shape == (2, NUM_CLASSES)


def test_channels_rounded_and_protected_layers_kept():
    from prune_core.architectures import classifier_module, stem_module

    model = _model("cifar_resnet18")
    pruned = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.6, round_to=8), 32).model
    assert stem_module(pruned).out_channels == stem_module(model).out_channels
    assert classifier_module(pruned).out_features == NUM_CLASSES
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Conv2d) and module is not stem_module(pruned):
            assert module.out_channels % 8 == 0, f"{name} has {module.out_channels} channels"
