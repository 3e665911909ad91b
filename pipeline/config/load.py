"""Schema defaults <- YAML files (with ``base:`` inheritance) <- a cluster profile <- ``key=value`` overrides.

Only omegaconf is imported here, so a typo in an override is reported before torch, timm or DeepSpeed load.
Overrides mean exactly what was typed: the same key given twice is refused (a shell that brace-expanded
``data.train_shards=x-{0..7}.tar`` into eight words would otherwise train on the last shard alone), and the value
of a string-typed key is the text as typed, not YAML (``data.train_shards={a,b}/x-{0..1}.tar`` would be a YAML
mapping, ``run.name=true`` a boolean); only YAML's null words (``null``, ``~``, nothing) still mean None.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config.schema import Config, ConfigError, SlurmConfig


def _load_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML file merged over the files its ``base:`` key names (relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' inheritance loops through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: must be a mapping of sections (run, data, model, ...)")
    bases = raw.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for base in bases:
        merged = OmegaConf.merge(merged, _load_yaml_with_bases(path.parent / base, seen + (path,)))
    return OmegaConf.merge(merged, raw)


def _describe(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    first = str(exc).splitlines()[0]
    return f"{where}: key '{key}': {first}"


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """Every override is ``key=value`` and names its key once; returns them unchanged."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or key != key.strip():
            raise ConfigError(f"override '{item}' is not key=value (e.g. optim.lr=1e-3)")
    twice = [key for key, n in Counter(o.split("=", 1)[0] for o in overrides).items() if n > 1]
    if twice:
        key = twice[0]
        values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
        shown = ", ".join(values[:3]) + (", ..." if len(values) > 3 else "")
        hint = ""
        numbers = re.compile(r"[-+]?[\d.]+(e[-+]?\d+)?", re.IGNORECASE)
        expanded = len({re.sub(r"\d+", "#", v) for v in values}) == 1 and not numbers.fullmatch(values[0])
        if expanded:  # what a shell makes of an unquoted brace pattern (paths differing in digits, not numbers)
            hint = (
                f" A shell expands braces in unquoted words: quote the pattern, e.g. '{key}=x/train-{{0000..0007}}"
                f'.tar\' (make ... ARGS="..." passes it unchanged)'
            )
        raise ConfigError(f"override {key} is given {len(values)} times ({shown}); give it once.{hint}")
    return list(overrides)


NULL_WORDS = ("", "null", "Null", "NULL", "~")  # what YAML reads as None


_UNKNOWN = object()


def _schema_type(key: str, schema: type = Config) -> Any:
    """The schema's type for ``key`` (e.g. ``data.train_shards``); ``Any`` below a dict-typed field
    (``model.kwargs.drop_rate``), ``_UNKNOWN`` for a key the schema lacks."""
    kind: Any = schema
    for part in key.split("."):
        if not dataclasses.is_dataclass(kind):
            return Any if typing.get_origin(kind) is dict else _UNKNOWN
        kind = typing.get_type_hints(kind).get(part, _UNKNOWN)
        if kind is _UNKNOWN:
            return kind
    return kind


def is_string_key(key: str) -> bool:
    """Whether the schema types ``key`` as ``str`` or ``Optional[str]``."""
    kind = _schema_type(key)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return kind is str or (typing.get_origin(kind) is typing.Union and args == [str])


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` items as a config tree: string-typed keys verbatim (and unknown ones: the merge names them),
    the others parsed as YAML (numbers, booleans, lists), type-checked when merged over the schema."""
    tree = OmegaConf.create()
    for item in overrides:
        key, text = item.split("=", 1)
        if is_string_key(key) or _schema_type(key) is _UNKNOWN:
            OmegaConf.update(tree, key, None if text in NULL_WORDS else text, force_add=True)
            continue
        try:
            tree = OmegaConf.merge(tree, OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"override {key}: {text!r} is not a value of this key ({first})") from None
    return tree


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, stage: Optional[str] = None, check: bool = True
) -> Config:
    """The validated config. ``stage`` (set by the command) may not be contradicted by an override."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _load_yaml_with_bases(Path(path)))
        except OmegaConfBaseException as exc:
            raise ConfigError(_describe(exc, str(path))) from None
    overrides = check_overrides(overrides)
    try:
        cfg = OmegaConf.merge(cfg, parse_overrides(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, "override")) from None
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if stage is not None:
        typed = next((o.split("=", 1)[1] for o in overrides if o.startswith("run.stage=")), stage)
        if typed != stage:
            raise ConfigError(f"run.stage={typed} contradicts the command ({stage}); leave run.stage out")
        config.run.stage = stage
    if config.launch.slurm_profile:
        config = _apply_slurm_profile(config)
    if check:
        config.check()
    return config


def _apply_slurm_profile(config: Config) -> Config:
    """Cluster settings (partition, account, ...) from a profile file, under explicit overrides."""
    profile = _load_yaml_with_bases(Path(config.launch.slurm_profile))
    unknown = set(profile.keys()) - {"slurm"}
    if unknown:
        raise ConfigError(f"{config.launch.slurm_profile}: only a 'slurm:' section is allowed, found {sorted(unknown)}")
    try:
        cfg = OmegaConf.structured(config)
        base_slurm = OmegaConf.merge(OmegaConf.structured(SlurmConfig), profile.get("slurm", {}))
        # fields the user set explicitly (differ from schema defaults) win over the profile
        explicit = {k: v for k, v in OmegaConf.to_container(cfg.launch.slurm).items() if v != getattr(SlurmConfig(), k)}
        cfg.launch.slurm = OmegaConf.merge(base_slurm, explicit)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc, config.launch.slurm_profile)) from None
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params and config comparisons take."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def from_yaml_file(path: str | Path) -> Config:
    """A resolved config saved with a run (validated when it was written; not again, so an old run
    stays readable when a check is added)."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), _load_yaml_with_bases(Path(path)))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
