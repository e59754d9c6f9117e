"""Replaying a recorded prune, the channels it removes, and fading them out before removal."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prune_core import ARCHS, CycleConfig, ModelCard, PruneSpec, TrainConfig, build_model, get_criterion, prune_to_level, run_cycle, train
from prune_core.fade import ChannelFade
from prune_core.surgery import removed_channels, replay

MEAN = (0.1307, 0.1307, 0.1307)
STD = (0.3081, 0.3081, 0.3081)


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    with torch.no_grad():  # non-trivial norm statistics, so a zeroed channel is not zero by accident
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
    return model


def _input(arch: str) -> torch.Tensor:
    size = ARCHS[arch].image_size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _zeroed(model: nn.Module, removed: dict[str, list[int]]) -> nn.Module:
    zeroed = copy.deepcopy(model)
    ChannelFade(zeroed, removed).apply(0.0)
    return zeroed


# residual additions, depthwise convs + squeeze-excitation, concatenations (inception, fire modules)
@pytest.mark.parametrize("arch", ["cifar_resnet18", "mobilenet_v3_small", "googlenet", "squeezenet1_1"])
def test_zeroing_the_removed_channels_is_the_pruned_model(arch):
    model = _model(arch)
    size = ARCHS[arch].image_size
    outcome = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.5, allocation="global"), size)
    again = replay(model, outcome.history, size).eval()
    assert [p.shape for p in again.parameters()] == [p.shape for p in outcome.model.parameters()]
    removed = removed_channels(model, outcome.history, size)
    assert removed and all(idxs for idxs in removed.values())
    with torch.no_grad():
        pruned_out = outcome.model.eval()(_input(arch))
        assert torch.equal(again(_input(arch)), pruned_out)
        assert torch.allclose(_zeroed(model, removed)(_input(arch)), pruned_out, atol=1e-5)
        assert not torch.allclose(model(_input(arch)), pruned_out, atol=1e-3)  # the check can fail


def test_replay_keeps_weights_it_is_given():
    """Replaying on retrained weights removes the same channels and keeps the new values."""
    model = _model("cifar_small")
    outcome = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.6, allocation="global"), 32)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(1.5)
    again = replay(changed, outcome.history, 32)
    assert [p.shape for p in again.parameters()] == [p.shape for p in outcome.model.parameters()]
    assert not torch.equal(again.fc.weight, outcome.model.fc.weight)
    assert torch.equal(again.fc.weight, outcome.model.fc.weight * 1.5)


def test_fade_schedule_reaches_zero_and_leaves_other_channels_training():
    from prune_core.datasets import mnist5k

    data = mnist5k(32)
    data = data.subset(torch.nonzero(data.labels < 4).flatten()[:64])
    model = _model("cifar_small")
    outcome = prune_to_level(model, get_criterion("l1").score(model), PruneSpec(0.7, allocation="global"), 32)
    removed = removed_channels(model, outcome.history, 32)
    fading = copy.deepcopy(model)
    fade = ChannelFade(fading, removed)
    scales = []
    train(fading, data, None, MEAN, STD, TrainConfig(epochs=2, batch_size=16, lr=0.05, flip=False),
          on_step=lambda done: (scales.append(done), fade.schedule(done)))
    assert scales == sorted(scales) and scales[-1] == pytest.approx(1.0)
    name = "layer2.1.bn2"  # the residual trunk's last norm layer: the group l1 ranks lowest per parameter here
    bn = fading.get_submodule(name)
    gone = torch.tensor(removed[name])
    kept = torch.tensor(sorted(set(range(bn.num_features)) - set(removed[name])))
    assert torch.count_nonzero(bn.weight[gone]) == 0 and torch.count_nonzero(bn.bias[gone]) == 0
    assert not torch.allclose(bn.weight[kept], model.get_submodule(name).weight[kept])  # the survivors trained
    pruned = replay(fading, outcome.history, 32).eval()
    with torch.no_grad():  # the faded network and the pruned one compute the same function
        assert torch.allclose(fading.eval()(_input("cifar_small")), pruned(_input("cifar_small")), atol=1e-5)


def test_cycle_with_fade_prunes_the_same_channels_to_the_level():
    from prune_core.datasets import mnist5k

    data = mnist5k(32)
    data = data.subset(torch.nonzero(data.labels < 3).flatten()[:120])
    fit, held = data.subset(range(90)), data.subset(range(90, 120))
    model = _model("cifar_small")
    card = ModelCard("cifar_small", 10, [str(i) for i in range(10)], 32, mean=MEAN, std=STD)
    cfg = dict(level=0.8, criterion="l1", allocation="global", train=TrainConfig(epochs=1, batch_size=32, lr=0.05, flip=False))
    plain = run_cycle(model, card, fit, held, CycleConfig(**cfg))
    faded = run_cycle(model, card, fit, held, CycleConfig(**cfg, fade_epochs=1))
    assert faded.summary["fade_epochs"] == 1 and abs(faded.summary["level_achieved"] - 0.8) <= 0.02
    assert [p.shape for p in faded.model.parameters()] == [p.shape for p in plain.model.parameters()]
    assert not torch.equal(faded.model.fc.weight, plain.model.fc.weight)
