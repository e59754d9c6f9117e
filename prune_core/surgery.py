"""Structured (channel) pruning to a target parameter level, on Torch-Pruning's dependency graph.

Torch-Pruning traces the network and groups every tensor slice coupled to a channel (next
layers' inputs, batch norms, residual additions, concatenations, depthwise/grouped convs, SE
blocks); we supply the ranking (`ScoreImportance`) and the allocation: how many channels each
group loses so that the model sheds `level` of its parameters. A trace or a group that fails
raises LayerError naming the layer (the model given is never modified: pruning works on copies).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from .architectures import classifier_module, stem_module
from .options import ALLOCATIONS, Allocation, parse_allocations  # noqa: F401 (re-exported)
from .criteria import NORM_TYPES, Scores, channel_count
from .layer_errors import LayerError, first_line, naming_failing_layer
from .measure import count_params
from .tp_compat import pruner_setup, tp

tpf = tp.pruner.function

ROUNDING_SLACK = 0.02  # accept this miss of the level before giving up channel rounding
STALL_PROBES = 3  # bisection probes in a row that reach no new parameter count before the search ends

_OUT_FNS = (
    tpf.prune_conv_out_channels,
    tpf.prune_depthwise_conv_out_channels,
    tpf.prune_linear_out_channels,
    tpf.prune_batchnorm_out_channels,
    tpf.prune_layernorm_out_channels,
    tpf.prune_groupnorm_out_channels,
)


class ScoreImportance(tp.importance.Importance):
    """Group importance from precomputed per-layer channel scores.

    Each member layer's scores are divided by their mean and averaged over the group. With `prefer_norm_layers`, norm layers' scores are
    used when the group has any (data-aware statistics are taken after normalisation).
    Groups with no scored member fall back to the group L1 norm.
    """

    def __init__(self, scores: Scores, names: dict[nn.Module, str], prefer_norm_layers: bool = False):
        self.scores = scores
        self.names = names
        self.prefer_norm_layers = prefer_norm_layers
        self.fallback = tp.importance.GroupMagnitudeImportance(p=1)

    def __call__(self, group) -> torch.Tensor:
        members = []
        for item in group:
            dep, idxs = item.dep, item.idxs
            name = self.names.get(dep.target.module)
            if dep.handler in _OUT_FNS and name in self.scores and None not in item.root_idxs:
                members.append((dep.target.module, self.scores[name], idxs, item.root_idxs))
        if self.prefer_norm_layers and any(isinstance(m, NORM_TYPES) for m, *_ in members):
            members = [mem for mem in members if isinstance(mem[0], NORM_TYPES)]
        if not members:
            return self.fallback(group)
        size = len(group[0].root_idxs)
        total = torch.zeros(size)
        hits = torch.zeros(size)
        for _, score, idxs, root_idxs in members:
            score = score.float()
            normed = score / (score.mean() + 1e-12)
            root = torch.as_tensor(root_idxs, dtype=torch.long)
            total.scatter_add_(0, root, normed[torch.as_tensor(idxs, dtype=torch.long)])
            hits.scatter_add_(0, root, torch.ones(len(root)))
        return total / hits.clamp(min=1)


def _channel_cost(module: nn.Module, out: bool) -> float:
    """Parameters one output (`out`) or input channel of `module` holds."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight.numel()
        return w / module.out_channels + (module.bias is not None) if out else w / module.in_channels
    if isinstance(module, nn.Linear):
        return module.in_features + (module.bias is not None) if out else module.out_features
    if isinstance(module, NORM_TYPES):
        return sum(p.numel() for p in module.parameters(recurse=False)) / channel_count(module)
    return 0.0


