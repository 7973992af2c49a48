"""Exporting a checkpoint's TSN as one self-contained file (`tsn export`): TorchScript or ONNX.

The exported model is the whole network with its consensus: input (B, K, L, C, S, S) float32,
already finished as the data path finishes frames (`dataloading.pipeline.finish`: resized, in the
recorded channel order, normalised with the checkpoint's statistics; rgb_diff: the L
differences of `finish.to_snippets`), output (B, num_classes) pre-softmax video scores, exactly
what the eager ``TSN.forward`` returns. It is captured for one input layout: K, L, C and S are
fixed by the checkpoint's config (K = ``model.num_segments`` unless ``segments`` is given); the
batch size B stays free. Both formats carry the same metadata document ``tsn.json``
(`EXTRA_FILE`): classes, modality, input layout and normalisation, so a consumer needs nothing
else.

* ``torchscript`` (`torch.jit.trace`): ``tsn.json`` is an extra file of the archive
  (``torch.jit.load(path, _extra_files={"tsn.json": ""})``).
* ``onnx`` (`torch.onnx.export`, opset `ONNX_OPSET`, weights inside the one file): the graph's
  input is named ``"video"`` (`ONNX_INPUT`, dim 0 symbolic ``"batch"``), its output ``"scores"``
  (`ONNX_OUTPUT`). ``metadata_props`` hold every entry of the document (strings as they are,
  other values JSON-encoded) and ``tsn.json``, the whole document
  (``json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["tsn.json"])``).

`load_exported` reads either format back (told apart by content: a TorchScript file is a zip
archive); `load_onnx` is its ONNX half, an `onnxruntime.InferenceSession` on the CPU.
"""

from __future__ import annotations

import importlib.metadata
import json
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import torch

from app.pipeline import pipeline_spec
from app.predict import load_stream
from dataloading.store.files import atomic_write

if TYPE_CHECKING:
    import onnxruntime

FORMATS = ("torchscript", "onnx")
EXTRA_FILE = "tsn.json"
# torch 2.14's default opset for its dynamo-based exporter (onnxscript's torchlib emits it
# directly, no version-conversion pass); ONNX Runtime has run opset 20 since 1.17.
ONNX_OPSET = 20
ONNX_INPUT, ONNX_OUTPUT = "video", "scores"
# The exporter folds BN into the convs and ONNX Runtime orders float sums its own way: scores
# agree with torch's to ~1e-6 (measured: tiny, ResNet-18 and BN-Inception at 224 px); 1e-4 leaves
# room for other CPUs' kernels while a real mistranslation (a wrong axis, a missing op) is far
# beyond it.
ONNX_RTOL = ONNX_ATOL = 1e-4
_ZIP_MAGIC = b"PK\x03\x04"  # a TorchScript file is a zip archive; an ONNX file is a protobuf


def example_input(spec, segments: int, batch_size: int = 2) -> torch.Tensor:
    """A deterministic (B, K, L, C, S, S) float32 input of the layout ``spec`` produces."""
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, segments, spec.snippet_length, spec.channels, spec.crop.input_size, spec.crop.input_size)
    return torch.randn(shape, generator=g)


