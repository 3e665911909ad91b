"""Tests for the shard writer (pipeline/data/writer.py, sources.py, shards_cli.py): shards must be plain tars that webdataset reads back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.manifest import read_manifest
from pipeline.data.shards_cli import main
from pipeline.data.sources import write_digits, write_imagefolder
from pipeline.data.writer import ShardSpec, write_split


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, read with the standard library only."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert m.isfile()
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def _all_tar_samples(out_dir: Path, manifest: dict, split: str) -> dict[str, dict[str, bytes]]:
    merged: dict[str, dict[str, bytes]] = {}
    for name, count in zip(manifest["splits"][split]["shards"], manifest["splits"][split]["counts"]):
        samples = _tar_samples(out_dir / name)
        assert len(samples) == count
        assert not merged.keys() & samples.keys()
        merged.update(samples)
    return merged


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


# ---------------------------------------------------------------- digits


def test_digits_manifest_counts_and_split(digits_dir: Path):
    m = read_manifest(digits_dir)
    assert read_manifest(digits_dir / "manifest.json") == m
    assert m["format"] == "webdataset" and m["version"] == 1
    assert m["classes"] == [str(i) for i in range(10)] and m["num_classes"] == 10
    assert m["image_format"] == "png"
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["num_samples"] + val["num_samples"] == 1797
    assert sum(train["counts"]) == train["num_samples"]
    assert abs(val["num_samples"] - 1797 / 6) <= 2
    assert train["pattern"] == f"train-{{000000..{len(train['shards']) - 1:06d}}}.tar"
    assert all(c <= 200 for c in train["counts"]) and len(train["shards"]) == 8
    # no temp files left behind
    assert sorted(p.name for p in digits_dir.iterdir()) == sorted(["manifest.json", *train["shards"], *val["shards"]])


def test_digits_tarfile_roundtrip(digits_dir: Path):
    m = read_manifest(digits_dir)
    train = _all_tar_samples(digits_dir, m, "train")
    val = _all_tar_samples(digits_dir, m, "val")
    assert not train.keys() & val.keys()
    assert len(train) + len(val) == 1797
    for key, members in list(train.items())[:50] + list(val.items())[:50]:
        assert set(members) == {"png", "cls", "json"}
        assert "." not in key
        meta = json.loads(members["json"])
        assert int(members["cls"]) == int(meta["class_name"])
        img = Image.open(io.BytesIO(members["png"]))
        assert img.size == (32, 32) and img.mode == "L"
    # stratified: every class appears in val in roughly its share
    val_labels = [int(v["cls"]) for v in val.values()]
    assert all(25 <= val_labels.count(c) <= 36 for c in range(10))


def test_digits_train_shards_are_class_mixed(digits_dir: Path):
    m = read_manifest(digits_dir)
    first = _tar_samples(digits_dir / m["splits"]["train"]["shards"][0])
    assert len({int(v["cls"]) for v in first.values()}) == 10


def test_digits_webdataset_roundtrip(digits_dir: Path):
    import webdataset as wds
    from sklearn.datasets import load_digits

    target = load_digits().target
    m = read_manifest(digits_dir)
    seen: set[str] = set()
    for split in ("train", "val"):
        urls = [str(digits_dir / name) for name in m["splits"][split]["shards"]]
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda x: x, empty_check=False).decode("pil")
        n = 0
        for sample in ds:
            img, label, meta = sample["png"], sample["cls"], sample["json"]
            assert img.size == (32, 32)
            assert label == int(target[meta["index"]])
            assert sample["__key__"] == f"digits_{meta['index']:04d}"
            seen.add(sample["__key__"])
            n += 1
        assert n == m["splits"][split]["num_samples"]
    assert len(seen) == 1797


def test_digits_deterministic(tmp_path: Path, digits_dir: Path):
    write_digits(tmp_path)
    a, b = read_manifest(tmp_path), read_manifest(digits_dir)
    assert a["splits"] == b["splits"]
    for split in a["splits"].values():
        for name in split["shards"]:
            assert (tmp_path / name).read_bytes() == (digits_dir / name).read_bytes(), name


def test_digits_seed_changes_split(tmp_path: Path, digits_dir: Path):
    write_digits(tmp_path, seed=1, samples_per_shard=2000)
    other = set(_tar_samples(tmp_path / "val-000000.tar"))
    base = set(_all_tar_samples(digits_dir, read_manifest(digits_dir), "val"))
    assert other != base


# ---------------------------------------------------------------- ImageFolder


def _make_tree(root: Path) -> dict[str, tuple[int, int]]:
    """3 classes x 5 images of varied sizes plus one corrupt file; returns rel path -> size."""
    sizes = [(40, 20), (10, 30), (12, 8), (64, 64), (16, 16)]
    made: dict[str, tuple[int, int]] = {}
    for ci, cls in enumerate(["cat", "dog", "eel"]):
        (root / cls).mkdir(parents=True)
        for i, size in enumerate(sizes):
            ext = [".png", ".JPG", ".jpeg", ".bmp", ".webp"][i]
            img = Image.new("RGB", size, (40 * ci, 10 * i, 200))
            img.save(root / cls / f"img.{i}{ext}")
            made[f"{cls}/img.{i}{ext}"] = size
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return made


def test_imagefolder_roundtrip(tmp_path: Path, caplog):
    src, out = tmp_path / "src", tmp_path / "out"
    made = _make_tree(src)
    mpath = write_imagefolder(src, out, max_side=16, samples_per_shard=4)
    assert mpath == out / "manifest.json"
    m = read_manifest(mpath)
    assert m["classes"] == ["cat", "dog", "eel"] and m["num_classes"] == 3
    assert m["image_format"] == "jpg"
    assert m["skipped_files"] == 1 and "broken.jpg" in caplog.text
    assert list(m["splits"]) == ["train"]  # val_fraction=0 -> no val split
    train = m["splits"]["train"]
    assert train["num_samples"] == 15 and train["counts"] == [4, 4, 4, 3]

    samples = _all_tar_samples(out, m, "train")
    assert len(samples) == 15
    for key, members in samples.items():
        assert set(members) == {"jpg", "cls", "json"} and "." not in key
        meta = json.loads(members["json"])
        assert m["classes"][int(members["cls"])] == meta["class_name"]
        w, h = made[meta["source"]]
        img = Image.open(io.BytesIO(members["jpg"]))
        assert img.format == "JPEG"
        if max(w, h) <= 16:
            assert img.size == (w, h)  # never upscaled
        else:
            assert max(img.size) == 16
            assert abs(img.size[0] / img.size[1] - w / h) < 0.1  # aspect kept


def test_imagefolder_val_split_is_stratified_and_disjoint(tmp_path: Path):
    src = tmp_path / "src"
    _make_tree(src)
    m = read_manifest(write_imagefolder(src, tmp_path / "out", val_fraction=0.4, max_side=16, image_format="png"))
    train = _all_tar_samples(tmp_path / "out", m, "train")
    val = _all_tar_samples(tmp_path / "out", m, "val")
    assert not train.keys() & val.keys()
    assert sorted(int(v["cls"]) for v in val.values()) == [0, 0, 1, 1, 2, 2]
    assert len(train) + len(val) == 15


def test_write_split_passes_bytes_through_unchanged(tmp_path: Path):
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), "red").save(buf, format="JPEG", quality=50)
    raw = buf.getvalue()
    spec = write_split(
        [("a", raw, 3, None), ("b", raw, 1, {"x": 1})], tmp_path, "test", image_format="jpg", max_side=20
    )
    assert spec == ShardSpec("test", "test-{000000..000000}.tar", ["test-000000.tar"], [2], 2)
    got = _tar_samples(tmp_path / "test-000000.tar")
    assert got["a"] == {"jpg": raw, "cls": b"3"}
    assert json.loads(got["b"]["json"]) == {"x": 1}
    # a resize forces a re-encode
    write_split([("a", raw, 3, None)], tmp_path, "small", image_format="jpg", max_side=8)
    small = _tar_samples(tmp_path / "small-000000.tar")["a"]["jpg"]
    assert Image.open(io.BytesIO(small)).size == (8, 4)


def test_write_split_rejects_bad_keys_and_cleans_up(tmp_path: Path):
    img = Image.new("L", (4, 4))
    with pytest.raises(ValueError, match="duplicate"):
        write_split([("a", img, 0, None), ("a", img, 0, None)], tmp_path, "x")
    with pytest.raises(ValueError, match="key"):
        write_split([("a.b", img, 0, None)], tmp_path, "y")
    assert list(tmp_path.iterdir()) == []  # aborted shard temp files removed


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path: Path):
    img = Image.new("L", (4, 4))
    write_split([(f"k{i}", img, 0, None) for i in range(5)], tmp_path, "train", samples_per_shard=1)
    spec = write_split([(f"k{i}", img, 0, None) for i in range(2)], tmp_path, "train", samples_per_shard=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == spec.shards == ["train-000000.tar", "train-000001.tar"]


# ---------------------------------------------------------------- CLI


def test_cli_digits_writes_then_up_to_date(tmp_path: Path, capsys):
    out = tmp_path / "d"
    args = ["--out", str(out), "--samples-per-shard", "1000", "--val-fraction", "0.2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "train: 2 shards" in text and "val: 1 shards" in text and str(out / "manifest.json") in text
    m = read_manifest(out)
    assert m["splits"]["val"]["num_samples"] == 360
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert main([*args, "--seed", "3"]) == 0  # changed settings -> rewrite
    assert "up to date" not in capsys.readouterr().out
    assert main([*args, "--seed", "3", "--force"]) == 0
    assert "up to date" not in capsys.readouterr().out


def test_cli_imagefolder(tmp_path: Path, capsys):
    src = tmp_path / "src"
    _make_tree(src)
    rc = main(["--source", str(src), "--out", str(tmp_path / "o"), "--max-side", "16", "--format", "png"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train: 1 shards, 15 samples" in out and "skipped 1" in out
    assert read_manifest(tmp_path / "o")["image_format"] == "png"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--samples-per-shard", "0"], "--samples-per-shard"),
        (["--samples-per-shard", "abc"], "--samples-per-shard"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--val-fraction", "-0.1"], "--val-fraction"),
        (["--source", "/nonexistent/dir/xyz"], "--source"),
        (["--format", "gif"], "--format"),
    ],
)
def test_cli_bad_input_returns_2_with_one_line(tmp_path: Path, capsys, argv, needle):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_empty_source_dir(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no class subdirectories" in capsys.readouterr().err


def test_cli_help(capsys):
    assert main(["--help"]) == 0
    assert "--samples-per-shard" in capsys.readouterr().out


def test_read_manifest_refuses_a_missing_or_foreign_manifest(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="expected format='webdataset'"):
        read_manifest(tmp_path)
