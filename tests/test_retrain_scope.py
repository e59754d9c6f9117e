"""Partial retraining (prune_core.scope, TrainConfig.scope): which parameters train, that the frozen
ones stay as they were, that the frozen front keeps no activation for backward, and that the scope
works on a pruned model, a timm model and a user's module, and is recorded by a cycle."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prune_core.architectures import build_model
from prune_core.criteria import get_criterion
from prune_core.cycle import CycleConfig, run_cycle
from prune_core.data import ImageSet
from prune_core.model_format import ModelCard, read_card, save_model
from prune_core.options import RetrainScope, parse_scope
from prune_core.retrain import TrainConfig, train
from prune_core.scope import Frozen, plan_scope, weight_layers
from prune_core.surgery import PruneSpec, prune_to_level

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    """48 MNIST-5k digits of classes 0-3 at 32 px: 32 to train on, 16 held out."""
    from prune_core.datasets import mnist5k

    data = mnist5k(32)
    return data.subset(torch.nonzero(data.labels < 4).flatten()[:48])


def model(arch: str = "cifar_small", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, 4, kwargs or None)


def config(scope, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(epochs=1, batch_size=16, lr=0.05, seed=1, flip=False, augment=False, scope=scope), **kw})


def test_last_stages_are_the_last_share_of_the_weight_layers():
    net = model()
    assert weight_layers(net) == ["stem.0", "layer1.0", "layer2.0.0", "layer2.1.conv1", "layer2.1.conv2", "layer3.0", "fc"]
    plan = plan_scope(net, RetrainScope.LAST, 0.25)  # ceil(0.25 * 7) = 2 layers: layer3's conv and fc
    assert plan.first_trained_layer == "layer3.0"
    assert set(plan.trainable) == {"layer3.0.weight", "layer3.1.weight", "layer3.1.bias", "fc.weight", "fc.bias"}
    assert plan_scope(net, "last", 0.5).first_trained_layer == "layer2.1.conv1"  # ceil(3.5) = 4 layers
    assert plan_scope(net, "last", 1.0).trainable == plan_scope(net, "full", 0.25).trainable
    bn = plan_scope(net, RetrainScope.LAST_BN, 0.25)
    assert set(bn.trainable) == set(plan.trainable) | {f"{m}.{a}" for m in ("stem.1", "layer1.1", "layer2.0.1", "layer2.1.bn1", "layer2.1.bn2") for a in ("weight", "bias")}
    bias = plan_scope(net, RetrainScope.BIAS, 0.25)  # cifar_small's convs have no bias: norm layers and the classifier
    assert not any(name.endswith(".weight") and "fc" not in name and name not in bn.trainable for name in bias.trainable)
    assert {"fc.weight", "fc.bias", "stem.1.bias"} <= set(bias.trainable)
    assert bias.trainable_params < plan.trainable_params < plan_scope(net, "full", 0.25).trainable_params


def test_bad_scope_and_share_are_refused():
    with pytest.raises(ValueError, match="full, last, last_bn, bias"):
        parse_scope("everything")
    with pytest.raises(ValueError, match="last_share"):
        TrainConfig(last_share=0.0)
    assert TrainConfig(scope="bias").scope is RetrainScope.BIAS


def changed(before: dict, after: nn.Module) -> set[str]:
    return {name for name, p in after.named_parameters() if not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("scope", list(RetrainScope))
def test_only_the_scope_trains(digits, scope):
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = train(net, digits.subset(range(32)), None, MEAN, STD, config(scope))  # no held-out split: the last epoch is kept
    trainable = set(result.plan.trainable)
    assert changed(before, net) == trainable  # every trainable parameter moved, no frozen one did
    assert all(p.requires_grad for p in net.parameters())  # restored for whoever uses the model next
    # batch-norm statistics of the frozen front still follow the data (no graph is needed for that)
    assert not torch.equal(before["stem.1.running_mean"], net.stem[1].running_mean)


def saved_for_backward(net: nn.Module, plan, x: torch.Tensor) -> list[torch.Size]:
    """Shapes of the activations (not parameters) one forward pass keeps for backward under `plan`."""
    frozen = Frozen(net, plan)
    params = {p.data_ptr() for p in net.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(t.shape)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x).sum().backward()
    finally:
        frozen.release()
    return shapes


def spatial(shapes) -> set[int]:
    return {s[-1] for s in shapes if len(s) == 4}


def test_the_frozen_front_keeps_no_activation():
    net, x = model().train(), torch.randn(4, 3, 32, 32)
    # cifar_small runs at 32, 16, 8 and 4 px; layer3 (its last conv) takes 8 px in and gives 4 px out
    assert spatial(saved_for_backward(net, plan_scope(net, "full", 0.25), x)) == {32, 16, 8, 4}
    assert spatial(saved_for_backward(net, plan_scope(net, "last", 0.25), x)) == {8, 4}
    # a trainable norm layer in the stem needs the graph from there on: no activation is saved by these scopes
    for scope in ("last_bn", "bias"):
        assert 32 in spatial(saved_for_backward(net, plan_scope(net, scope, 0.25), x))


class OutOfOrder(nn.Module):
    """Registers its classifier first and runs it last: module order is not execution order."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.head = nn.Linear(8, num_classes)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.tail = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.tail(self.body(x)).mean((2, 3)))


