"""``make bench-data`` (``python -m benchmarks.bench_data``): what shards without a manifest, and thousands of
shards, cost before the first step (docs/performance.md, "Foreign shards and thousands of shards").

Measured on synthetic shards written here with plain ``tarfile`` (WebDataset layout: ``<dir>/<key>.jpg``, ``.cls``,
``.json``): indexing local shards (shards/s, samples/s; against tarfile's own member iteration, the way a
tarfile-based reader walks a tar), indexing over HTTP from a loopback server (the whole stream is read), the
cached re-plan, and for 10,000 tiny shards the first index, the plan from the index cache and from a
manifest.json, the existence check, and the start-up of a rank (plan + loaders + the spec each worker receives),
per 1,000 shards. Each figure is the median of --rounds. Results: a table on stdout and JSON under runs/bench/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import shutil
import statistics
import tarfile
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.config import load_config
from pipeline.data.index import INDEX_NAME, index_shards
from pipeline.data.plan import expand_shards, plan_data
from pipeline.rundir import RunsRoot


def write_shards(folder: Path, shards: int, samples: int, image_bytes: int) -> list[str]:
    """Shards of ``samples`` samples, each an ``image_bytes`` .jpg (random bytes: indexing never decodes), a .cls
    and a small .json, keys under a directory prefix as img2dataset-style tools write them."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(image_bytes)
    paths = []
    for s in range(shards):
        path = folder / f"train-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(samples):
                for suffix, data in (("jpg", payload), ("cls", str(i % 1000).encode()), ("json", b'{"w":500}')):
                    info = tarfile.TarInfo(f"part{s:05d}/{i:08d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def median_time(fn, rounds: int, before=None) -> float:
    times = []
    for _ in range(rounds):
        if before:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tarfile_walk(paths: list[str]) -> None:
    """tarfile's member iteration (what a tarfile-based reader spends just finding the members)."""
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith(".cls"):
                    tar.extractfile(member).read()


def bench_local_index(root: Path, args) -> dict:
    paths = write_shards(root / "local", args.shards, args.samples, args.image_bytes)
    runs = str(root / "runs")

    def drop_cache() -> None:
        (root / "local" / INDEX_NAME).unlink(missing_ok=True)

    index = median_time(lambda: index_shards(paths, runs_root=runs), args.rounds, drop_cache)
    walk = median_time(lambda: tarfile_walk(paths), args.rounds)
    drop_cache()
    index_read = bytes_read(lambda: index_shards(paths, runs_root=runs))
    walk_read = bytes_read(lambda: tarfile_walk(paths))
    index_shards(paths, runs_root=runs)
    config = load_config(None, [f"data.train_shards={root}/local/train-{{00000..{args.shards - 1:05d}}}.tar",
                                "data.val_shards=null", f"run.root={runs}"])  # fmt: skip
    replan = median_time(lambda: plan_data(config, 1), args.rounds)
    n = args.shards * args.samples
    return {
        "shards": args.shards,
        "samples_per_shard": args.samples,
        "image_bytes": args.image_bytes,
        "index_s": index,
        "index_shards_per_s": args.shards / index,
        "index_samples_per_s": n / index,
        "tarfile_walk_s": walk,
        "speedup_vs_tarfile": walk / index,
        "shard_mib": sum(os.path.getsize(p) for p in paths) / 2**20,
        "index_read_mib": index_read / 2**20,
        "tarfile_read_mib": walk_read / 2**20,
        "cached_replan_s": replan,
    }


def bytes_read(fn) -> int:
    """Bytes this process read through system calls while fn ran (Linux /proc/self/io rchar; -1 elsewhere)."""

    def rchar() -> int:
        try:
            return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])
        except (OSError, StopIteration, ValueError):
            return -1

    before = rchar()
    fn()
    return rchar() - before if before >= 0 else -1


