#!/usr/bin/env python
"""Survey torch-pruning (1.6.1) on every architecture in ``prune_core.architectures``.

For every architecture (num_classes=10, input at the arch's default image size S)
and for uniform (``global_pruning=False``) and global (``global_pruning=True``)
pruning this script

* runs ``tp.pruner.MetaPruner(model, torch.randn(1, 3, S, S),
  importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=r,
  global_pruning=..., ignored_layers=[classifier, stem], round_to=8)`` once
  *without* any workaround at r=0.5 ("vanilla": does it crash? does it silently
  skip layers?),
* bisects the pruning ratio r that removes ~50% of the parameters (with the
  per-architecture workarounds below),
* at that ratio checks: forward at S (and at S+32), 10 output classes, no
  conv/linear/bn/layernorm with 0 channels or inconsistent attributes, a
  train-mode forward/backward at batch 2, the removed parameter / MAC fraction
  (``tp.utils.count_ops_and_params``), and times the DependencyGraph build
  (MetaPruner construction, incl. tracing) and ``step()`` (best of ``--repeat``),
* "mask" check: the pruned network must compute exactly what the *unpruned*
  network computes when the input-channel weights of every consumer of a
  removed channel are zeroed.  This proves TP coupled the right channels (not
  just that shapes fit).  Not applicable to networks that normalise over
  channels (ConvNeXt's LayerNorm): reported as n/a,
* "rebuild" check: a fresh ``build_model(arch, 10)`` whose module attributes
  (in_channels, out_channels, groups, num_features, in_features, out_features,
  normalized_shape) are set per module name and whose parameters/buffers are
  replaced by empty tensors of the saved shapes must ``load_state_dict(...,
  strict=True)`` the pruned weights and produce identical outputs.

Workarounds (``make_pruner``; switch off with ``--no-workarounds``):

* grouped (non-depthwise) convs + ``round_to`` (resnext50_32x4d, regnet_y_400mf):
  TP 1.6.1's ``BasePruner._round_to`` gets the number of pruned channels *per
  channel group* but the *total* channel count, so it rounds to "prune
  everything", ``check_pruning_group`` then rejects the group and every group
  touching a grouped conv is silently left unpruned.  ``GroupConvRoundingPruner``
  rounds per channel group instead.
* shufflenet_v2: ``channel_shuffle`` (view/transpose/view) crashes the DG build
  (ZeroDivisionError in ``update_reshape_index_mapping``) and TP cannot map
  indices through the permutation anyway.  We trace with ``channel_shuffle``
  patched to the identity and ignore every conv that writes into the shuffled
  trunk, so only the hidden channels inside branch2 (and conv5) are pruned.
  That also needs ``split_shape_fix`` (TP mis-infers ``x.chunk(2)`` sizes
  under torch 2.x), which is applied for every arch.
* convnext: ``CNBlock.layer_scale`` (shape (C,1,1)) is an unwrapped
  nn.Parameter; TP auto-detects it (with a warning) and prunes dim 0, which is
  right; we pass it explicitly via ``unwrapped_parameters``.

Run: ``python bench/tp_survey.py`` (all archs; run times in bench/RESULTS.md) or
``python bench/tp_survey.py --archs resnet18,cifar_small --ratio 0.3``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
import traceback
import warnings

import torch
import torch.nn as nn
import torch_pruning as tp

STRUCT_ATTRS = ("in_channels", "out_channels", "groups", "num_features",
                "in_features", "out_features", "normalized_shape")


from prune_core import architectures as A  # noqa: E402


# ---------------------------------------------------------------------------
# Workarounds (the product's live in prune_core.tp_compat; the grouped-conv rounding pruner
# below is an experiment the product does not use: it turns rounding off for such nets)
# ---------------------------------------------------------------------------

from prune_core.tp_compat import (  # noqa: E402,I001
    convnext_layer_scales, grouped_convs, shufflenet_trace_patch, shufflenet_trunk_convs, split_shape_fix,
)


def is_depthwise(m: nn.Module) -> bool:
    # same test TP uses (BasePruner.__init__ / DependencyGraph.get_pruning_group)
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.out_channels


class GroupConvRoundingPruner(tp.pruner.BasePruner):
    """BasePruner whose ``round_to`` also works for groups that contain grouped convs.

    In ``BasePruner._prune`` the rounding is done as
    ``_round_to(n_pruned, get_channel_fn(root_module), round_to)`` where for a
    group with ``ch_groups > 1`` ``n_pruned`` counts channels *per channel group*
    while ``get_channel_fn`` returns the *total* channel count.  We remember the
    channel-group count of every root module (``_get_channel_groups``) and the
    module whose channels were queried last (wrapping ``DG.get_*_channels``), and
    round the per-group kept count ``k'`` so that ``G*k'`` is a multiple of
    ``round_to`` (i.e. ``k'`` a multiple of ``round_to / gcd(G, round_to)``).
    If that would prune a channel group completely, no rounding is applied.
    """

    def __init__(self, *args, **kwargs):
        self._root_ch_groups: dict = {}
        self._last_queried = None
        super().__init__(*args, **kwargs)
        for fn_name in ("get_out_channels", "get_in_channels"):
            orig = getattr(self.DG, fn_name)

            def wrapped(module_or_node, _orig=orig):
                self._last_queried = module_or_node
                return _orig(module_or_node)
            setattr(self.DG, fn_name, wrapped)

    def _get_channel_groups(self, group) -> int:
        g = super()._get_channel_groups(group)
        self._root_ch_groups[group[0].dep.target.module] = g
        return g

    def _round_to(self, n_pruned, current_channels, round_to):
        g = self._root_ch_groups.get(self._last_queried, 1)
        if g <= 1 or current_channels % g:
            return super()._round_to(n_pruned, current_channels, round_to)
        per_group = current_channels // g
        step = round_to // math.gcd(g, round_to)
        keep = per_group - n_pruned
        keep_rounded = keep - keep % step
        if keep_rounded <= 0:
            keep_rounded = keep
        return max(per_group - keep_rounded, 0)


def make_pruner(arch, model, example, ratio, global_pruning, round_to=8,
                workarounds=True, ignore_stem=True):
    ignored = [A.classifier_module(model)]
    if ignore_stem:
        ignored.append(A.stem_module(model))
    kwargs = {}
    cls = tp.pruner.MetaPruner
    ctx = contextlib.ExitStack()
    notes = []
    if workarounds:
        ctx.enter_context(split_shape_fix())  # harmless where there is no chunk/split
        if arch.startswith("shufflenet"):
            ignored += shufflenet_trunk_convs(model)
            ctx.enter_context(shufflenet_trace_patch())
            notes.append("shuffle-patch")
        if arch.startswith("convnext"):
            kwargs["unwrapped_parameters"] = convnext_layer_scales(model)
            notes.append("layer_scale")
        if round_to and grouped_convs(model):
            cls = GroupConvRoundingPruner
            notes.append("grp-round")
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = cls(model, example,
                     importance=tp.importance.GroupMagnitudeImportance(p=1),
                     pruning_ratio=ratio, global_pruning=global_pruning,
                     ignored_layers=ignored, round_to=round_to, **kwargs)
    return pruner, notes


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

def n_params(model):
    return sum(p.numel() for p in model.parameters())


def structure_problems(model):
    probs = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            if (0 in w.shape or w.shape[0] != m.out_channels
                    or w.shape[1] * m.groups != m.in_channels
                    or m.in_channels % m.groups or m.out_channels % m.groups):
                probs.append(f"{n}: conv in={m.in_channels} out={m.out_channels} g={m.groups} w={tuple(w.shape)}")
        elif isinstance(m, nn.BatchNorm2d):
            if m.num_features == 0 or m.weight.shape[0] != m.num_features or m.running_mean.shape[0] != m.num_features:
                probs.append(f"{n}: bn {m.num_features}")
        elif isinstance(m, nn.Linear):
            if 0 in m.weight.shape or tuple(m.weight.shape) != (m.out_features, m.in_features):
                probs.append(f"{n}: linear {m.in_features}->{m.out_features} w={tuple(m.weight.shape)}")
        elif isinstance(m, nn.LayerNorm):
            if m.weight.numel() == 0 or tuple(m.weight.shape) != tuple(m.normalized_shape):
                probs.append(f"{n}: layernorm {m.normalized_shape}")
    return probs


def step_recording(pruner):
    """pruner.step() that records, per consumer conv/linear, the *original*
    input-channel indices it lost (for the mask-equivalence check)."""
    removed: dict[nn.Module, list[int]] = {}
    remaining: dict[nn.Module, list[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            m = dep.target.module
            if not isinstance(m, (nn.Conv2d, nn.Linear)) or is_depthwise(m):
                continue
            if not pruner.DG.is_in_channel_pruning_fn(dep.handler):
                continue
            n_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            rem = remaining.setdefault(m, list(range(n_in)))
            assert len(rem) == n_in, "in-channel bookkeeping out of sync"
            drop = set(int(i) for i in idxs)
            removed.setdefault(m, []).extend(rem[i] for i in drop)
            remaining[m] = [c for j, c in enumerate(rem) if j not in drop]
        group.prune()
    return removed


@torch.no_grad()
def masked_reference(ref, pruned, removed):
    """Zero, in the unpruned copy ``ref``, every weight reading a removed channel."""
    names = {m: n for n, m in pruned.named_modules()}
    ref_mods = dict(ref.named_modules())
    for m, idxs in removed.items():
        r = ref_mods[names[m]]
        if isinstance(r, nn.Linear):
            r.weight[:, idxs] = 0
        else:
            g = r.groups
            in_pg, out_pg = r.in_channels // g, r.out_channels // g
            for i in idxs:
                gi = i // in_pg
                r.weight[gi * out_pg:(gi + 1) * out_pg, i % in_pg] = 0
    return ref


def capture_structure(model):
    attrs = {n: {a: getattr(m, a) for a in STRUCT_ATTRS if hasattr(m, a)}
             for n, m in model.named_modules()}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return attrs, shapes


def rebuild(arch, num_classes, attrs, shapes):
    model = A.build_model(arch, num_classes)
    for name, mod in model.named_modules():
        for a, v in attrs.get(name, {}).items():
            setattr(mod, a, v)
        prefix = f"{name}." if name else ""
        for pn, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, pn, nn.Parameter(torch.empty(shapes[prefix + pn], dtype=p.dtype),
                                          requires_grad=p.requires_grad))
        for bn, b in list(mod.named_buffers(recurse=False)):
            if b is not None and prefix + bn in shapes:
                mod._buffers[bn] = torch.empty(shapes[prefix + bn], dtype=b.dtype)
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------
# Survey
# ---------------------------------------------------------------------------

def prune_copy(arch, base, example, ratio, glob, round_to, workarounds, ignore_stem, record=False):
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    pruner, notes = make_pruner(arch, model, example, ratio, glob, round_to, workarounds, ignore_stem)
    t1 = time.perf_counter()
    removed = step_recording(pruner) if record else pruner.step()
    t2 = time.perf_counter()
    return model, removed, notes, t1 - t0, t2 - t1


def find_ratio(arch, base, example, glob, target, round_to, workarounds, ignore_stem, tol=0.01):
    p0 = n_params(base)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        r = (lo + hi) / 2
        model, *_ = prune_copy(arch, base, example, r, glob, round_to, workarounds, ignore_stem)
        frac = 1 - n_params(model) / p0
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (r, frac)
        if abs(frac - target) <= tol / 2:
            break
        lo, hi = (r, hi) if frac < target else (lo, r)
    return best


def survey_arch(arch, args):
    spec = A.ARCHS[arch]
    S = spec.image_size
    torch.manual_seed(0)
    base = A.build_model(arch, 10).eval()
    example = torch.randn(1, 3, S, S)
    with torch.no_grad():
        ops0, p0 = tp.utils.count_ops_and_params(base, example)
    row = dict(arch=arch, S=S, params=p0, macs=ops0)

    # 1. vanilla MetaPruner at r=0.5, no workaround
    if not args.skip_vanilla:
        try:
            model, *_ = prune_copy(arch, base, example, 0.5, False, args.round_to, False, True)
            with torch.no_grad():
                y = model(example)
            grp_before = [(m.in_channels, m.out_channels) for m in grouped_convs(base)]
            grp_after = [(m.in_channels, m.out_channels) for m in grouped_convs(model)]
            untouched = sum(a == b for a, b in zip(grp_before, grp_after))
            v = "ok" if tuple(y.shape) == (1, 10) else f"shape {tuple(y.shape)}"
            short = v
            if grp_before and untouched:
                v += f", {untouched}/{len(grp_before)} grouped convs unpruned"
                short = f"{untouched}/{len(grp_before)}grp-skip"
            v += f", -{1 - n_params(model) / p0:.0%} params"
        except Exception as e:  # noqa: BLE001
            v = f"{type(e).__name__}: {str(e)[:60]}"
            short = type(e).__name__
        row["vanilla"], row["vanilla_short"] = v, short

    for glob in (False, True):
        key = "glob" if glob else "unif"
        try:
            if args.ratio is not None:
                r = args.ratio
            else:
                r, _ = find_ratio(arch, base, example, glob, args.target, args.round_to,
                                  not args.no_workarounds, not args.keep_stem)
            model, removed, notes, t_dg, t_step = prune_copy(
                arch, base, example, r, glob, args.round_to, not args.no_workarounds,
                not args.keep_stem, record=True)
            for _ in range(args.repeat - 1):  # timings: best of --repeat runs
                _, _, _, t1, t2 = prune_copy(arch, base, example, r, glob, args.round_to,
                                             not args.no_workarounds, not args.keep_stem)
                t_dg, t_step = min(t_dg, t1), min(t_step, t2)
            res = dict(ratio=r, notes=notes, t_dg=t_dg, t_step=t_step)
            res["probs"] = structure_problems(model)
            # layers whose output width did not change (frozen by ignored layers / coupling)
            base_mods = dict(base.named_modules())
            convs = [(n, m) for n, m in model.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not A.classifier_module(model)]
            width = lambda m: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features  # noqa: E731
            res["frozen"] = (sum(width(m) == width(base_mods[n]) for n, m in convs), len(convs))
            g0 = grouped_convs(base)
            if g0:
                g1 = grouped_convs(model)
                res["grouped_pruned"] = (sum(a.in_channels != b.in_channels for a, b in zip(g0, g1)), len(g0))
            # non-layer modules carrying channel attributes that TP does not update
            res["stale"] = sorted({type(m).__name__ for m in model.modules()
                                   if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm))
                                   and any(hasattr(m, a) for a in STRUCT_ATTRS)})
            with torch.no_grad():
                y = model(example)
                y2 = model(torch.randn(2, 3, S + 32, S + 32))
                ops1, p1 = tp.utils.count_ops_and_params(model, example)
            res["shape_ok"] = tuple(y.shape) == (1, 10) and tuple(y2.shape) == (2, 10)
            res["p_removed"] = 1 - p1 / p0
            res["p_removed_numel"] = 1 - n_params(model) / n_params(base)
            res["macs_removed"] = 1 - ops1 / ops0
            # train-mode forward/backward (on a copy: train mode updates BN running stats)
            tm = copy.deepcopy(model).train()
            tm(torch.randn(2, 3, S, S)).sum().backward()
            del tm
            # mask equivalence
            if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
                res["mask"] = "n/a"
            else:
                ref = masked_reference(copy.deepcopy(base), model, removed)
                with torch.no_grad():
                    err = rel_err(model(example), ref(example))
                res["mask"] = "ok" if err < 1e-4 else f"FAIL {err:.1e}"
            # rebuild
            attrs, shapes = capture_structure(model)
            try:
                rb = rebuild(arch, 10, attrs, shapes)
                rb.load_state_dict(model.state_dict(), strict=True)
                rb.eval()
                with torch.no_grad():
                    x3 = torch.randn(2, 3, S, S)
                    same = torch.equal(rb(x3), model(x3))
                res["rebuild"] = "ok" if same and repr(rb) == repr(model) else (
                    "out differs" if not same else "repr differs")
            except Exception as e:  # noqa: BLE001
                res["rebuild"] = f"{type(e).__name__}: {str(e)[:60]}"
        except Exception as e:  # noqa: BLE001
            if args.verbose:
                traceback.print_exc()
            res = dict(error=f"{type(e).__name__}: {str(e)[:80]}")
        row[key] = res
    return row


def fmt_mode(res):
    if "error" in res:
        return f"ERROR {res['error']}"
    ok = res["shape_ok"] and not res["probs"]
    return (f"r={res['ratio']:.3f} -{res['p_removed']:.1%}p -{res['macs_removed']:.1%}mac "
            f"{'ok' if ok else 'BAD'} mask={res['mask']} rebuild={res['rebuild']} "
            f"dg={res['t_dg']:.2f}s step={res['t_step']:.2f}s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="", help="comma-separated (default: all)")
    ap.add_argument("--target", type=float, default=0.5, help="parameter fraction to remove")
    ap.add_argument("--ratio", type=float, default=None, help="fixed pruning_ratio (skip the search)")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--no-workarounds", action="store_true")
    ap.add_argument("--keep-stem", action="store_true", help="do not ignore the stem conv")
    ap.add_argument("--skip-vanilla", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="time DG build/step as the best of N runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: DG build/step are Python-bound, and OpenMP "
                         "spin-waiting makes them many times slower on a busy CPU; 0 = torch default)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    archs = [a for a in args.archs.split(",") if a] or list(A.ARCHS)
    print(f"torch {torch.__version__}  torch-pruning {tp.__version__}  threads {torch.get_num_threads()}  "
          f"target -{args.target:.0%} params  round_to={args.round_to}")
    rows = []
    for arch in archs:
        t = time.perf_counter()
        row = survey_arch(arch, args)
        rows.append(row)
        print(f"\n{arch}  S={row['S']}  {row['params'] / 1e6:.2f}M params  {row['macs'] / 1e6:.0f}M MACs"
              f"  ({time.perf_counter() - t:.0f}s)")
        if "vanilla" in row:
            print(f"  vanilla r=0.5 unif : {row['vanilla']}")
        for key in ("unif", "glob"):
            res = row[key]
            print(f"  {key}: {fmt_mode(res)}"
                  + (f"  [{', '.join(res['notes'])}]" if res.get("notes") else ""))
            if "frozen" in res:
                extra = f"      unchanged-width conv/linear: {res['frozen'][0]}/{res['frozen'][1]}"
                if "grouped_pruned" in res:
                    extra += f"; grouped convs pruned: {res['grouped_pruned'][0]}/{res['grouped_pruned'][1]}"
                if res["stale"]:
                    extra += f"; stale channel attrs on: {', '.join(res['stale'])}"
                print(extra)
            for p in res.get("probs", [])[:3]:
                print(f"      problem: {p}")
        sys.stdout.flush()

    print("\n" + "=" * 140)
    print(f"-par/-mac: fraction of parameters/MACs removed (tp.utils.count_ops_and_params at S); "
          f"dg_s/stepU/stepG: seconds for MetaPruner construction (uniform) and step() "
          f"(uniform/global); mask: pruned net == unpruned net with the removed channels' "
          f"consumer weights zeroed")
    hdr = (f"{'arch':20s} {'S':>3s} {'Mparam':>6s} | {'r_unif':>6s} {'-par':>5s} {'-mac':>5s} | "
           f"{'r_glob':>6s} {'-par':>5s} {'-mac':>5s} | {'fwd':3s} {'mask':4s} {'rebld':5s} | "
           f"{'dg_s':>5s} {'stepU':>6s} {'stepG':>6s} | {'vanilla r=.5':14s} | workarounds")
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        u, g = row["unif"], row["glob"]
        if "error" in u or "error" in g:
            print(f"{row['arch']:20s} {row['S']:3d} ERROR {u.get('error', '')} {g.get('error', '')}")
            continue
        fwd = "ok" if all(r["shape_ok"] and not r["probs"] for r in (u, g)) else "BAD"
        mask = u["mask"] if u["mask"] == g["mask"] else f"{u['mask']}/{g['mask']}"
        rb = "ok" if u["rebuild"] == g["rebuild"] == "ok" else f"{u['rebuild']}/{g['rebuild']}"
        print(f"{row['arch']:20s} {row['S']:3d} {row['params'] / 1e6:6.2f} | "
              f"{u['ratio']:6.3f} {u['p_removed']:5.1%} {u['macs_removed']:5.1%} | "
              f"{g['ratio']:6.3f} {g['p_removed']:5.1%} {g['macs_removed']:5.1%} | "
              f"{fwd:3s} {mask:4s} {rb:5s} | {u['t_dg']:5.2f} {u['t_step']:6.2f} {g['t_step']:6.2f} | "
              f"{row.get('vanilla_short', '-'):14s} | {','.join(u['notes']) or '-'}")


if __name__ == "__main__":
    main()
