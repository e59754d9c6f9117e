"""prune_core.cycle: one offline cycle on real digits, and the settings of adapting the unpruned model."""
from __future__ import annotations

import pytest
import torch

from prune_core import CycleConfig, ModelCard, TrainConfig, adaptation, build_model, count_params, run_cycle
from prune_core.criteria import Activation

MEAN = (0.1307, 0.1307, 0.1307)
STD = (0.3081, 0.3081, 0.3081)


@pytest.fixture(scope="module")
def digits():
    from prune_core.datasets import mnist5k

    data = mnist5k(32)
    keep = torch.nonzero(data.labels < 3).flatten()[:240]
    data = data.subset(keep)
    return data.subset(range(180)), data.subset(range(180, 240))


def _model():
    torch.manual_seed(0)
    return build_model("cifar_small", 10).eval(), ModelCard("cifar_small", 10, [str(i) for i in range(10)], 32, mean=MEAN, std=STD)


def _config(**kw) -> CycleConfig:
    train = TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=1, flip=False)
    return CycleConfig(**{"level": 0.6, "criterion": "activation", "train": train, "calibration_batches": 2, **kw})


def test_cycle_ranks_the_adapted_model_once_and_reaches_the_level(digits, monkeypatch):
    calls = []
    original = Activation.score
    monkeypatch.setattr(Activation, "score", lambda self, m, b=None: calls.append(1) or original(self, m, b))
    model, card = _model()
    result = run_cycle(model, card, *digits, _config(finetune_before=1))
    assert len(calls) == 1 and abs(result.summary["level_achieved"] - 0.6) <= 0.03
    assert result.summary["params_after"] < count_params(model)
    probe = result.summary["probes"][0]
    assert abs(probe["achieved_level"] - result.summary["level_achieved"]) < 1e-9
    # how the retrained model was chosen: 2 epochs, fewer than the patience (no early stop), one of them kept
    assert probe["retrain_epochs"] == 2 and 0 <= probe["kept_epoch"] <= 2 and probe["early_stop_epoch"] is None
    with torch.no_grad():
        assert result.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_several_criteria_keep_the_one_best_on_held_out(digits):
    """Each criterion's try is exactly its own single-criterion cycle (CPU runs are deterministic for a seed);
    the kept model is the try with the best held-out top-1, and its lineage names that criterion."""
    model, card = _model()
    both = run_cycle(model, card, *digits, _config(criterion="l1,activation"))
    probe = both.summary["probes"][0]
    assert set(probe["tried"]) == {"l1/uniform", "activation/uniform"}
    for name in ("l1", "activation"):
        alone = run_cycle(model, card, *digits, _config(criterion=name))
        assert alone.summary["top1_after"] == pytest.approx(probe["tried"][f"{name}/uniform"], abs=1e-9)
        assert alone.summary["criterion_used"] == name
    used = max(("l1", "activation"), key=lambda n: (probe["tried"][f"{n}/uniform"], n == "l1"))  # ties: the first named
    assert both.summary["criterion_used"] == probe["criterion"] == used == both.card.lineage.criterion
    assert both.summary["top1_after"] == pytest.approx(probe["tried"][f"{used}/uniform"], abs=1e-9)
    assert both.summary["criterion"] == "l1,activation"


