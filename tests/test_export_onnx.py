"""`tsn export --format onnx`: ONNX Runtime's scores equal the eager model's at several batch
sizes (rgb and flow, the tiny CNN and a timm ResNet-18 with TSM), the file's metadata_props are the
TorchScript export's tsn.json, the CLI's format choice and output, and a failed check leaves no
file behind."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from app import export, predict
from app.build import build_model
from app.config import config_from_dict, config_to_dict
from app.run_store import write_checkpoint
from cli import main as cli
from cli import predict as cli_predict
from tsn.checkpoint import checkpoint_state

CLASSES = [f"action_{i}" for i in range(6)]
SMALL = ["model.backbone=tiny", "model.num_segments=3", "model.test_segments=5", "augment.input_size=32",
         "augment.resize_short=48", "run.seed=0"]


def make_checkpoint(path, modality: str, snippet_length: int, *, seed: int = 0, extra=()):
    """A TSN with random weights (fc scaled up so that classes differ clearly) saved as tsn train
    does; its dataset does not exist (class names from the checkpoint's meta): export needs none."""
    cfg = config_from_dict({}, [f"data.shards={path.parent / 'no-dataset'}", f"model.modality={modality}",
                                f"model.snippet_length={snippet_length}", *SMALL, *extra])
    torch.manual_seed(seed)
    model = build_model(cfg, len(CLASSES), fresh=False)
    torch.nn.init.normal_(model.fc.weight, std=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = checkpoint_state(model=model, optimizer=opt, epoch=0, step=0, loader_position=(1, 0),
                             config=config_to_dict(cfg), meta={"class_names": CLASSES})
    write_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{'rgb': avg consensus, K=3, L=1; 'flow': max consensus, K=3, L=2}, the tiny CNN at 32 px."""
    d = tmp_path_factory.mktemp("onnx-ckpt")
    return {"rgb": make_checkpoint(d / "rgb.pt", "rgb", 1),
            "flow": make_checkpoint(d / "flow.pt", "flow", 2, seed=1, extra=["model.consensus=max"])}


def assert_onnx_equals_eager(ckpt, onnx_path, shape) -> None:
    """The ONNX file's scores (ONNX Runtime) are the eager model's on batches of 1 and 3."""
    session, meta = export.load_exported(str(onnx_path))
    assert isinstance(session, onnxruntime.InferenceSession) and meta["format"] == "onnx"
    eager = predict.load_stream(str(ckpt)).model
    for b in (1, 3):
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(3 + b))
        with torch.no_grad():
            want = eager(x).numpy()
        got = session.run(["scores"], {"video": x.numpy()})[0]
        assert got.shape == (b, len(CLASSES))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert np.ptp(want, axis=1).min() > 0.05  # the scores tell classes apart: a real comparison


@pytest.mark.parametrize("kind, shape", [("rgb", (3, 1, 3, 32, 32)), ("flow", (3, 2, 2, 32, 32))])
def test_onnx_export_equals_eager_and_carries_the_torchscript_metadata(kind, shape, ckpts, tmp_path):
    ckpt = ckpts[kind]
    meta = export.export_checkpoint(str(ckpt), str(tmp_path / "m.onnx"), fmt="onnx")
    assert meta["format"] == "onnx" and 0.0 <= meta["check_max_abs_diff"] < 1e-4
    assert_onnx_equals_eager(ckpt, tmp_path / "m.onnx", shape)

    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain == ""] == [("", export.ONNX_OPSET)]
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "video" and outp.name == "scores"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(shape)  # B free, the rest fixed
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert outp.type.tensor_type.shape.dim[1].dim_value == len(CLASSES)
    assert model.producer_name == "tsn-train" and "scores" in model.doc_string
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)  # one file

    # The metadata is the TorchScript export's, but for the format: each entry, and the whole document.
    ts_meta = export.export_checkpoint(str(ckpt), str(tmp_path / "m.ts"), fmt="torchscript")
    assert export.exported_format(str(tmp_path / "m.ts")) == "torchscript"
    _, ts_file_meta = export.load_exported(str(tmp_path / "m.ts"))
    _, onnx_file_meta = export.load_exported(str(tmp_path / "m.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["tsn.json"]) == onnx_file_meta
    assert {**onnx_file_meta, "format": "torchscript"} == ts_file_meta
    assert {**meta, "format": "torchscript", "check_max_abs_diff": ts_meta["check_max_abs_diff"]} == ts_meta
    assert props["modality"] == kind and props["format"] == "onnx"
    assert json.loads(props["class_names"]) == CLASSES
    assert json.loads(props["input_shape"]) == [None, *shape]
    for key in ("norm_mean_255", "norm_std_255", "channel_order", "resize_short", "consensus", "backbone"):
        value = props[key] if isinstance(ts_file_meta[key], str) else json.loads(props[key])
        assert value == ts_file_meta[key], key
    assert set(props) == {*ts_file_meta, "tsn.json"}


def test_cli_export_picks_the_format_prints_the_check_and_rejects_unknown_formats(ckpts, tmp_path, capsys):
    rgb = str(ckpts["rgb"])
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--checkpoint", rgb, "--out", str(out)]) == 0  # .onnx: ONNX without --format
    printed = capsys.readouterr().out
    assert f"-> {out} (onnx, input Bx3x1x3x32x32, 6 classes; max abs score difference to the eager model " in printed
    diff = float(printed.rsplit(" ", 1)[1].rstrip(")\n"))
    assert 0.0 <= diff < 1e-4
    assert export.exported_format(str(out)) == "onnx"
    assert_onnx_equals_eager(ckpts["rgb"], out, (3, 1, 3, 32, 32))

    # An explicit --format wins over the extension (the file's content tells the loaders apart);
    # --segments changes K of the exported layout.
    odd = tmp_path / "model.pt"
    assert cli.main(["export", "--checkpoint", rgb, "--out", str(odd), "--format", "onnx", "--segments", "5"]) == 0
    assert "(onnx, input Bx5x1x3x32x32" in capsys.readouterr().out
    assert export.exported_format(str(odd)) == "onnx"
    assert_onnx_equals_eager(ckpts["rgb"], odd, (5, 1, 3, 32, 32))
    assert cli.main(["export", "--checkpoint", rgb, "--out", str(tmp_path / "model.ts")]) == 0
    assert "(torchscript, input Bx3x1x3x32x32" in capsys.readouterr().out
    assert export.exported_format(str(tmp_path / "model.ts")) == "torchscript"

    # Unknown formats: argparse names the choices; the API names them too, before any work.
    assert cli_predict.EXPORT_FORMATS == export.FORMATS
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--checkpoint", rgb, "--out", str(tmp_path / "m.tflite"), "--format", "tflite"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --format: invalid choice: 'tflite'" in err and "torchscript" in err and "onnx" in err
    with pytest.raises(ValueError, match="export format 'tflite' not supported; expected one of torchscript, onnx"):
        export.export_checkpoint(rgb, str(tmp_path / "m.tflite"), fmt="tflite")
    assert not (tmp_path / "m.tflite").exists()
    # A missing checkpoint: the one-line error of every command.
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="exported model not found"):
        export.load_exported(str(tmp_path / "x.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx: not an ONNX model"):
        export.load_exported(str(tmp_path / "junk.onnx"))


class _SkewedSession(onnxruntime.InferenceSession):
    """An ONNX Runtime whose scores are off by one: the eager comparison must fail."""

    def run(self, output_names, input_feed, run_options=None):
        return [o + 1.0 for o in super().run(output_names, input_feed, run_options)]


def test_a_failed_check_leaves_no_file(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(onnxruntime, "InferenceSession", _SkewedSession)
    out = tmp_path / "out" / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpts["flow"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {ckpts['flow']}: the ONNX model (ONNX Runtime) differs from the eager one by 1" in err
    assert not out.exists() and list(out.parent.iterdir()) == []  # no model, no temporary file
    # An older export at --out stays as it was.
    out.write_bytes(b"the previous export")
    with pytest.raises(ValueError, match="differs from the eager one"):
        export.export_checkpoint(str(ckpts["flow"]), str(out), fmt="onnx")
    assert out.read_bytes() == b"the previous export" and list(out.parent.iterdir()) == [out]


def test_a_timm_resnet18_with_temporal_shift_exports_and_matches(tmp_path):
    """A timm backbone (random weights, nothing downloaded) at 64 px, rgb_diff (15 input channels),
    with TSM (place 'block': timm zero-initialises each residual branch's last BN, so a shift on
    the branch alone would not show in the scores of an untrained net)."""
    ckpt = make_checkpoint(tmp_path / "r18.pt", "rgb_diff", 2,
                           extra=["model.backbone=resnet18", "augment.input_size=64", "augment.resize_short=72",
                                  "model.num_segments=2", "model.temporal_shift.fold_div=8",
                                  "model.temporal_shift.place=block"])
    meta = export.export_checkpoint(str(ckpt), str(tmp_path / "r18.onnx"), fmt="onnx")
    assert meta["backbone"] == "resnet18" and meta["input_shape"] == [None, 2, 2, 3, 64, 64]
    assert meta["check_max_abs_diff"] < 1e-4
    onnx.checker.check_model(str(tmp_path / "r18.onnx"))
    assert_onnx_equals_eager(ckpt, tmp_path / "r18.onnx", (2, 2, 3, 64, 64))
