#!/usr/bin/env python
"""Issue 20's open question: is there information in unlabelled traffic beyond the prior-corrected teacher?

Prior correction reweights a model's outputs; its upper bound is the oracle mask (argmax restricted to the
classes really present). A cycle that distils the corrected teacher stays below that teacher. To beat the
oracle without labels, something must come from the images themselves: the structure of the traffic in the
model's own feature space (the input of its classifier). This script measures, training-free, on
bench/label_shift.py's base models, pools and subsets, whether that structure adds accuracy:

  served        the base model as deployed;
  teacher       temperature-calibrated outputs corrected to the EM prior of the stream (what the daemon serves);
  oracle        argmax restricted to the true subset;
  restricted    the teacher restricted to the classes its own prior estimate holds (share >= --present);
  centroid      SHOT-style (Liang et al. 2020) nearest class centroid in feature space (cosine): centroids weighted
                by the restricted teacher's stream probabilities, then refined --rounds times on hard assignments;
  centroid+t    the restricted teacher's log-probabilities plus the centroid's (cosine / --tau) log-softmax;
  knn           the restricted teacher averaged with the mean restricted teacher of the --k nearest stream images;
  probe         a linear head on the stream's features fitted to the restricted teacher's soft targets.

Centroids, neighbours and the probe are fitted on the stream (500 unlabelled images per class of the subset);
every row is scored on 500 other images per class (10-way argmax), never seen by any fit.

    python bench/feature_adapt.py --networks cifar_small,resnet18
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_shift as ls  # noqa: E402
from protocol.data import CLASSES, make_subsets, subset_name  # noqa: E402
from prune_core.architectures import classifier_module  # noqa: E402
from prune_core.label_shift import CalibrationMethod, class_prior, correct, em_prior, fit_calibration  # noqa: E402

ROWS = ("served", "teacher", "oracle", "restricted", "centroid", "centroid+t", "knn", "probe")


@torch.no_grad()
def features_of(model, data) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits): the classifier's input (flattened) and the model's output, per image."""
    head, grabbed = classifier_module(model), []
    hook = head.register_forward_pre_hook(lambda _m, inp: grabbed.append(inp[0].flatten(1)))
    try:
        logits = ls.logits_of(model, data)
    finally:
        hook.remove()
    return torch.cat(grabbed).double(), logits


def cached_features(model, pools, model_dir: Path) -> dict:
    return ls.cached_per_pool(model_dir / "features.pt", pools, lambda data: features_of(model, data))


def top1(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.as_tensor(scores).argmax(1) == y).double().mean())