def test_both_allocations_keep_the_one_best_on_held_out(digits):
    """'uniform,global' retrains one model per allocation, each exactly its single-allocation cycle, and keeps
    the better on the held-out split; the summary, probe and lineage name the allocation of the kept model."""
    model, card = _model()
    both = run_cycle(model, card, *digits, _config(level=0.7, allocation="uniform,global"))
    probe = both.summary["probes"][0]
    assert set(probe["tried"]) == {"activation/uniform", "activation/global"}
    alone = {a: run_cycle(model, card, *digits, _config(level=0.7, allocation=a)) for a in ("uniform", "global")}
    widths = lambda m: [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert widths(alone["uniform"].model) != widths(alone["global"].model)  # two different models were tried
    for a, result in alone.items():
        assert result.summary["top1_after"] == pytest.approx(probe["tried"][f"activation/{a}"], abs=1e-9)
        assert result.summary["allocation_used"] == result.card.lineage.allocation == a
    used = max(("uniform", "global"), key=lambda a: (probe["tried"][f"activation/{a}"], a == "uniform"))  # ties: the first
    assert both.summary["allocation_used"] == probe["allocation"] == both.card.lineage.allocation == used
    assert widths(both.model) == widths(alone[used].model)
    assert both.summary["top1_after"] == pytest.approx(probe["tried"][f"activation/{used}"], abs=1e-9)
    assert both.summary["allocation"] == "uniform,global"


@pytest.mark.parametrize("bad, message", [("magic", "unknown criterion 'magic'"), ("l1,l1", "twice"), ("", "unknown criterion ''")])
def test_bad_criterion_lists_are_refused(bad, message):
    from prune_core import parse_criteria

    with pytest.raises(ValueError, match=message):
        parse_criteria(bad)
    assert parse_criteria("taylor, apoz") == ("taylor", "apoz")


@pytest.mark.parametrize("bad, message", [("even", "unknown allocation 'even'"), ("global,global", "twice"), ("", "unknown allocation ''")])
def test_bad_allocation_lists_are_refused(bad, message):
    from prune_core import PruneSpec, parse_allocations

    with pytest.raises(ValueError, match=message):
        parse_allocations(bad)
    assert parse_allocations("global, uniform") == ("global", "uniform")
    with pytest.raises(ValueError, match="allocation must be"):
        PruneSpec(0.5, allocation="uniform,global")  # one spec is one allocation; the cycle tries a list


def test_adaptation_uses_cross_entropy_on_labelled_samples():
    cfg = adaptation(TrainConfig(epochs=5, distill_weight=0.7, lr=0.02), 2)
    assert (cfg.epochs, cfg.distill_weight, cfg.lr) == (2, 0.0, 0.02)


def test_max_layer_ratio_caps_what_any_layer_loses(digits):
    """Global allocation spends the level where parameters are; `max_layer_ratio` keeps it from cutting one
    layer (cifar_small's residual trunk) down to a few channels."""
    model, card = _model()
    widths = lambda m: {n: c.out_channels for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d)}  # noqa: E731
    full = widths(model)
    lost = {}
    for cap in (0.9, 0.5):
        result = run_cycle(model, card, *digits, _config(level=0.7, allocation="global", max_layer_ratio=cap, train=TrainConfig(epochs=0)))
        assert abs(result.summary["level_achieved"] - 0.7) <= 0.03
        lost[cap] = max(1 - w / full[n] for n, w in widths(result.model).items())
    assert lost[0.5] <= 0.5 < lost[0.9]


def test_split_judging_keeps_a_stable_disjoint_share_apart(digits):
    from prune_core import split_judging

    _, held = digits
    choose, judge = split_judging(held, 0.5)
    again = split_judging(held, 0.5)
    assert judge is not None and sorted(choose.keys + judge.keys) == sorted(held.keys)
    assert not set(choose.keys) & set(judge.keys) and 0 < len(judge) < len(held)
    assert (again[0].keys, again[1].keys) == (choose.keys, judge.keys)
    assert split_judging(held, 0.0) == (held, None)
    one = held.subset([0])
    assert split_judging(one, 0.5) == (one, None)  # a part would be empty: the choosing samples judge too


def test_the_verdict_is_measured_on_the_judging_samples_alone(digits):
    """The samples that chose the epoch are not the ones that judge: the summary's top-1, agreement and
    per-class counts come from `judge_set`; with no labels there, the verdict rests on agreement."""
    from prune_core import batches, evaluate, split_judging

    train, held = digits
    choose, judge = split_judging(held, 0.5)
    model, card = _model()
    s = run_cycle(model, card, train, choose, _config(), judge_set=judge).summary
    assert (s["choosing_samples"], s["held_out_samples"], s["held_out_labelled"]) == (len(choose), len(judge), len(judge))
    assert s["chosen_by"] == s["evidence"] == "labels"
    assert sum(c["total"] for c in s["held_out_per_class"].values()) == len(judge)
    assert s["top1_before"] == evaluate(model, batches(judge, 32, MEAN, STD)).top1
    unlabelled = judge.subset(range(len(judge)))
    unlabelled.labels[:] = -1
    s = run_cycle(model, card, train, choose, _config(), judge_set=unlabelled).summary
    assert s["chosen_by"] == "labels" and s["evidence"] == "agreement" and s["held_out_labelled"] == 0
    assert s["top1_before"] != s["top1_before"] and 0.0 <= s["agreement_with_before"] <= 1.0  # NaN: no labels to judge by
