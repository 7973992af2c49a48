"""Exporting a checkpoint's TSN as a self-contained TorchScript file (`tsn export`).

The exported module is the whole network with its consensus: input (B, K, L, C, S, S) float32,
already finished as the data path finishes frames (`dataloading.pipeline.finish`: resized, in the
recorded channel order, normalised with the checkpoint's statistics; rgb_diff: the L
differences of `finish.to_snippets`), output (B, num_classes) pre-softmax video scores, exactly
what the eager ``TSN.forward`` returns. It is traced (`torch.jit.trace`) for one input layout:
K, L, C and S are fixed by the checkpoint's config (K = ``model.num_segments`` unless
``segments`` is given); the batch size B stays free. The file carries ``tsn.json``
(`EXTRA_FILE`): classes, modality, input layout and normalisation, so a consumer needs
nothing else (``torch.jit.load(path, _extra_files={"tsn.json": ""})``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from app.pipeline import pipeline_spec
from app.predict import load_stream
from dataloading.store.files import atomic_write

FORMATS = ("torchscript",)
EXTRA_FILE = "tsn.json"


def example_input(spec, segments: int, batch_size: int = 2) -> torch.Tensor:
    """A deterministic (B, K, L, C, S, S) float32 input of the layout ``spec`` produces."""
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, segments, spec.snippet_length, spec.channels, spec.crop.input_size, spec.crop.input_size)
    return torch.randn(shape, generator=g)


def export_checkpoint(checkpoint: str, out: str, *, fmt: str = "torchscript", segments: int | None = None) -> dict:
    """Write ``checkpoint``'s model to ``out``; returns the recorded metadata (`EXTRA_FILE`).

    The traced module is checked against the eager model on a batch of a different size than
    the one traced with (ValueError when they disagree beyond float tolerance).
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} not supported; expected one of {', '.join(FORMATS)}")
    stream = load_stream(checkpoint, device="cpu")
    model = stream.model.eval()
    spec = pipeline_spec(stream.cfg, "val", batch_size=1)
    k = int(segments or stream.cfg.model.num_segments)
    if k < 1:
        raise ValueError(f"segments must be >= 1, got {k}")
    with torch.no_grad(), warnings.catch_warnings():
        # TSN's input-shape checks become constants of the trace: right for its fixed layout.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # jit's deprecation notice; TorchScript still loads everywhere
        traced = torch.jit.trace(model, example_input(spec, k, 2), check_trace=False)
        probe = example_input(spec, k, 3)
        eager_scores, traced_scores = model(probe), traced(probe)
    if not torch.allclose(eager_scores, traced_scores, rtol=1e-4, atol=1e-5):
        diff = (eager_scores - traced_scores).abs().max().item()
        raise ValueError(f"{checkpoint}: the traced model differs from the eager one by {diff:g} on a batch of 3; "
                         "the backbone has shape-dependent Python control flow")
    meta = {
        "checkpoint": str(checkpoint),
        "format": fmt,
        "input_layout": "B,K,L,C,H,W",
        "input_shape": [None, k, spec.snippet_length, spec.channels, spec.crop.input_size, spec.crop.input_size],
        "output": "B,num_classes pre-softmax video scores (consensus over K)",
        "modality": spec.modality,
        "backbone": stream.cfg.model.backbone,
        "consensus": stream.cfg.model.consensus,
        # the colour channel order of the input (the backbone weights' convention; RGB before it existed)
        "channel_order": getattr(spec, "channel_order", "RGB"),
        "norm_mean_255": list(spec.norm_mean_255),
        "norm_std_255": list(spec.norm_std_255),
        "resize_short": stream.cfg.augment.resize_short,
        "class_names": stream.class_names,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # atomic: a crash never leaves a truncated model file
        warnings.simplefilter("ignore", FutureWarning)
        atomic_write(out, lambda f: torch.jit.save(traced, f, _extra_files={EXTRA_FILE: json.dumps(meta)}))
    return meta


def load_exported(path: str) -> tuple[torch.jit.ScriptModule, dict]:
    """(module, metadata) of a file written by `export_checkpoint`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[EXTRA_FILE] or "{}")