def group_channel_cost(group) -> torch.Tensor:
    """Per channel of a dependency group: the parameters removed with it, summed over every
    coupled slice (its filter, the next layers' input slices, norm affines)."""
    cost = torch.zeros(len(group[0].root_idxs))
    for item in group:
        if None in item.root_idxs:
            continue
        per_channel = float(_channel_cost(item.dep.target.module, item.dep.handler in _OUT_FNS))
        cost.scatter_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long), torch.full((len(item.root_idxs),), per_channel))
    return cost.clamp(min=1.0)




@dataclass
class PruneSpec:
    """How to prune: `level` is the fraction of parameters to remove."""

    level: float
    allocation: Allocation = "uniform"
    round_to: int = 8
    protect_stem: bool = True
    protect_classifier: bool = True
    max_layer_ratio: float = 0.9  # no layer loses more than this share of its channels
    tolerance: float = 0.005  # stop searching once within this of `level`

    def __post_init__(self):
        if not 0.0 <= self.level < 1.0:
            raise ValueError(f"pruning level must be in [0, 1), got {self.level}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be 'uniform' or 'global', got '{self.allocation}'")
        if self.round_to < 1:
            raise ValueError("round_to must be at least 1")


History = List[list]  # Torch-Pruning's pruning history: [root layer name, out-channel pruning?, root indices] per group


@dataclass
class PruneOutcome:
    model: nn.Module
    params_before: int
    params_after: int
    channel_ratio: float
    allocation: str  # what was used: uniform falls back to global where it cannot reach the level
    history: History = field(default_factory=list)  # replays the same surgery on the unpruned model (`replay`)

    @property
    def achieved_level(self) -> float:
        return 1.0 - self.params_after / self.params_before


@dataclass
class _Candidate:
    achieved: float
    model: nn.Module
    ratio: float
    history: History


def _pruner(model: nn.Module, scores: Scores, spec: PruneSpec, example: torch.Tensor, prefer_norm: bool,
            round_to: int | None, ratio: float, layer_ratios: dict[str, float] | None = None) -> tp.pruner.MetaPruner:
    """A MetaPruner on `model` (traced now): every layer loses `ratio` of its channels, or the
    ratio `layer_ratios` gives its name. Ranking within a layer is always by `scores`."""
    setup = pruner_setup(model)
    ignored = list(setup.ignored)
    if spec.protect_stem:
        ignored.append(stem_module(model))
    if spec.protect_classifier:
        ignored.append(classifier_module(model))
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    with setup.tracing(), naming_failing_layer(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TP warns about every unwrapped parameter it handles
        return tp.pruner.MetaPruner(
            model,
            example,
            importance=ScoreImportance(scores, names, prefer_norm),
            pruning_ratio=ratio,
            pruning_ratio_dict={modules[n]: r for n, r in (layer_ratios or {}).items()} or None,
            max_pruning_ratio=spec.max_layer_ratio,
            ignored_layers=ignored,
            round_to=round_to if setup.allow_round_to else None,
            **setup.kwargs,
        )


def _prune_once(
    model: nn.Module, scores: Scores, spec: PruneSpec, ratio: float, example: torch.Tensor, prefer_norm: bool,
    round_to: int | None, before: int, layer_ratios: dict[str, float] | None = None,
) -> _Candidate:
    pruned = copy.deepcopy(model).eval()
    pruner = _pruner(pruned, scores, spec, example, prefer_norm, round_to, ratio, layer_ratios)
    _step(pruner, pruned)
    pruned.train(model.training)
    return _Candidate(1.0 - count_params(pruned) / before, pruned, ratio, copy.deepcopy(pruner.pruning_history()))


def _step(pruner: tp.pruner.MetaPruner, model: nn.Module) -> None:
    """pruner.step(), group by group: a group Torch-Pruning cannot prune raises LayerError naming
    its root layer (`model` is then half pruned: it is always a copy)."""
    names = {m: n for n, m in model.named_modules()}
    for group in pruner.step(interactive=True):
        try:
            group.prune()
        except Exception as exc:
            raise LayerError(names.get(group[0].dep.target.module, "?"), f"Torch-Pruning cannot prune it: {first_line(exc)}") from exc


def prune_at_ratio(model: nn.Module, scores: Scores, ratio: float, input_size: int) -> PruneOutcome:
    """A copy of `model` with `ratio` of every prunable layer's channels removed (no rounding, stem
    and classifier kept), in one step: what `edgetune init`'s trial prune uses."""
    before = count_params(model)
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, input_size, input_size, device=device)
    spec = PruneSpec(level=0.0, round_to=1)
    cut = _prune_once(model, scores, spec, ratio, example, False, None, before)
    return PruneOutcome(cut.model, before, count_params(cut.model), ratio, spec.allocation, cut.history)


