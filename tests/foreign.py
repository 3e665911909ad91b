"""Shards as other tools write them, made with plain ``tarfile``: directory-prefixed keys, mixed-case and unusual
image suffixes, JPEGs of varied non-square sizes, ``.txt`` captions and ``.json`` metadata, optional corrupt
images, samples without an image, a truncated tar, and no manifest.json. Used by the unit and e2e tests."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = ("JPEG", "jpg", "jpeg", "png", "webp")  # cycled through the samples


def encode(width: int, height: int, seed: int, suffix: str) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[suffix.lower()]
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


@dataclass
class ForeignSet:
    """What was written: shard paths, and per shard the keys a reader should serve (in order) with labels."""

    shards: list[str] = field(default_factory=list)
    samples: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # shard -> [(key, label)] with an image
    corrupt: dict[str, list[str]] = field(default_factory=dict)  # shard -> keys whose image does not decode
    no_image: int = 0

    def readable(self, shard: str) -> list[tuple[str, int]]:
        bad = set(self.corrupt.get(shard, []))
        return [(k, c) for k, c in self.samples[shard] if k not in bad]


def write_foreign(
    folder: Path,
    prefix: str,
    shards: int,
    per_shard: int,
    *,
    classes: int = 10,
    corrupt: tuple[tuple[int, int], ...] = (),  # (shard, sample) pairs with garbage image bytes
    caption_only: tuple[tuple[int, int], ...] = (),  # (shard, sample) pairs with a caption and no image
    label_of=None,  # (shard, sample) -> label text; default (shard * per_shard + sample) % classes
    seed: int = 0,
) -> ForeignSet:
    """``<folder>/<prefix>-NNNN.tar`` with members ``<prefix>NNNN/<index>.<suffix>`` (+ .cls, .txt, .json)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = ForeignSet()
    for s in range(shards):
        path = str(folder / f"{prefix}-{s:04d}.tar")
        out.shards.append(path)
        out.samples[path], out.corrupt[path] = [], []
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{prefix}{s:04d}/{i:06d}"
                label = label_of(s, i) if label_of else str((s * per_shard + i) % classes)
                if (s, i) in caption_only:
                    add(tar, f"{key}.txt", b"a caption and nothing else")
                    out.no_image += 1
                    continue
                suffix = SUFFIXES[(s + i) % len(SUFFIXES)]
                width, height = 20 + 7 * ((i + s) % 5), 16 + 5 * ((i * 3 + s) % 4)  # non-square, varied
                image = b"\xff\xd8 not really a jpeg" if (s, i) in corrupt else encode(width, height, seed + i, suffix)
                add(tar, f"{key}.{suffix}", image)
                add(tar, f"{key}.cls", label.encode())
                add(tar, f"{key}.txt", f"a photo number {i}".encode())
                add(tar, f"{key}.json", json.dumps({"width": width, "height": height}).encode())
                out.samples[path].append((key, int(label) if label.lstrip("-").isdigit() else -999))
                if (s, i) in corrupt:
                    out.corrupt[path].append(key)
    return out


def _key(name: str) -> str:
    folder, _, base = name.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]


def truncate(path: str, fraction: float = 0.6) -> list[str]:
    """Cut a tar half-way into a member's data (as an interrupted copy would); returns the keys still complete."""
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isreg()]
    target = int(os.path.getsize(path) * fraction)
    victim = next(m for m in members if m.size > 1 and m.offset_data + m.size > target)
    with open(path, "r+b") as f:
        f.truncate(victim.offset_data + victim.size // 2)
    keys: list[str] = []
    for m in members[: members.index(victim)]:
        if _key(m.name) != _key(victim.name) and _key(m.name) not in keys:
            keys.append(_key(m.name))
    return keys


def tar_listing(path: str) -> tuple[int, set[str]]:
    """(regular members, keys with an image), as ``tar tf`` lists them, with the standard library."""
    members, keys = 0, set()
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isreg():
                continue
            members += 1
            suffix = m.name.rpartition("/")[2].partition(".")[2]
            if suffix.lower() in ("png", "jpg", "jpeg", "webp", "bmp"):
                keys.add(_key(m.name))
    return members, keys