def test_gradients_are_those_of_the_whole_graph_whatever_the_module_order():
    """The trainable parameters get exactly the gradients they get when everything trains."""
    torch.manual_seed(0)
    net, x = OutOfOrder().train(), torch.randn(4, 3, 8, 8)
    plan = plan_scope(net, "last", 0.5)  # weight layers head, body.0, tail: the last 2 are body.0 and tail
    assert plan.first_trained_layer == "body.0" and "head.weight" in plan.frozen
    reference = copy.deepcopy(net)
    reference(x).square().mean().backward()
    frozen = Frozen(net, plan)
    try:
        net(x).square().mean().backward()
    finally:
        frozen.release()
    expected = dict(reference.named_parameters())
    for name, p in net.named_parameters():
        if name in plan.trainable:
            torch.testing.assert_close(p.grad, expected[name].grad)
        else:
            assert p.grad is None, name


def pruned_model() -> nn.Module:
    net = model()
    criterion = get_criterion("l1")
    return prune_to_level(net, criterion.score(net, None), PruneSpec(0.5), 32, criterion.prefer_norm_layers).model


@pytest.mark.parametrize("arch,kwargs", [("pruned", None), ("timm:regnetx_002", None), ("custom_models:build", {"width": 8})])
def test_last_stages_on_a_pruned_a_timm_and_a_users_model(digits, arch, kwargs):
    net = pruned_model() if arch == "pruned" else model(arch, **(kwargs or {}))
    plan = plan_scope(net, "last", 0.25)
    front = [name for name, p in net.named_parameters() if name in plan.frozen]
    assert front and plan.trainable
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train(net, digits.subset(range(32)), None, MEAN, STD, config("last", last_share=0.25))
    moved = changed(before, net)
    # no frozen parameter moved; not every trainable one need (timm zero-initialises each block's last
    # batch-norm scale, so the block's other parameters get no gradient in the first steps)
    assert moved <= set(plan.trainable) and len(moved) >= len(plan.trainable) / 2
    # the first layer's output, computed under the plan, carries no graph
    frozen = Frozen(net.train(), plan)
    outputs = []
    first = dict(net.named_modules())[weight_layers(net)[0]]
    handle = first.register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        assert net(torch.randn(2, 3, 32, 32)).grad_fn is not None
    finally:
        handle.remove()
        frozen.release()
    assert outputs[0].grad_fn is None and not outputs[0].requires_grad


def test_a_cycle_records_its_scope(digits, tmp_path):
    net = model()
    card = ModelCard("cifar_small", 4, list("0123"), 32, mean=MEAN, std=STD)
    cfg = CycleConfig(level=0.5, criterion="l1", train=config(RetrainScope.LAST, last_share=0.25))
    result = run_cycle(net, card, digits.subset(range(32)), digits.subset(range(32, 48)), cfg)
    assert result.summary["retrain_scope"] == "last"
    plan = result.summary["retrain_plan"]
    assert plan["scope"] == "last" and plan["first_trained_layer"] == "layer3.0" and 0 < plan["trainable_share"] < 1
    assert result.summary["probes"][0]["retrain_front"].startswith("front up to 'layer3.0' in micro-batches of")
    assert result.card.lineage.retrain_scope == "last"
    save_model(result.model, result.card, tmp_path / "m")
    assert read_card(tmp_path / "m").lineage.retrain_scope == "last"


