"""``make shards`` / ``python -m pipeline shards``: write WebDataset shards from digits or an ImageFolder tree."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.data.manifest import MANIFEST_NAME, read_manifest
from pipeline.data.sources import (
    _digits_settings,
    _find_classes,
    _image_files,
    _imagefolder_settings,
    write_digits,
    write_imagefolder,
)


class _UsageError(Exception):
    """A bad command-line value; main() prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and sys.exit(2)
        raise _UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pipeline shards",
        description=(
            "Write WebDataset tar shards plus manifest.json from the built-in digits "
            "demo set or from an ImageFolder tree (<dir>/<class_name>/<images>)."
        ),
    )
    p.add_argument(
        "--source",
        default="digits",
        help="'digits' (default: scikit-learn's 8x8 digits) or a path to an ImageFolder directory",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: data/digits for digits; required for a directory source)",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=None,
        help="samples per tar shard (default: 200 for digits, 1000 otherwise)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="ImageFolder only: shrink images so the longer side is at most this (never enlarges)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="fraction of each class held out as 'val', in [0, 1) (default: 1/6 for digits, 0 otherwise)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the train/val split and train order (default: 0)")
    p.add_argument(
        "--image-size", type=int, default=None, help="digits only: output image side in pixels (default: 32)"
    )
    p.add_argument(
        "--format",
        dest="image_format",
        choices=["png", "jpg"],
        default=None,
        help="image encoding in the shards (default: png for digits, jpg otherwise)",
    )
    p.add_argument(
        "--unlabeled",
        action="store_true",
        help="write no labels (.cls), for self-supervised pretraining: digits; a directory is unlabelled exactly "
        "when it has no class subdirectories (its own images are written)",
    )
    p.add_argument(
        "--force", action="store_true", help="rewrite even if a complete manifest with the same settings exists"
    )
    _add_index_options(p)
    return p


def _add_index_options(p: argparse.ArgumentParser) -> None:
    """Indexing shards written by other tools (the same index a run builds when no manifest lists them)."""
    p.add_argument(
        "--index",
        metavar="PATTERN",
        default=None,
        help="instead of writing shards: index existing ones (a quoted brace pattern of paths, http(s):// URLs or "
        "pipe: commands) and cache what they hold, as a run does when no manifest.json lists them",
    )
    p.add_argument("--refresh", action="store_true", help="with --index: walk every shard again, ignoring the cache")
    p.add_argument(
        "--runs-root",
        default="runs",
        help="with --index: run.root, where the index of remote or read-only shards is kept (default: runs)",
    )


def _index(args: argparse.Namespace) -> int:
    """``--index``: the shard index, built or refreshed; one line on what the shards hold."""
    from pipeline.data.plan import DataError, index_pattern

    try:
        _result, line = index_pattern(args.index, runs_root=args.runs_root, refresh=args.refresh)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0


def _is_up_to_date(out_dir: Path, settings: dict[str, Any]) -> bool:
    """True if a manifest with identical settings exists and all its shards are present."""
    try:
        manifest = read_manifest(out_dir)
    except (FileNotFoundError, ValueError):
        return False
    if manifest.get("settings") != settings:
        return False
    return all((out_dir / s).is_file() for split in manifest["splits"].values() for s in split["shards"])


def _validated_settings(args: argparse.Namespace) -> tuple[str, Path, dict[str, Any]]:
    """Turn parsed args into (kind, out_dir, settings) or raise _UsageError naming the option."""
    is_digits = args.source == "digits"
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        raise _UsageError(f"--samples-per-shard must be an integer >= 1 (got {args.samples_per_shard})")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise _UsageError(f"--val-fraction must be in [0, 1) (got {args.val_fraction})")
    if args.max_side is not None and args.max_side < 1:
        raise _UsageError(f"--max-side must be an integer >= 1 (got {args.max_side})")
    if args.image_size is not None and args.image_size < 1:
        raise _UsageError(f"--image-size must be an integer >= 1 (got {args.image_size})")

    if is_digits:
        if args.max_side is not None:
            raise _UsageError("--max-side applies only to ImageFolder sources; use --image-size for digits")
        out = Path(args.out or "data/digits")
        settings = _digits_settings(
            1 / 6 if args.val_fraction is None else args.val_fraction,
            args.seed,
            200 if args.samples_per_shard is None else args.samples_per_shard,
            32 if args.image_size is None else args.image_size,
            args.image_format or "png",
            args.unlabeled,
        )
        return "digits", out, settings

    src = Path(args.source)
    if not src.is_dir():
        raise _UsageError(f"--source must be 'digits' or an existing ImageFolder directory (not found: {src})")
    classes = _find_classes(src)
    if not classes and not _image_files(src, recursive=False):
        raise _UsageError(
            f"--source {src}: no class subdirectories and no images found (expected "
            f"{src}/<class_name>/<images>, or images directly in {src} for unlabelled shards)"
        )
    if classes and args.unlabeled:
        raise _UsageError(
            f"--unlabeled: {src} has class subdirectories; a directory is unlabelled when its images sit directly in it"
        )
    if args.image_size is not None:
        raise _UsageError("--image-size applies only to --source digits; use --max-side for ImageFolder sources")
    if args.out is None:
        raise _UsageError("--out is required when --source is a directory")
    settings = _imagefolder_settings(
        src,
        0.0 if args.val_fraction is None else args.val_fraction,
        args.seed,
        1000 if args.samples_per_shard is None else args.samples_per_shard,
        args.max_side,
        args.image_format or "jpg",
        unlabeled=not classes,
    )
    return "imagefolder", Path(args.out), settings


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success, 2 on bad input."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.index is not None:
            return _index(args)
        kind, out, settings = _validated_settings(args)
    except SystemExit as exc:  # --help: argparse printed it and wants to exit
        return exc.code if isinstance(exc.code, int) else 0
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    manifest_path = out / MANIFEST_NAME
    if not args.force and _is_up_to_date(out, settings):
        print(f"up to date: {manifest_path} (use --force to rewrite)")
        return 0

    try:
        if kind == "digits":
            manifest_path = write_digits(
                out,
                val_fraction=settings["val_fraction"],
                seed=settings["seed"],
                samples_per_shard=settings["samples_per_shard"],
                image_size=settings["image_size"],
                image_format=settings["image_format"],
                unlabeled=args.unlabeled,
            )
        else:
            manifest_path = write_imagefolder(
                args.source,
                out,
                val_fraction=settings["val_fraction"],
                seed=settings["seed"],
                samples_per_shard=settings["samples_per_shard"],
                max_side=settings["max_side"],
                image_format=settings["image_format"],
            )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    manifest = read_manifest(manifest_path)
    for split, info in manifest["splits"].items():
        print(f"{split}: {len(info['shards'])} shards, {info['num_samples']} samples ({out / info['pattern']})")
    if manifest.get("skipped_files"):
        print(f"skipped {manifest['skipped_files']} unreadable image file(s)")
    print(f"manifest: {manifest_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
