"""Pruning in the library: level 0 is the identity, global allocation, protected layers, the bisection.
That every architecture prunes to level 0.5 and is rebuilt from its model directory is
tests/test_cli_archs.py, through the command line."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_core import ARCHS, PruneSpec, build_model, count_params, get_criterion, prune_to_level

NUM_CLASSES = 10


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, NUM_CLASSES).eval()


def _input(arch: str, batch: int = 2) -> torch.Tensor:
    size = ARCHS[arch].image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["cifar_resnet18", "mobilenet_v2", "densenet121"])
def test_level_zero_is_identity(arch):
    model = _model(arch)
    outcome = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.0), ARCHS[arch].image_size)
    with torch.no_grad():
        assert torch.equal(outcome.model.eval()(_input(arch)), model(_input(arch)))
    assert outcome.params_after == outcome.params_before


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("arch", ["cifar_resnet18", "cifar_mobilenet_v2", pytest.param("googlenet", marks=pytest.mark.slow)])
def test_global_allocation(arch):
    model = _model(arch)
    scores = get_criterion("l1").score(model)
    outcome = prune_to_level(model, scores, PruneSpec(0.5, allocation="global"), ARCHS[arch].image_size)
    assert abs(outcome.achieved_level - 0.5) <= 0.03
    assert count_params(model) == outcome.params_before  # the source model is untouched
    assert outcome.allocation == "global"
    with torch.no_grad():
        assert outcome.model.eval()(_input(arch)).shape == (2, NUM_CLASSES)
    # a different plan from uniform: layers lose different shares of their channels
    uniform = prune_to_level(model, scores, PruneSpec(0.5), ARCHS[arch].image_size).model
    assert _widths(outcome.model) != _widths(uniform)
    kept = {n: w / _widths(model)[n] for n, w in _widths(outcome.model).items()}
    assert max(kept.values()) - min(kept.values()) > 0.25, kept


def test_global_allocation_prunes_where_parameters_are():
    """cifar_small: with the same spread of scores in every layer, the layers whose channels carry
    the most parameters (the residual trunk, the widest convs) lose the largest share."""
    from prune_core.surgery import global_layer_ratios, value_per_parameter

    model = _model("cifar_small")
    flat = {n: torch.linspace(0.1, 2.0, len(s)) for n, s in get_criterion("l1").score(model).items()}
    example = torch.zeros(1, 3, 32, 32)
    values = value_per_parameter(model, flat, PruneSpec(0.5, allocation="global"), example, False)
    cheapest = max(values, key=lambda n: float(values[n].mean()))
    dearest = min(values, key=lambda n: float(values[n].mean()))
    ratios = global_layer_ratios(values, 0.3, 0.9)
    assert ratios[dearest] > ratios[cheapest]
    assert global_layer_ratios(values, 0.0, 0.9) == {n: 0.0 for n in values}
    assert set(global_layer_ratios(values, 0.999, 0.9).values()) == {0.9}  # capped per layer
    outcome = prune_to_level(model, flat, PruneSpec(0.6, allocation="global"), 32)
    assert abs(outcome.achieved_level - 0.6) <= 0.03
    kept = {n: w / _widths(model)[n] for n, w in _widths(outcome.model).items()}
    assert kept[cheapest] > kept[dearest], kept


def test_channels_rounded_and_protected_layers_kept():
    from prune_core.architectures import classifier_module, stem_module

    model = _model("cifar_resnet18")
    pruned = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.6, round_to=8), 32).model
    assert stem_module(pruned).out_channels == stem_module(model).out_channels
    assert classifier_module(pruned).out_features == NUM_CLASSES
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Conv2d) and module is not stem_module(pruned):
            assert module.out_channels % 8 == 0, f"{name} has {module.out_channels} channels"


def test_bisection_ends_when_stuck_between_two_steps(monkeypatch):
    """cifar_small at 0.5 with uniform allocation falls between two steps of channel rounding
    (0.43 and 0.52 of its parameters): the search stops after three probes that find neither a
    new level nor the target, and keeps exactly the model that twelve probes kept."""
    import prune_core.surgery as surgery

    model = _model("cifar_small")
    scores = get_criterion("l1").score(model)
    calls = []
    real = surgery._prune_once
    monkeypatch.setattr(surgery, "_prune_once", lambda *a, **k: calls.append(1) or real(*a, **k))
    quick = prune_to_level(model, scores, PruneSpec(0.5), 32)
    probes = len(calls)
    monkeypatch.setattr(surgery, "STALL_PROBES", 99)
    calls.clear()
    full = prune_to_level(model, scores, PruneSpec(0.5), 32)
    assert len(calls) == 12 and probes <= 8, (probes, len(calls))
    assert quick.params_after == full.params_after and quick.channel_ratio == full.channel_ratio and quick.history == full.history
    for (name, a), b in zip(quick.model.state_dict().items(), full.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_torchvision_is_imported_only_for_its_networks():
    """The daemon's entry point and a cifar_small model load without torchvision, whose import
    pulls in torch's compiler stack (~2 s of every daemon start); a torchvision network brings it."""
    import subprocess
    import sys

    code = (
        "import sys, daemon.cli, daemon.runtime\n"
        "from prune_core import build_model\n"
        "build_model('cifar_small', 10)\n"
        "assert 'torchvision' not in sys.modules, 'torchvision imported'\n"
        "build_model('cifar_resnet18', 10)\n"
        "assert 'torchvision' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
