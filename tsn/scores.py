"""`tsn eval` (test protocol of a checkpoint -> per-video scores) and `tsn fuse` (multi-stream
fusion of saved scores).

Scores files are ``tsn.evaluation.save_scores`` ``.npz`` files: ``sample_index`` (N,),
``label`` (N,), ``scores`` (N, C) pre-softmax video scores, ``class_names``, ``meta``.

Fusion (TSN.md section 6): the fused score of a video is the weighted average of the streams'
scores, ``sum_i w_i * s_i / sum_i w_i``, matched by ``sample_index``. The authors fuse the raw
(pre-softmax) class scores, the default here; ``--softmax`` fuses probabilities instead.
Default weights: two streams 1 : 1.5 (RGB : flow, pass RGB first), three 1 : 1 : 0.5
(RGB : flow : warped flow); otherwise equal weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tsn.evaluation import EvalResult, load_scores, result_from_predictions

log = logging.getLogger(__name__)

DEFAULT_FUSION_WEIGHTS = {2: (1.0, 1.5), 3: (1.0, 1.0, 0.5)}


def default_weights(num_streams: int) -> tuple[float, ...]:
    return DEFAULT_FUSION_WEIGHTS.get(num_streams, (1.0,) * num_streams)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fuse_scores(streams: Sequence[dict], weights: Sequence[float], *, softmax: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted average of several streams' scores on the videos they share.

    ``streams``: ``load_scores`` dicts (same classes). Returns (sample_index (M,), label (M,),
    fused scores (M, C)) over the M videos present in every stream, sorted by sample_index.
    Raises ValueError when class counts or a video's labels disagree, or no video is shared.
    """
    if len(streams) != len(weights):
        raise ValueError(f"{len(streams)} score files but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    num_classes = {s["scores"].shape[1] for s in streams}
    if len(num_classes) != 1:
        raise ValueError(f"score files have different class counts: {sorted(num_classes)}")
    common = streams[0]["sample_index"]
    for s in streams[1:]:
        common = np.intersect1d(common, s["sample_index"])
    if common.size == 0:
        raise ValueError("the score files share no video (sample_index)")
    fused, label = None, None
    for s, w in zip(streams, weights):
        order = np.argsort(s["sample_index"])
        pos = order[np.searchsorted(s["sample_index"], common, sorter=order)]
        sc = s["scores"][pos].astype(np.float64)
        sc = _softmax(sc) if softmax else sc
        lb = s["label"][pos]
        if label is not None and not np.array_equal(label, lb):
            bad = common[label != lb][:5].tolist()
            raise ValueError(f"labels disagree between score files for sample_index {bad}: "
                             f"not the same split / dataset")
        label = lb
        fused = w * sc if fused is None else fused + w * sc
    return common, label, fused / float(sum(weights))


def scores_result(d: dict) -> EvalResult:
    return result_from_predictions(d["sample_index"], d["scores"], d["label"], d["scores"].shape[1])


def _row(name: str, r: EvalResult) -> str:
    return f"{name:<40s} {r.num_videos:>7d} {r.top1:>8.4f} {r.top5:>8.4f} {r.mean_class_accuracy:>10.4f}"


def fuse_files(paths: Sequence[str], weights: Sequence[float] | None = None, *, softmax: bool = False,
               out: str | None = None) -> dict:
    """Load, fuse, evaluate; print a table; optionally save the fused scores. Returns
    ``{inputs: [{path, weight, top1, top5, mean_class_accuracy, num_videos}], fused: {...}}``."""
    from tsn.evaluation import save_scores

    if len(paths) < 2:
        raise ValueError("tsn fuse needs at least two score files")
    weights = tuple(weights) if weights else default_weights(len(paths))
    streams = [load_scores(p) for p in paths]
    sample_index, label, fused = fuse_scores(streams, weights, softmax=softmax)
    fused_result = result_from_predictions(sample_index, fused, label, fused.shape[1])
    report = {"inputs": [], "weights": list(weights), "softmax": softmax}
    print(f"{'scores':<40s} {'videos':>7s} {'top1':>8s} {'top5':>8s} {'mean class':>10s}")
    for path, w, s in zip(paths, weights, streams):
        r = scores_result(s)
        print(_row(f"{Path(path).name} (x{w:g})", r))
        report["inputs"].append({"path": str(path), "weight": w, **_summary(r)})
    print(_row("fused", fused_result))
    report["fused"] = _summary(fused_result)
    if out:
        save_scores(out, fused_result, class_names=streams[0]["class_names"],
                    meta={"fused_from": [str(p) for p in paths], "weights": list(weights), "softmax": softmax})
    return report


def _summary(r: EvalResult) -> dict:
    return {"top1": r.top1, "top5": r.top5, "mean_class_accuracy": r.mean_class_accuracy,
            "num_videos": r.num_videos}


def evaluate_checkpoint(checkpoint_path: str, *, data: str | None = None, split: str | None = None,
                        segments: int | None = None, batch_size: int | None = None,
                        overrides: Sequence[str] = (), out: str | None = None) -> EvalResult:
    """Test protocol (segments x 10 crops) of a checkpoint on one split of a packed dataset.

    The model and data settings come from the config stored in the checkpoint; ``data``,
    ``split``, ``segments``, ``batch_size`` and ``overrides`` (``a.b=value``) replace them.
    Single process. Writes the per-video scores to ``out`` when given.
    """
    import torch

    from dataloading import shards
    from dataloading.loader import TSNLoader, pipeline_spec
    from tsn.checkpoint import config_of_checkpoint, load_checkpoint
    from app.config import config_from_dict, config_to_dict
    from tsn.evaluation import evaluate, save_scores
    from app.worker import build_model, select_device

    state = load_checkpoint(checkpoint_path)
    sets = list(overrides)
    sets += [f"data.shards={data}"] if data else []
    sets += [f"model.test_segments={segments}"] if segments else []
    sets += [f"train.test_batch_size_per_worker={batch_size}"] if batch_size else []
    cfg = config_from_dict(config_to_dict(config_of_checkpoint(state, checkpoint_path)), sets,
                           source=f"{checkpoint_path} config")
    split = split or cfg.data.val_split
    manifest = shards.load_manifest(cfg.data.shards)
    num_classes = int(state["model"]["fc.weight"].shape[0])
    if num_classes != len(manifest["classes"]):
        raise ValueError(f"{checkpoint_path} has {num_classes} classes, {cfg.data.shards} has "
                         f"{len(manifest['classes'])}: not the same label set")
    device = select_device(cfg)
    model = build_model(cfg, num_classes, fresh=False)
    model.load_state_dict(state["model"])
    model.to(device)
    loader = TSNLoader(cfg.data.shards, split, pipeline_spec(cfg, "test", cfg.train.test_batch_size_per_worker),
                       device_id=(device.index or 0) if cfg.loader.device == "gpu" else None)
    result = evaluate(model, loader, device, num_classes=num_classes,
                      amp=device.type == "cuda" and cfg.train.amp and torch.cuda.is_available())
    if out:
        save_scores(out, result, class_names=list(manifest["classes"]),
                    meta={"checkpoint": str(checkpoint_path), "split": split, "segments": cfg.model.test_segments,
                          "crops": 10, "modality": cfg.model.modality, "dataset": cfg.data.shards})
    return result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="test protocol (segments x 10 crops) of a checkpoint; per-video scores")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by tsn train (.pt)")
    p.add_argument("--data", help="packed dataset (default: data.shards of the checkpoint's config)")
    p.add_argument("--split", help="split to evaluate (default: data.val_split of the config)")
    p.add_argument("--segments", type=int, help="snippets per video (default: model.test_segments, 25)")
    p.add_argument("--batch-size", type=int, help="videos per batch (default: train.test_batch_size_per_worker)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config, e.g. --set loader.device=cpu")
    p.add_argument("--out", default="scores.npz", help="per-video scores file (default: scores.npz)")
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=_run_eval)

    p = subparsers.add_parser("fuse", help="fuse several streams' per-video scores (weighted average)")
    p.add_argument("scores", nargs="+", help="scores files (tsn eval / tsn train output), RGB first")
    p.add_argument("--weights", type=float, nargs="+",
                   help="one weight per file (default: 1 1.5 for two, 1 1 0.5 for three, else equal)")
    p.add_argument("--softmax", action="store_true", help="fuse softmax probabilities instead of raw scores")
    p.add_argument("--out", help="write the fused scores here (.npz)")
    p.add_argument("--json", help="write the metrics of every input and of the fusion here")
    p.set_defaults(func=_run_fuse)


def _run_eval(args: argparse.Namespace) -> int:
    r = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, segments=args.segments,
                            batch_size=args.batch_size, overrides=args.overrides, out=args.out)
    print(f"top1 {r.top1:.4f}  top5 {r.top5:.4f}  mean class acc {r.mean_class_accuracy:.4f}  "
          f"({r.num_videos} videos) -> {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(r.metrics(), indent=2) + "\n")
    return 0


def _run_fuse(args: argparse.Namespace) -> int:
    if args.weights is not None and len(args.weights) != len(args.scores):
        print(f"error: {len(args.scores)} score files but {len(args.weights)} --weights", file=sys.stderr)
        return 2
    report = fuse_files(args.scores, args.weights, softmax=args.softmax, out=args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