def bench_http_index(root: Path, args) -> dict:
    """Streams every byte (no seeks over HTTP): bounded by the loopback transfer and the header walk."""
    folder = root / "local"
    handler = partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    urls = [f"http://127.0.0.1:{port}/train-{s:05d}.tar" for s in range(args.shards)]
    runs = root / "runs"

    def drop_cache() -> None:
        shutil.rmtree(RunsRoot(runs).shard_index, ignore_errors=True)

    try:
        took = median_time(lambda: index_shards(urls, runs_root=str(runs)), args.rounds, drop_cache)
    finally:
        server.shutdown()
        server.server_close()
    total = sum(os.path.getsize(folder / f"train-{s:05d}.tar") for s in range(args.shards))
    return {
        "index_s": took,
        "index_shards_per_s": args.shards / took,
        "index_samples_per_s": args.shards * args.samples / took,
        "mib_per_s": total / 2**20 / took,
    }


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def tiny_shard() -> bytes:
    """One sample, trimmed to 2 KiB (tarfile pads to 10 KiB): 10,000 of them fit in 20 MiB."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for suffix, data in (("jpg", b"x" * 100), ("cls", b"1")):
            info = tarfile.TarInfo(f"k/000000.{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()[: 4 * 512] + bytes(1024)


def bench_many(root: Path, args) -> dict:
    """10,000 tiny shards: first index, then what a start-up costs with the index cache and with a manifest."""
    n = args.many
    folder = root / "many"
    folder.mkdir()
    raw = tiny_shard()
    names = [f"s-{i:05d}.tar" for i in range(n)]
    for name in names:
        (folder / name).write_bytes(raw)
    pattern, small = f"{folder}/s-{{00000..{n - 1:05d}}}.tar", f"{folder}/s-{{00000..00099}}.tar"
    config, config_small = _config(root, pattern), _config(root, small)
    first = median_time(lambda: index_shards(expand_shards(pattern), runs_root=str(root / "runs")), 1)
    expand = median_time(lambda: expand_shards(pattern), args.rounds)
    from_index = median_time(lambda: plan_data(config, 8), args.rounds)
    _rank_startup(config_small)  # imports torch and timm: not a cost of the shards
    startup = median_time(lambda: _rank_startup(config), args.rounds)
    startup_small = median_time(lambda: _rank_startup(config_small), args.rounds)  # the part shards don't change
    _write_manifest(folder, names)
    from_manifest = median_time(lambda: plan_data(config, 8), args.rounds)
    per_k = 1000 / n
    return {
        "shards": n,
        "first_index_s": first,
        "first_index_shards_per_s": n / first,
        "expand_and_check_per_1000_ms": 1000 * expand * per_k,
        "plan_from_index_per_1000_ms": 1000 * from_index * per_k,
        "plan_from_manifest_per_1000_ms": 1000 * from_manifest * per_k,
        "rank_startup_s": startup,
        "rank_startup_100_shards_s": startup_small,
        "rank_startup_per_1000_ms": 1000 * (startup - startup_small) / (n - 100) * 1000,
    }


def _config(root: Path, pattern: str):
    return load_config(None, [f"data.train_shards={pattern}", "data.val_shards=null", "data.batch_size=8",
                              f"run.root={root}/runs", "launch.nproc=8", "data.num_workers=2"])  # fmt: skip


def _rank_startup(config) -> None:
    """What one rank does before its first batch is read: plan (cached index), both loaders, and the pickled
    spec every loader worker receives. Opens no shard."""
    from pipeline.data.loader import RankData

    plan = plan_data(config, 8, build_index=False)
    data = RankData(config, plan, 7, 8, 32, False)
    loader = data.train_batches(epoch=0)
    pickle.dumps(loader.dataset)


def _write_manifest(folder: Path, names: list[str]) -> None:
    from pipeline.data.manifest import write_manifest

    splits = {"train": {"shards": names, "counts": [1] * len(names), "num_samples": len(names)}}
    write_manifest(folder, classes=["a", "b"], image_format="jpg", splits=splits, source="bench", settings={})
    (folder / INDEX_NAME).unlink(missing_ok=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=24, help="local shards to index (default 24)")
    p.add_argument("--samples", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-bytes", type=int, default=8192, help="bytes per image member (default 8192)")
    p.add_argument("--many", type=int, default=10_000, help="tiny shards for the start-up figures (default 10000)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file (default runs/bench/data-<time>.json)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        result = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
            "local_index": bench_local_index(root, args),
            "http_index": bench_http_index(root, args),
            "many_shards": bench_many(root, args),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for section, values in result.items():
        print(section, json.dumps(values, indent=2) if isinstance(values, dict) else values)
    out = Path(args.out) if args.out else RunsRoot("runs").bench / f"data-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
