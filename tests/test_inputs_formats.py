"""Dataset formats besides CSV / UCF101 / HMDB51: Kinetics annotation CSVs (clip look-up, missing
clips counted and listed), Something-Something v2 JSON label files (template-normalised classes,
VP9 WebM clips) and folder-per-class trees; `tsn pack` end to end on a Kinetics tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main as cli
from dataloading.sources.folder_tree import read_folder_tree
from dataloading.sources.inputs import read_inputs
from dataloading.sources.items import MISSING_FILENAME, MissingVideo
from dataloading.sources.kinetics import clip_name, read_kinetics
from dataloading.sources.ssv2 import normalize_template, read_ssv2
from videos import make_test_video


def video(path: Path, codec: str = "h264", frames: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_test_video(path, frames, size=(32, 24), codec=codec)


def rel(items, root):
    return [(str(Path(i.path).relative_to(root)), i.label, i.class_name, i.split) for i in items]


# ---------------------------------------------------------------------------------------------
# Kinetics

KINETICS_CSV = """label,youtube_id,time_start,time_end,split,is_cc
riding a bike,abc-DEF_123,10,20,train,0
"juggling balls, with tricks",zzz,0,10,train,0
riding a bike,gone1,5,15,train,0
abseiling,xyz,120,130,validate,0
"""


@pytest.fixture
def kinetics(tmp_path):
    root = tmp_path / "k400"
    video(root / "train" / "riding a bike" / "abc-DEF_123_000010_000020.mp4")
    video(root / "train" / "juggling" / "zzz_000000_000010.mkv")
    video(root / "val" / "xyz_000120_000130.webm", codec="vp9")
    (root / "train" / "riding a bike" / "gone1_000005_000015.mp4.part").write_bytes(b"partial download")
    (tmp_path / "train.csv").write_text(KINETICS_CSV)
    return tmp_path, root


def test_kinetics_items_labels_splits_and_missing(kinetics):
    tmp, root = kinetics
    missing: list[MissingVideo] = []
    items, classes = read_kinetics([tmp / "train.csv"], root, missing=missing)
    assert classes == ["abseiling", "juggling balls, with tricks", "riding a bike"]  # every row's label, sorted
    assert rel(items, root.resolve()) == [
        ("train/riding a bike/abc-DEF_123_000010_000020.mp4", 2, "riding a bike", "train"),
        ("train/juggling/zzz_000000_000010.mkv", 1, "juggling balls, with tricks", "train"),
        ("val/xyz_000120_000130.webm", 0, "abseiling", "val"),
    ]
    # the .part file is not a clip: gone1 is missing, counted and listed with its line
    assert missing == [MissingVideo(f"{tmp / 'train.csv'}:4", "gone1_000005_000015")]
    assert clip_name("a_b", 3, 1234567) == "a_b_000003_1234567"
    via_dispatch: list[MissingVideo] = []
    assert read_inputs(kinetics_csvs=[tmp / "train.csv"], video_root=root, missing=via_dispatch) == (items, classes)
    assert via_dispatch == missing


@pytest.mark.parametrize("text,match", [
    ("label,youtube_id,time_start,split\nx,a,1,train\n", "lacks time_end"),
    ("label,youtube_id,time_start,time_end,split\n,a,1,2,train\n", r"train.csv:2: empty label"),
    ("label,youtube_id,time_start,time_end,split\nx,a,1.5,2,train\n", "time_start '1.5' is not a whole number"),
    ("label,youtube_id,time_start,time_end,split\nx,a,5,5,train\n", "time_end 5 is not after time_start 5"),
    ("label,youtube_id,time_start,time_end,split\nx,a,1,2,holdout\n", "bad split value 'holdout'"),
    ("label,youtube_id,time_start,time_end,split\nx,a,1,2\n", "expected 5 columns"),
    ("label,youtube_id,time_start,time_end,split\nx,nothere,1,2,train\n", "none of the 1 clips listed"),
])
def test_kinetics_errors(kinetics, text, match):
    tmp, root = kinetics
    (tmp / "train.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_kinetics([tmp / "train.csv"], root)


def test_kinetics_ambiguous_clip_and_missing_root(kinetics):
    tmp, root = kinetics
    video(root / "other" / "zzz_000000_000010.mp4")
    with pytest.raises(ValueError, match="zzz_000000_000010 matches several files"):
        read_kinetics(tmp / "train.csv", root)
    with pytest.raises(FileNotFoundError, match="video root not found"):
        read_kinetics(tmp / "train.csv", tmp / "nope")


# ---------------------------------------------------------------------------------------------
# Something-Something v2

def write_ssv2(tmp: Path, old_names: bool = False) -> tuple[Path, Path]:
    labels_dir, root = tmp / "labels", tmp / "20bn-something-something-v2"
    labels_dir.mkdir()
    prefix = "something-something-v2-" if old_names else ""
    (labels_dir / f"{prefix}labels.json").write_text(json.dumps({
        "Pushing something from left to right": "1", "Holding something next to something": "0",
        "Putting something on a surface": "2"}))
    (labels_dir / f"{prefix}train.json").write_text(json.dumps([
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "bottle"]},
        {"id": "42326", "label": "pushing pen from left to right", "template": "Pushing [something] from left to right",
         "placeholders": ["pen"]},
        {"id": "100", "label": "putting cup on a surface", "template": "Putting [something] on a surface",
         "placeholders": ["cup"]},
    ]))
    (labels_dir / f"{prefix}validation.json").write_text(json.dumps([
        {"id": "7", "label": "putting a box on a surface", "template": "Putting [something] on a surface",
         "placeholders": ["a box"]},
    ]))
    for vid in ("78687", "42326", "7"):
        video(root / f"{vid}.webm", codec="vp9", frames=6)
    return labels_dir, root


@pytest.mark.parametrize("old_names", [False, True])
def test_ssv2_items_labels_splits_and_missing(tmp_path, old_names):
    labels_dir, root = write_ssv2(tmp_path, old_names)
    missing: list[MissingVideo] = []
    items, classes = read_ssv2(labels_dir, root, missing=missing)
    assert classes == ["Holding something next to something", "Pushing something from left to right",
                       "Putting something on a surface"]  # by id
    assert rel(items, root.resolve()) == [
        ("78687.webm", 0, "Holding something next to something", "train"),
        ("42326.webm", 1, "Pushing something from left to right", "train"),
        ("7.webm", 2, "Putting something on a surface", "val"),
    ]
    train_json = labels_dir / ("something-something-v2-train.json" if old_names else "train.json")
    assert missing == [MissingVideo(f"{train_json}: entry 2 (id 100)", str(root.resolve() / "100.webm"))]
    assert normalize_template("Tearing [something]  into [two pieces]") == "Tearing something into two pieces"


@pytest.mark.parametrize("name,content,match", [
    ("labels.json", '{"A": "0", "B": "2"}', r"class ids are not 0..1 \(missing \[1\]\)"),
    ("labels.json", '{"A": "x"}', "has id 'x'"),
    ("labels.json", "{not json", "not valid JSON"),
    ("train.json", '[{"id": "1", "template": "Unknown [thing]"}]', "template 'Unknown thing' is not a class"),
    ("train.json", '[{"template": "A"}]', r"train.json: entry 0: expected an object with an 'id'"),
    ("validation.json", '[{"id": "5"}]', r"entry 0 \(id 5\): no 'template'"),
])
def test_ssv2_errors(tmp_path, name, content, match):
    labels_dir, root = write_ssv2(tmp_path)
    (labels_dir / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        read_ssv2(labels_dir, root)


def test_ssv2_missing_label_file(tmp_path):
    labels_dir, root = write_ssv2(tmp_path)
    (labels_dir / "validation.json").unlink()
    with pytest.raises(FileNotFoundError, match="no validation.json or something-something-v2-validation.json"):
        read_ssv2(labels_dir, root)


# ---------------------------------------------------------------------------------------------
# folder-per-class trees

def test_folder_tree_classes_and_val_fraction(tmp_path):
    root = tmp_path / "videos"
    for cls, names in {"walk": ["b.mp4", "a.avi", "c.MKV"], "run": ["x.webm"], "empty": []}.items():
        (root / cls).mkdir(parents=True)
        for n in names:
            video(root / cls / n)
    (root / "walk" / "notes.txt").write_text("not a video")
    (root / ".cache").mkdir()
    items, classes = read_folder_tree(root)
    assert classes == ["empty", "run", "walk"]
    assert rel(items, root.resolve()) == [("run/x.webm", 1, "run", "train"), ("walk/a.avi", 2, "walk", "train"),
                                          ("walk/b.mp4", 2, "walk", "train"), ("walk/c.MKV", 2, "walk", "train")]
    items, _ = read_folder_tree(root, val_fraction=0.34, seed=1)
    assert sorted(i.split for i in items if i.class_name == "walk") == ["train", "train", "val"]
    assert [i.split for i in items if i.class_name == "run"] == ["train"]  # one video: stays in train
    (tmp_path / "classes.txt").write_text("walk\nrun\nempty\njump\n")
    items, classes = read_inputs(folder_root=root, classes_path=tmp_path / "classes.txt")
    assert classes == ["walk", "run", "empty", "jump"] and items[0].label == 1


def test_folder_tree_with_split_directories(tmp_path):
    root = tmp_path / "videos"
    video(root / "train" / "b" / "1.mp4")
    video(root / "train" / "a" / "2.mp4")
    video(root / "val" / "a" / "3.mp4")
    items, classes = read_folder_tree(root)
    assert classes == ["a", "b"]
    assert rel(items, root.resolve()) == [("train/a/2.mp4", 0, "a", "train"), ("train/b/1.mp4", 1, "b", "train"),
                                          ("val/a/3.mp4", 0, "a", "val")]
    with pytest.raises(ValueError, match="has split directories"):
        read_folder_tree(root, val_fraction=0.2)


@pytest.mark.parametrize("setup,exc,match", [
    (lambda r: r.mkdir(), ValueError, "no class directories"),
    (lambda r: (r / "a").mkdir(parents=True), ValueError, "no video files"),
    (lambda r: None, FileNotFoundError, "class-folder root not found"),
])
def test_folder_tree_errors(tmp_path, setup, exc, match):
    root = tmp_path / "videos"
    setup(root)
    with pytest.raises(exc, match=match):
        read_folder_tree(root)


@pytest.mark.parametrize("kwargs,match", [
    ({"kinetics_csvs": ["a.csv"]}, "video_root is required with kinetics lists"),
    ({"ssv2_dir": "l", "video_root": "r", "val_fraction": 0.2}, "apply only to a labels CSV or a class-folder tree"),
    ({"folder_root": "f", "video_root": "r"}, "video_root applies to"),
    ({"folder_root": "f", "ssv2_dir": "l"}, "exactly one input source"),
])
def test_read_inputs_new_sources_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_inputs(**kwargs)


# ---------------------------------------------------------------------------------------------
# tsn pack end to end

def test_tsn_pack_kinetics_lists_missing_clips(kinetics, capsys):
    tmp, root = kinetics
    out = tmp / "packed"
    code = cli.main(["pack", "--kinetics", str(tmp / "train.csv"), "--video-root", str(root), "--out", str(out),
                     "--short-side", "24", "--min-frames", "4", "--workers", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["abseiling", "juggling balls, with tricks", "riding a bike"]
    assert manifest["num_samples"] == 3 and {s: v["num_samples"] for s, v in manifest["splits"].items()} == \
        {"train": 2, "val": 1}
    assert (out / MISSING_FILENAME).read_text() == f"gone1_000005_000015\t{tmp / 'train.csv'}:4\n"
    assert "missing 1 listed clips" in captured.out and "1 listed clips are not under" in captured.err