def export_checkpoint(checkpoint: str, out: str, *, fmt: str = "torchscript", segments: int | None = None) -> dict:
    """Write ``checkpoint``'s model to ``out`` in format ``fmt`` (one of `FORMATS`); returns the
    recorded metadata (`EXTRA_FILE`) plus ``check_max_abs_diff``.

    The exported model is captured with a batch of 2 and checked against the eager model on a
    batch of 3 (the batch axis really is free): ValueError naming ``checkpoint`` and the largest
    absolute score difference when they disagree beyond float tolerance. The ONNX check runs the
    written bytes in ONNX Runtime before they replace ``out``, so a failed export leaves no file
    (and an older ``out`` untouched). ``check_max_abs_diff``, that difference, is returned only:
    it describes this export, not the model, and is not in the file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} not supported; expected one of {', '.join(FORMATS)}")
    stream = load_stream(checkpoint, device="cpu")
    model = stream.model.eval()
    spec = pipeline_spec(stream.cfg, "val", batch_size=1)
    k = int(segments or stream.cfg.model.num_segments)
    if k < 1:
        raise ValueError(f"segments must be >= 1, got {k}")
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
    example, probe = example_input(spec, k, 2), example_input(spec, k, 3)
    with torch.no_grad():
        eager_scores = model(probe)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        diff = _export_onnx(model, example, probe, eager_scores, meta, checkpoint, out)
    else:
        diff = _export_torchscript(model, example, probe, eager_scores, meta, checkpoint, out)
    return {**meta, "check_max_abs_diff": diff}


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, probe: torch.Tensor,
                        eager_scores: torch.Tensor, meta: dict, checkpoint: str, out: str) -> float:
    """Trace ``model`` on ``example``, check it on ``probe``, save to ``out``; the max abs difference."""
    with torch.no_grad(), warnings.catch_warnings():
        # TSN's input-shape checks become constants of the trace: right for its fixed layout.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # jit's deprecation notice; TorchScript still loads everywhere
        traced = torch.jit.trace(model, example, check_trace=False)
        traced_scores = traced(probe)
    diff = (eager_scores - traced_scores).abs().max().item()
    if not torch.allclose(eager_scores, traced_scores, rtol=1e-4, atol=1e-5):
        raise ValueError(f"{checkpoint}: the traced model differs from the eager one by {diff:g} on a batch of 3; "
                         "the backbone has shape-dependent Python control flow")
    with warnings.catch_warnings():  # atomic: a crash never leaves a truncated model file
        warnings.simplefilter("ignore", FutureWarning)
        atomic_write(out, lambda f: torch.jit.save(traced, f, _extra_files={EXTRA_FILE: json.dumps(meta)}))
    return diff


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, probe: torch.Tensor,
                 eager_scores: torch.Tensor, meta: dict, checkpoint: str, out: str) -> float:
    """Export ``model`` to ONNX with a free batch axis, write it to ``out`` once ONNX Runtime's
    scores of ``probe`` match ``eager_scores``; the max abs difference."""
    import onnx

    # The dynamo exporter (torch.export, then onnxscript's translation): torch's default and the
    # maintained one; the TorchScript-based exporter (dynamo=False) warns that it is deprecated
    # and to be removed. torch.export traces with a symbolic batch size and fails when the model
    # specialises on it, so "B is free" is checked at capture, not only by the probe below. It
    # exports all our backbones (tiny, timm ResNets, BN-Inception; ~2-6 s on CPU).
    # optimize=True folds constants and BN into the convs. external_data=False keeps the weights
    # inside the proto: TSN backbones are far under protobuf's 2 GB limit (BN-Inception at 224 px
    # ~41 MB) and one file is what `tsn export` promises.
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, opset_version=ONNX_OPSET, external_data=False, optimize=True,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    proto = program.model_proto
    proto.producer_name = "tsn-train"
    proto.producer_version = f"{_project_version()} (torch {torch.__version__})"
    proto.graph.name = "tsn"
    proto.doc_string = (f"TSN {meta['modality']} {meta['backbone']} ({meta['consensus']} consensus) from {checkpoint}: "
                        f"{ONNX_INPUT} (B,K,L,C,H,W) float32 {meta['input_shape'][1:]} -> {ONNX_OUTPUT} "
                        f"(B,{len(meta['class_names'])}) pre-softmax video scores; metadata: {EXTRA_FILE}")
    onnx.helper.set_model_props(proto, onnx_metadata(meta))
    if proto.ByteSize() >= 2**31:
        raise ValueError(f"{checkpoint}: the ONNX model is {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's "
                         "2 GiB limit for one file")
    data = proto.SerializeToString()
    diff: list[float] = []

    def write_checked(f: IO[bytes]) -> None:
        # The check runs the bytes just written to the temporary file: raising here makes
        # atomic_write remove it, so `out` never holds a model that failed its check.
        f.write(data)
        f.flush()
        got = _onnx_session(f.name).run([ONNX_OUTPUT], {ONNX_INPUT: probe.numpy()})[0]
        want = eager_scores.numpy()
        if got.shape != want.shape:
            raise ValueError(f"{checkpoint}: the ONNX model gives scores of shape {got.shape} on a batch of "
                             f"{len(probe)}, the eager one {want.shape}")
        diff.append(float(np.abs(got - want).max()))
        if not np.allclose(got, want, rtol=ONNX_RTOL, atol=ONNX_ATOL):
            raise ValueError(f"{checkpoint}: the ONNX model (ONNX Runtime) differs from the eager one by "
                             f"{diff[0]:g} (max abs score difference) on a batch of {len(probe)}; "
                             f"tolerance rtol={ONNX_RTOL:g}, atol={ONNX_ATOL:g}")

    atomic_write(out, write_checked)
    return diff[0]


def onnx_metadata(meta: dict) -> dict[str, str]:
    """``metadata_props`` of an ONNX export: each entry of ``meta`` (strings as they are, other
    values JSON-encoded) and `EXTRA_FILE`, the whole document as JSON."""
    props = {key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}
    props[EXTRA_FILE] = json.dumps(meta)
    return props


def _project_version() -> str:
    try:
        return importlib.metadata.version("tsn-train")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def _onnx_session(path: str) -> onnxruntime.InferenceSession:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def exported_format(path: str) -> str:
    """'torchscript' or 'onnx': what the file at ``path`` holds, by content (a TorchScript file
    is a zip archive), so a ``.pt`` name on an ONNX file does not matter."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    with open(path, "rb") as f:
        return "torchscript" if f.read(4) == _ZIP_MAGIC else "onnx"


def load_onnx(path: str) -> tuple[onnxruntime.InferenceSession, dict]:
    """(session, metadata) of an ONNX file written by `export_checkpoint`: an ONNX Runtime
    session on the CPU (``session.run(["scores"], {"video": x})[0]``, x a (B, K, L, C, S, S)
    float32 array) and the ``tsn.json`` document from its ``metadata_props``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    try:
        session = _onnx_session(path)
    except Exception as e:  # onnxruntime's InvalidProtobuf / Fail: not a (readable) ONNX file
        raise ValueError(f"{path}: not an ONNX model ONNX Runtime can load ({e})") from None
    props = session.get_modelmeta().custom_metadata_map  # the file's metadata_props
    return session, json.loads(props.get(EXTRA_FILE) or "{}")


def load_exported(path: str) -> tuple[torch.jit.ScriptModule | onnxruntime.InferenceSession, dict]:
    """(model, metadata) of a file written by `export_checkpoint`, either format (`exported_format`):
    a TorchScript file gives a ``torch.jit.ScriptModule`` (called with a tensor), an ONNX file
    an ``onnxruntime.InferenceSession`` (`load_onnx`); ``metadata["format"]`` says which."""
    if exported_format(path) == "onnx":
        return load_onnx(path)
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[EXTRA_FILE] or "{}")