def value_per_parameter(model: nn.Module, scores: Scores, spec: PruneSpec, example: torch.Tensor, prefer_norm: bool) -> dict[str, torch.Tensor]:
    """Per prunable group, keyed by its root layer's name: each channel's score (relative to the
    group's mean) per parameter removed with it. Global allocation ranks on this: the level is
    counted in parameters, and ranking mean-normalised scores alone would cut every layer by
    about the same share (uniform in disguise)."""
    traced = copy.deepcopy(model).eval()
    pruner = _pruner(traced, scores, spec, example, prefer_norm, None, 0.0)
    names = {m: n for n, m in traced.named_modules()}
    values = {}
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        imp = pruner.importance(group)
        if imp is not None and len(imp):
            values[names[group[0].dep.target.module]] = imp.float() / (imp.float().mean() + 1e-12) / group_channel_cost(group)
    return values


def global_layer_ratios(values: dict[str, torch.Tensor], share: float, max_ratio: float) -> dict[str, float]:
    """Per-layer channel ratios removing the `share` of all channels worth least per parameter,
    no layer more than `max_ratio` of its own."""
    every = torch.cat(list(values.values()))
    k = int(share * len(every))
    if k == 0:
        return {name: 0.0 for name in values}
    threshold = torch.kthvalue(every, k).values
    return {name: min(max_ratio, float((v <= threshold).float().mean())) for name, v in values.items()}


def _bisect(model, scores, spec, example, prefer_norm, round_to, before) -> _Candidate:
    """The candidate closest to spec.level, by bisection on the channel ratio (uniform: every
    layer's; global: the share of all channels).

    Channel counts are whole (and rounded), so the level is a step function of the ratio: where
    the target falls inside one step, bisecting further only finds the two levels either side of
    it again. After STALL_PROBES probes in a row that found no level not seen before, the search
    ends; the candidate kept is the same one (the first closest), found with fewer prunes."""
    values = value_per_parameter(model, scores, spec, example, prefer_norm) if spec.allocation == "global" else None
    lo, hi = 0.0, spec.max_layer_ratio
    ratio = min(hi, 1.0 - (1.0 - spec.level) ** 0.5)  # exact for uniform pruning of plain conv chains
    best: _Candidate | None = None
    seen: set[int] = set()  # parameter counts reached so far
    stalled = 0
    for _ in range(12):
        layer_ratios = global_layer_ratios(values, ratio, spec.max_layer_ratio) if values is not None else None
        candidate = _prune_once(model, scores, spec, ratio, example, prefer_norm, round_to, before, layer_ratios)
        if best is None or abs(candidate.achieved - spec.level) < abs(best.achieved - spec.level):
            best = candidate
        if abs(candidate.achieved - spec.level) <= spec.tolerance:
            break
        params = count_params(candidate.model)
        stalled = stalled + 1 if params in seen else 0
        seen.add(params)
        if stalled >= STALL_PROBES:
            break
        if candidate.achieved < spec.level:
            lo = ratio
        else:
            hi = ratio
        ratio = (lo + hi) / 2
    assert best is not None
    return best


