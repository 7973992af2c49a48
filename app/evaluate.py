"""Evaluating outside a training run: a checkpoint under the test protocol (`tsn eval`), and the
fusion of several streams' saved scores (`tsn fuse`).

Scores files are `app.run_store.save_scores` ``.npz`` files; fusion maths: `tsn.scores`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from app.build import TEST_CROPS, build_model, build_test_loader, select_device
from app.config import Config, config_from_dict, config_to_dict
from app.preprocessing import checkpoint_overrides
from app.run_store import load_scores, save_scores
from tsn.evaluation import EvalResult, result_from_predictions
from tsn.scores import default_weights, fuse_scores, scores_result


def config_of_checkpoint(checkpoint: Mapping, source: str = "checkpoint") -> Config:
    """The resolved Config stored in a checkpoint (validated like a YAML file)."""
    return config_from_dict(dict(checkpoint.get("config") or {}), source=f"{source} config")


def evaluate_checkpoint(checkpoint_path: str, *, data: str | None = None, split: str | None = None,
                        segments: int | None = None, batch_size: int | None = None,
                        overrides: Sequence[str] = (), out: str | None = None) -> EvalResult:
    """Test protocol (segments x 10 crops) of a checkpoint on one split of a packed dataset.

    The model and data settings come from the config stored in the checkpoint; ``data``,
    ``split``, ``segments``, ``batch_size`` and ``overrides`` (``a.b=value``) replace them.
    Single process. Writes the per-video scores to ``out`` when given.
    """
    import torch

    from dataloading.format import shards
    from tsn.checkpoint import load_checkpoint
    from tsn.evaluation import evaluate

    state = load_checkpoint(checkpoint_path)
    sets = checkpoint_overrides(state, str(checkpoint_path)) + list(overrides)  # fed as trained (app.preprocessing)
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
    result = evaluate(model, build_test_loader(cfg, split, device), device, num_classes=num_classes,
                      amp=device.type == "cuda" and cfg.train.amp and torch.cuda.is_available())
    if out:
        save_scores(out, result, class_names=list(manifest["classes"]),
                    meta={"checkpoint": str(checkpoint_path), "split": split, "segments": cfg.model.test_segments,
                          "crops": TEST_CROPS, "modality": cfg.model.modality, "dataset": cfg.data.shards})
    return result


def summary(r: EvalResult) -> dict:
    """The headline metrics of an evaluation."""
    return {"top1": r.top1, "top5": r.top5, "mean_class_accuracy": r.mean_class_accuracy,
            "num_videos": r.num_videos}


def fuse_score_files(paths: Sequence[str], weights: Sequence[float] | None = None, *, softmax: bool = False,
                     out: str | None = None) -> dict:
    """Load, fuse (`tsn.scores.fuse_scores`), evaluate; optionally save the fused scores to ``out``.

    ``weights`` default: `tsn.scores.default_weights`. Returns ``{"inputs": [{path, weight, top1,
    top5, mean_class_accuracy, num_videos}], "weights", "softmax", "fused": {...}}``.
    """
    if len(paths) < 2:
        raise ValueError("tsn fuse needs at least two score files")
    weights = tuple(weights) if weights else default_weights(len(paths))
    streams = [load_scores(p) for p in paths]
    sample_index, label, fused = fuse_scores(streams, weights, softmax=softmax)
    fused_result = result_from_predictions(sample_index, fused, label, fused.shape[1])
    if out:
        save_scores(out, fused_result, class_names=streams[0]["class_names"],
                    meta={"fused_from": [str(p) for p in paths], "weights": list(weights), "softmax": softmax})
    return {"inputs": [{"path": str(p), "weight": w, **summary(scores_result(s))}
                       for p, w, s in zip(paths, weights, streams)],
            "weights": list(weights), "softmax": softmax, "fused": summary(fused_result)}


def fusion_table(report: dict) -> str:
    """The `fuse_score_files` report as a text table: one row per input, then the fusion."""
    def row(name: str, m: dict) -> str:
        return (f"{name:<40s} {m['num_videos']:>7d} {m['top1']:>8.4f} {m['top5']:>8.4f} "
                f"{m['mean_class_accuracy']:>10.4f}")

    lines = [f"{'scores':<40s} {'videos':>7s} {'top1':>8s} {'top5':>8s} {'mean class':>10s}"]
    lines += [row(f"{Path(i['path']).name} (x{i['weight']:g})", i) for i in report["inputs"]]
    lines.append(row("fused", report["fused"]))
    return "\n".join(lines)