def masked_log(p: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(p, float("-inf"))
    out[:, present] = torch.log(p[:, present].clamp_min(1e-12))
    return out


def centroids(f: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    c = weights.T @ f / weights.sum(0).clamp_min(1e-12)[:, None]
    return F.normalize(c, dim=1)


def evaluate(classes, feats, logits, pools, cal, source, args, order_seed: int) -> dict:
    k = len(CLASSES)
    sub = torch.tensor(classes)
    in_stream, in_score = torch.isin(pools.stream.labels, sub), torch.isin(pools.score.labels, sub)
    gen = torch.Generator().manual_seed(order_seed)
    idx = torch.nonzero(in_stream).flatten()
    idx = idx[torch.randperm(len(idx), generator=gen)]
    fs, ls_ = F.normalize(feats["stream"][idx], dim=1), logits["stream"][idx]
    ft, lt = F.normalize(feats["score"][in_score], dim=1), logits["score"][in_score]
    y = pools.score.labels[in_score]
    q = torch.as_tensor(em_prior(cal.apply(ls_.numpy()), source, max_iter=1000, tol=1e-7))
    ps = torch.as_tensor(correct(cal.apply(ls_.numpy()), source, q.numpy(), args.floor))
    pt = torch.as_tensor(correct(cal.apply(lt.numpy()), source, q.numpy(), args.floor))
    present = torch.nonzero(q >= args.present).flatten()
    only_present = mask_of(present, k)
    acc = {"served": top1(lt, y), "teacher": top1(pt, y), "oracle": top1(lt + mask_of(sub, k), y)}
    rs = torch.softmax(masked_log(ps, present), 1)  # restricted teacher on the stream
    log_rt = masked_log(pt, present)
    acc["restricted"] = top1(log_rt, y)
    c = centroids(fs, rs)
    for _ in range(args.rounds):  # hard reassignment, as SHOT's self-supervised pseudo-labelling
        assign = (fs @ c.T + only_present).argmax(1)
        c = centroids(fs, F.one_hot(assign, k).double())
    cos = ft @ c.T + only_present
    acc["centroid"] = top1(cos, y)
    acc["centroid+t"] = top1(log_rt + torch.log_softmax(cos / args.tau, 1), y)
    near = (ft @ fs.T).topk(args.k, dim=1).indices
    acc["knn"] = top1(torch.softmax(log_rt, 1) + rs[near].mean(1), y)
    acc["probe"] = top1(probe(fs, rs, ft, present, args), y)
    return {"subset": subset_name(classes), "size": len(classes), "top1": acc,
            "present_right": sorted(present.tolist()) == sorted(classes)}


def mask_of(present: torch.Tensor, k: int) -> torch.Tensor:
    """0 for the classes in `present`, -inf for the others (added to scores, an argmax among `present`)."""
    m = torch.full((k,), float("-inf"), dtype=torch.float64)
    m[present] = 0.0
    return m


def probe(fs, targets, ft, present, args) -> torch.Tensor:
    """A linear head (on normalised features) fitted by full-batch L-BFGS to soft targets, weight decay --probe-l2."""
    torch.manual_seed(0)
    w = torch.zeros(fs.shape[1], len(present), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(present), dtype=torch.float64, requires_grad=True)
    t = targets[:, present]
    t = t / t.sum(1, keepdim=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(t * torch.log_softmax(args.scale * fs @ w + b, 1)).sum(1).mean() + args.probe_l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    out = torch.full((len(ft), len(CLASSES)), float("-inf"), dtype=torch.float64)
    with torch.no_grad():
        out[:, present] = args.scale * ft @ w + b
    return out


def main(argv=None) -> None:
    def ours(p) -> None:
        p.add_argument("--present", type=float, default=0.05, help="a class counts as present from this estimated share")
        p.add_argument("--rounds", type=int, default=2, help="centroid refinements on hard assignments")
        p.add_argument("--tau", type=float, default=0.05, help="temperature of the centroid's cosine scores")
        p.add_argument("--k", type=int, default=10, help="neighbours for the knn row")
        p.add_argument("--probe-l2", type=float, default=1e-3)
        p.add_argument("--scale", type=float, default=10.0, help="the probe's logit scale on unit features")

    args = ls.parse_args(argv, ours, description="Is there information in unlabelled traffic beyond the corrected teacher? (issue 20)")
    started = time.monotonic()
    out, pools = ls.prepare(args)
    lines: list[str] = []
    for net in args.networks:
        model_dir = out / "models" / net
        model, _ = ls.base_model(net, pools, args, model_dir)
        data = cached_features(model, pools, model_dir)
        feats = {n: v[0] for n, v in data.items()}
        logits = {n: v[1] for n, v in data.items()}
        cal = fit_calibration(logits["held"].numpy(), pools.held.labels.numpy(), CalibrationMethod.TEMPERATURE)
        source = class_prior(pools.fit.labels.numpy(), len(CLASSES))
        subsets = make_subsets(args.subset_sizes, args.subsets_per_size, args.seed)
        rows = [evaluate(c, feats, logits, pools, cal, source, args, order_seed=args.seed * 7919 + i + 1)
                for i, c in enumerate(subsets)]
        sizes = sorted({r["size"] for r in rows})
        lines.append(f"\n### {net} @32 (present >= {args.present}, rounds {args.rounds}, tau {args.tau}, k {args.k}; "
                     f"estimated class set right on {sum(r['present_right'] for r in rows)}/{len(rows)})\n")
        lines.append("| row | " + " | ".join(f"{s} classes (n={sum(r['size'] == s for r in rows)})" for s in sizes)
                     + " | all | > oracle | < oracle |")
        lines.append("|---|" + "---|" * (len(sizes) + 3))
        for m in ROWS:
            cells = [sum(r["top1"][m] for r in rows if r["size"] == s) / sum(r["size"] == s for r in rows) for s in sizes]
            allm = sum(r["top1"][m] for r in rows) / len(rows)
            above = sum(r["top1"][m] > r["top1"]["oracle"] + 1e-9 for r in rows)
            below = sum(r["top1"][m] < r["top1"]["oracle"] - 1e-9 for r in rows)
            lines.append(f"| {m} | " + " | ".join(f"{100 * c:.1f}" for c in cells) + f" | {100 * allm:.1f} | {above} | {below} |")
    text = "\n".join(lines) + "\n"
    target = out.parent / "feature_adapt.md"
    target.write_text(text)
    print(text)
    ls.log(f"wrote {target}; done in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