def _check_no_empty_layer(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for attr in ("out_channels", "out_features", "num_features"):
            if getattr(module, attr, 1) == 0:
                raise RuntimeError(f"pruning removed every channel of layer '{name}'")


def prune_to_level(
    model: nn.Module,
    scores: Scores,
    spec: PruneSpec,
    input_size: int,
    prefer_norm_layers: bool = False,
) -> PruneOutcome:
    """A pruned copy of `model` with about `spec.level` of its parameters removed.

    The channel ratio that yields the level depends on the network (a conv's parameters shrink
    with both its inputs and outputs), so it is found by bisection on copies of the model.
    `model` itself is never modified. Level 0 returns an identical copy.
    """
    before = count_params(model)
    if spec.level == 0:
        return PruneOutcome(copy.deepcopy(model), before, before, 0.0, spec.allocation)
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, input_size, input_size, device=device)
    # Where rounding is off for the network (grouped convs, `pruner_setup`), a retry without it would prune the same.
    round_to = spec.round_to if spec.round_to > 1 and pruner_setup(model).allow_round_to else None
    best = _bisect(model, scores, spec, example, prefer_norm_layers, round_to, before)
    if round_to and abs(best.achieved - spec.level) > ROUNDING_SLACK:
        # Small layers move in steps of `round_to` channels (densenet's growth convs,
        # squeezenet's squeeze layers): where that overshoots the level, drop the rounding.
        best = _bisect(model, scores, spec, example, prefer_norm_layers, None, before)
    allocation = spec.allocation
    if allocation == "uniform" and abs(best.achieved - spec.level) > ROUNDING_SLACK:
        # Grouped convolutions (RegNet, ResNeXt) lose whole groups, so a uniform ratio moves the
        # level in coarse steps; global allocation can then land closer.
        glob = dataclasses.replace(spec, allocation="global")
        candidate = _bisect(model, scores, glob, example, prefer_norm_layers, round_to, before)
        if abs(candidate.achieved - spec.level) < abs(best.achieved - spec.level):
            best, allocation = candidate, "global"
    _check_no_empty_layer(best.model)
    return PruneOutcome(best.model, before, count_params(best.model), best.ratio, allocation, best.history)


def _graph(model: nn.Module, input_size: int) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model`, traced with the same workarounds as pruning."""
    device = next(model.parameters()).device
    setup = pruner_setup(model)
    with setup.tracing(), naming_failing_layer(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(
            model, torch.zeros(1, 3, input_size, input_size, device=device),
            unwrapped_parameters=setup.kwargs.get("unwrapped_parameters"),
        )


def replay(model: nn.Module, history: History, input_size: int) -> nn.Module:
    """A copy of `model` with the surgery `history` recorded (PruneOutcome.history) done again:
    the same channels of the same layers removed, whatever the weights are now."""
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    _graph(pruned.eval(), input_size).load_pruning_history(copy.deepcopy(history))
    _check_no_empty_layer(pruned)
    return pruned.train(was_training)


def removed_channels(model: nn.Module, history: History, input_size: int) -> dict[str, list[int]]:
    """{layer name: indices of its output channels} that replaying `history` on `model` removes:
    every conv, linear and norm layer whose outputs are coupled to a pruned group, in the
    unpruned model's numbering (groups never share output channels, so pruning one group does not
    renumber another's)."""
    scratch = copy.deepcopy(model).eval()
    graph = _graph(scratch, input_size)
    names = {m: n for n, m in scratch.named_modules()}
    removed: dict[str, set[int]] = {}
    for root_name, out, idxs in copy.deepcopy(history):
        root = scratch.get_submodule(root_name)
        handler = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, handler.prune_out_channels if out else handler.prune_in_channels, idxs)
        for item in group:
            if item.dep.handler in _OUT_FNS and item.dep.target.module in names:
                removed.setdefault(names[item.dep.target.module], set()).update(int(i) for i in item.idxs)
        group.prune(record_history=False)
    return {name: sorted(idxs) for name, idxs in removed.items()}