def test_a_shared_parameter_is_planned_once():
    net = OutOfOrder()
    net.extra = nn.Linear(8, 4)
    net.extra.weight = net.head.weight  # tied: one parameter, two owners
    plan = plan_scope(net, "bias", 0.25)
    names = plan.trainable + plan.frozen
    assert "extra.weight" not in names and names.count("head.weight") == 1  # decided under its first owner
    assert plan.params == sum(p.numel() for p in net.parameters())
    Frozen(net, plan).release()


# --- the frozen front run apart (prune_core.front) ---------------------------------------------


def front_modules_in_eval(net: nn.Module, split) -> nn.Module:
    """A copy of `net` whose front (the modules `split` runs apart) is in eval mode, the rest as `net`."""
    ref = copy.deepcopy(net)
    by_id = {id(m): name for name, m in net.named_modules()}
    for m in split.front:
        ref.get_submodule(by_id[id(m)]).eval()
    return ref


def loss_and_grads(forward, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss = nn.functional.cross_entropy(forward(x), y)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_front_in_micro_batches_gives_the_whole_forwards_loss_and_gradients(mode):
    """The split front (8 images in micro-batches of 2) gives the loss and gradients of the whole
    forward with the front's layers in eval mode; the frozen parameters get no gradient."""
    from prune_core.front import FrontSplit, split_front

    torch.manual_seed(0)
    net, x, y = pruned_model().train(mode == "train"), torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    plan = plan_scope(net, "last", 0.25)
    frozen = Frozen(net, plan)
    try:
        split = split_front(net, plan, x, chunks=4)
        assert isinstance(split, FrontSplit) and split.cut_name == "layer3.0" and split.chunk == 2
        assert any(isinstance(m, nn.BatchNorm2d) for m in split.front)
        ref = front_modules_in_eval(net, split)
        ref_frozen = Frozen(ref, plan)
        try:
            want_loss, want = loss_and_grads(ref, ref, x, y)
        finally:
            ref_frozen.release()
        stem_stats = net.stem[1].running_mean.clone()
        got_loss, got = loss_and_grads(split, net, x, y)
    finally:
        frozen.release()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
    for name in plan.trainable:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert all(got[name] is None for name in plan.frozen)
    assert torch.equal(net.stem[1].running_mean, stem_stats)  # eval mode: the front's statistics stay
    assert all(m.training == (mode == "train") for m in split.front)  # the front's modes are restored


class CrossesTheCut(nn.Module):
    """Its last layer also reads the front's features directly: no cut splits it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.tail = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.body(x)
        return self.head((self.tail(h) + h).mean((2, 3)))


def test_a_model_that_does_not_split_runs_whole_and_says_why(digits):
    from prune_core.front import split_front

    torch.manual_seed(0)
    net = CrossesTheCut()
    plan = plan_scope(net, "last", 0.5)  # tail and head
    assert plan.first_trained_layer == "tail"
    frozen = Frozen(net, plan)
    try:
        reason = split_front(net, plan, torch.randn(8, 3, 16, 16), chunks=4)
    finally:
        frozen.release()
    assert isinstance(reason, str) and "does not split at 'tail'" in reason
    assert "no frozen front" in split_front(net, plan_scope(net, "full", 0.5), torch.randn(8, 3, 16, 16), chunks=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = train(net, digits.subset(range(32)), None, MEAN, STD, config("last", last_share=0.5))
    assert result.front == reason  # trained whole, as before: the frozen front's statistics follow the batches
    assert changed(before, net) == set(plan.trainable)
    assert not torch.equal(before["body.1.running_mean"], net.body[1].running_mean)


def test_training_the_last_stages_recalibrates_the_front_then_keeps_it(digits):
    """The front's batch-norm statistics are those of the training images (one pass, before training),
    and training in micro-batches changes only the trainable parameters."""
    from prune_core.data import batches

    net = pruned_model()
    data = digits.subset(range(32))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = train(net, data, None, MEAN, STD, config("last", last_share=0.25, front_chunks=4))
    assert result.front == "front up to 'layer3.0' in micro-batches of 4"
    assert changed(before, net) == set(result.plan.trainable)
    x = torch.cat([x for x, _ in batches(data, 16, MEAN, STD)])
    with torch.no_grad():
        stem = net.stem[0](x)  # the stem's convolution is frozen: its output over the training images
    torch.testing.assert_close(net.stem[1].running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
