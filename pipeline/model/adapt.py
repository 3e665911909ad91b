"""Checkpoint adaptation for fine-tuning at a new resolution / window size.

Pretraining runs at low resolution, fine-tuning at a higher one. The only tensors whose
*shape* legitimately depends on the input resolution are position tables:

* ViT ``pos_embed`` (1, prefix + H*W, C) -> resampled on the patch grid, prefix tokens kept.
* NHWC ``*pos_embed`` (1, H, W, C) (e.g. SAM-style) -> resampled the same way.
* Swin ``*.relative_position_bias_table`` ((2Wh-1)*(2Ww-1), heads) -> resampled on the
  offset grid when the window grows.
* ``*.relative_position_index`` / ``*.attn_mask`` -> derived buffers; never copied, the target
  model's own (built for its window / resolution) are kept.

A patch size chosen with the resolution (patch 8 at 64 px after patch 4 at 32 px) changes the
patch-embedding kernel too: it is resampled FlexiViT-style (timm's ``resample_patch_embed``).

Everything else must match exactly, except the classifier head, which may be re-initialised
when ``num_classes`` changes. Any other shape mismatch is an error: silently skipping a
mismatched tensor is how a fine-tune ends up quietly training from random init.

The resampling functions are pure tensor -> tensor functions (no model construction), and
``adapt_state_dict`` only reads ``model.state_dict()`` and a few attributes
(``patch_embed.grid_size``, ``num_prefix_tokens``, ``no_embed_class``, ``window_size``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc, resample_patch_embed
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table as _timm_resize_rel_pos_bias_table
from torch import Tensor

try:  # the exact function Swin uses to fill its buffer
    from timm.models.swin_transformer import get_relative_position_index as _swin_rel_pos_index
except ImportError:  # pragma: no cover - older/newer timm layouts
    _swin_rel_pos_index = None

__all__ = [
    "AdaptationError",
    "AdaptationReport",
    "INTERP_METHODS",
    "REL_POS_METHODS",
    "adapt_state_dict",
    "load_adapted",
    "relative_position_index",
    "resample_pos_embed",
    "resize_rel_pos_bias_table",
]

#: modes accepted by ``resample_pos_embed`` (all F.interpolate modes that make sense on a 2D grid)
INTERP_METHODS = ("bicubic", "bilinear", "nearest", "nearest-exact")
#: ``resize_rel_pos_bias_table`` also accepts timm's BEiT-style "geometric" resize
REL_POS_METHODS = INTERP_METHODS + ("geometric",)
_ANTIALIAS_METHODS = ("bicubic", "bilinear")

# buffers that are a pure function of window / resolution: the target model's own are correct,
# the checkpoint's (old original-Swin checkpoints persisted them) are for the wrong size
_REBUILT_SUFFIXES = ("relative_position_index", "attn_mask")
_REL_TABLE_SUFFIX = "relative_position_bias_table"
# fallback classifier names when the model has no pretrained_cfg['classifier']
_DEFAULT_HEADS = ("head", "head.fc")


class AdaptationError(ValueError):
    """The checkpoint cannot be adapted to the model without guessing."""


# --------------------------------------------------------------------------------------
# pure resampling functions
# --------------------------------------------------------------------------------------


def _pair(x: Any, name: str) -> tuple[int, int]:
    if isinstance(x, int):
        x = (x, x)
    try:
        h, w = (int(v) for v in x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {x!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def _check_method(method: str, allowed: tuple[str, ...], antialias: bool = False) -> None:
    if method not in allowed:
        raise ValueError(f"unsupported interpolation method {method!r}; allowed: {', '.join(allowed)}")
    if antialias and method not in _ANTIALIAS_METHODS:
        raise ValueError(f"antialias=True is only supported with {', '.join(_ANTIALIAS_METHODS)} (got {method!r})")


def _square_side(n: int) -> int | None:
    s = math.isqrt(n) if n >= 0 else -1
    return s if s >= 0 and s * s == n else None


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    method: str = "bicubic",
    antialias: bool = False,
) -> Tensor:
    """Resample a (1, prefix + H*W, C) absolute position embedding to ``new_grid``.

    Prefix tokens (cls / registers / distillation) pass through untouched. ``old_grid`` is
    needed when the old grid is not square (a token count alone can't tell 8x12 from 12x8).
    Equal sizes return the input tensor itself (bit-exact identity, no float32 round trip).

    Interpolation runs in float32 with ``align_corners=False`` (pixel-centre convention: the
    grid covers the image, not the corner patch centres) and the result is cast back to the
    input dtype.

    Default ``antialias=False``: the MAE / DeiT fine-tuning convention (plain bicubic,
    align_corners=False), which is what published fine-tune numbers were produced with.
    timm's ``resample_abs_pos_embed`` defaults to ``antialias=True``. Note this is NOT only a
    downsampling matter for bicubic: PyTorch's antialiased bicubic path uses the Keys/PIL kernel
    (a=-0.5) while the plain path uses a=-0.75, so results differ (slightly) when upsampling too.
    For bilinear, and for upsampling only, the two are identical; when downsampling antialias
    additionally widens the kernel. Pass ``antialias=True`` to reproduce timm's
    checkpoint_filter_fn exactly.
    """
    _check_method(method, INTERP_METHODS, antialias)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, prefix + H*W, C), got {tuple(pos_embed.shape)}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    new_grid = _pair(new_grid, "new_grid")
    num_grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = _square_side(num_grid_tokens)
        if side is None or side == 0:
            raise ValueError(
                f"pos_embed has {num_grid_tokens} grid tokens after {num_prefix_tokens} prefix tokens, "
                f"which is not a square grid; pass old_grid=(H, W)"
            )
        old_grid = (side, side)
    old_grid = _pair(old_grid, "old_grid")
    if old_grid[0] * old_grid[1] != num_grid_tokens:
        raise ValueError(
            f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} tokens but pos_embed has "
            f"{num_grid_tokens} grid tokens (+{num_prefix_tokens} prefix)"
        )
    if old_grid == new_grid:
        return pos_embed
    # timm's function does exactly what we want (split prefix, float32, NCHW interpolate with
    # align_corners=None == False for bicubic/bilinear, cast back, re-concat); we only pin the
    # antialias default (see docstring) and validate sizes/methods up front.
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        interpolation=method,
        antialias=antialias,
    )


def _table_window(rows: int) -> tuple[int, int] | None:
    """Square window whose (2W-1)^2 table has ``rows`` rows, if any."""
    side = _square_side(rows)
    if side is None or side % 2 == 0:
        return None
    w = (side + 1) // 2
    return (w, w)


def resize_rel_pos_bias_table(
    table: Tensor,
    new_window: tuple[int, int],
    old_window: tuple[int, int] | None = None,
    method: str = "bicubic",
) -> Tensor:
    """Resize a Swin relative position bias table ((2Wh-1)*(2Ww-1), heads) to ``new_window``.

    Rows are offsets (dh, dw) in row-major order, so the table is a (2Wh-1) x (2Ww-1) image per
    head. ``old_window`` defaults to the square window implied by the row count.

    Deviation from timm: timm's ``resize_rel_pos_bias_table`` (used by its Swin
    checkpoint_filter_fn) is the BEiT "geometric progression" resize with linear interpolation
    on a non-uniform source grid. The default here is plain bicubic, ``align_corners=False``
    on the offset grid, which is what the official Swin / Swin-V2 fine-tuning code does for
    224->384 (window 7->12); that keeps our numbers comparable with published fine-tunes.
    ``method="geometric"`` delegates to timm's implementation for parity with timm.
    Computed in float32, cast back to the input dtype; equal windows return the input itself.
    """
    _check_method(method, REL_POS_METHODS)
    if table.ndim != 2:
        raise ValueError(f"relative position bias table must be 2D (rows, heads), got {tuple(table.shape)}")
    new_window = _pair(new_window, "new_window")
    rows, heads = table.shape
    if old_window is None:
        old_window = _table_window(rows)
        if old_window is None:
            raise ValueError(f"table with {rows} rows is not (2W-1)^2 for a square window; pass old_window=(Wh, Ww)")
    old_window = _pair(old_window, "old_window")
    src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if src[0] * src[1] != rows:
        raise ValueError(f"old_window {old_window} needs {src[0] * src[1]} rows, table has {rows}")
    if src == dst:
        return table
    if method == "geometric":
        return _timm_resize_rel_pos_bias_table(
            table, new_window_size=new_window, new_bias_shape=(dst[0] * dst[1], heads), old_window_size=old_window
        )
    # Direct F.interpolate instead of timm's resize_rel_pos_bias_table_simple: the latter only
    # handles square sources, hard-codes bicubic and does not upcast half-precision inputs.
    grid = table.float().transpose(0, 1).reshape(1, heads, src[0], src[1])
    align = False if method in _ANTIALIAS_METHODS else None  # nearest modes reject align_corners
    out = F.interpolate(grid, size=dst, mode=method, align_corners=align)
    return out.reshape(heads, dst[0] * dst[1]).transpose(0, 1).contiguous().to(table.dtype)


def relative_position_index(window: tuple[int, int]) -> Tensor:
    """The (Wh*Ww, Wh*Ww) long index into the bias table, exactly as timm's Swin builds it."""
    wh, ww = _pair(window, "window")
    if _swin_rel_pos_index is not None:
        return _swin_rel_pos_index(wh, ww)
    # same construction, generic helper (also used by BEiT-style models)
    from timm.layers.pos_embed_rel import gen_relative_position_index

    return gen_relative_position_index((wh, ww))


# --------------------------------------------------------------------------------------
# state-dict adaptation
# --------------------------------------------------------------------------------------


def _shape(t: Any) -> tuple:
    return tuple(int(s) for s in t.shape)


@dataclass
class AdaptationReport:
    """What ``adapt_state_dict`` did, for logs / MLflow (``to_dict``) and humans (``summary``)."""

    adapted: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    reinitialized: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    method: str = "bicubic"
    antialias: bool = False

    def to_dict(self) -> dict:
        def rows(items):
            return [{"name": n, "old_shape": list(a), "new_shape": list(b)} for n, a, b in items]

        return {
            "adapted": rows(self.adapted),
            "reinitialized": rows(self.reinitialized),
            "dropped": list(self.dropped),
            "missing": list(self.missing),
            "method": self.method,
            "antialias": bool(self.antialias),
        }

    def summary(self) -> str:
        lines = [
            f"checkpoint adaptation (method={self.method}, antialias={self.antialias}): "
            f"{len(self.adapted)} adapted, {len(self.reinitialized)} reinitialized, "
            f"{len(self.dropped)} dropped, {len(self.missing)} missing"
        ]
        for n, a, b in self.adapted:
            lines.append(f"  adapted       {n}: {list(a)} -> {list(b)}")
        for n, a, b in self.reinitialized:
            lines.append(f"  reinitialized {n}: checkpoint {list(a)}, model {list(b)} (kept model init)")
        for n in self.dropped:
            why = "buffer rebuilt by model" if n.endswith(_REBUILT_SUFFIXES) else "not in model"
            lines.append(f"  dropped       {n} ({why})")
        for n in self.missing:
            lines.append(f"  missing       {n} (kept model init)")
        return "\n".join(lines)


def _unwrap(state_dict: Mapping) -> dict[str, Tensor]:
    """Strip checkpoint containers ({'model'|'state_dict'|'module': sd}, nested) and DDP / DeepSpeed 'module.' or
    torch.compile '_orig_mod.' key prefixes (timm's ``clean_state_dict``)."""
    from timm.models import clean_state_dict

    sd: Mapping = state_dict
    for _ in range(3):
        wrapper = next((w for w in ("model", "state_dict", "module") if isinstance(sd.get(w), Mapping)), None)
        if wrapper is None:
            break
        sd = sd[wrapper]
    return clean_state_dict(dict(sd))


def _owner(model: torch.nn.Module, key: str) -> torch.nn.Module | None:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    try:
        return model.get_submodule(parent) if parent else model
    except AttributeError:
        return None


def _head_prefixes(model: torch.nn.Module) -> list[str]:
    names: list[str] = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    clf = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(clf, str):
        names.append(clf)
    elif isinstance(clf, (list, tuple)):
        names.extend(c for c in clf if isinstance(c, str))
    names.extend(n for n in _DEFAULT_HEADS if n not in names)
    return names


def _grid_size(owner: torch.nn.Module | None) -> tuple[int, int] | None:
    pe = getattr(owner, "patch_embed", None) if owner is not None else None
    gs = getattr(pe, "grid_size", None)
    return None if gs is None else _pair(gs, "patch_embed.grid_size")


def _adapt_token_pos_embed(key, v, target, owner, old_grid, method, antialias) -> Tensor:
    """(1, prefix + H*W, C) pos embed: new grid from the model, old grid from the checkpoint."""
    if v.ndim != 3 or v.shape[0] != 1 or v.shape[-1] != target.shape[-1]:
        raise AdaptationError(f"{key}: checkpoint {_shape(v)} vs model {_shape(target)} (embed dim / layout differ)")
    if owner is not None and getattr(owner, "no_embed_class", False):
        prefix = 0  # prefix tokens are not in pos_embed (timm no_embed_class / DINOv2-reg style)
    else:
        prefix = int(getattr(owner, "num_prefix_tokens", 0) or 0)
    new_grid = _grid_size(owner)
    if new_grid is None:
        side = _square_side(target.shape[1] - prefix)
        if not side:
            raise AdaptationError(f"{key}: cannot infer the model's grid from {_shape(target)}")
        new_grid = (side, side)
    if new_grid[0] * new_grid[1] + prefix != target.shape[1]:
        raise AdaptationError(
            f"{key}: model grid {new_grid} + {prefix} prefix tokens != model pos_embed length {target.shape[1]}"
        )
    n_old = v.shape[1] - prefix
    if old_grid is None:
        side = _square_side(n_old)
        if not side:
            raise AdaptationError(
                f"{key}: checkpoint has {n_old} grid tokens (+{prefix} prefix), not a square grid; "
                f"pass old_grid=(H, W) to say how they are laid out"
            )
        old_grid = (side, side)
    old_grid = _pair(old_grid, "old_grid")
    if old_grid[0] * old_grid[1] != n_old:
        raise AdaptationError(f"{key}: old_grid {old_grid} does not match {n_old} checkpoint grid tokens")
    return resample_pos_embed(v, new_grid, old_grid, num_prefix_tokens=prefix, method=method, antialias=antialias)


def _adapt_rel_table(key, v, target, owner, method) -> Tensor:
    if v.ndim != 2 or target.ndim != 2 or v.shape[1] != target.shape[1]:
        raise AdaptationError(
            f"{key}: checkpoint {_shape(v)} vs model {_shape(target)} (number of heads differs; not resampleable)"
        )
    new_window = getattr(owner, "window_size", None) if owner is not None else None
    extra = 0
    if new_window is not None:
        new_window = _pair(new_window, "window_size")
        extra = target.shape[0] - (2 * new_window[0] - 1) * (2 * new_window[1] - 1)
    if new_window is None or extra < 0:
        # derive from the target table itself: side = 2W - 1  =>  W = (sqrt(rows) + 1) / 2
        new_window, extra = _table_window(target.shape[0]), 0
        if new_window is None:
            raise AdaptationError(f"{key}: cannot infer the model's window from table shape {_shape(target)}")
    # trailing rows beyond the (2W-1)^2 offsets (BEiT cls<->token entries) are not spatial: pass through
    body, tail = (v[:-extra], v[-extra:]) if extra else (v, None)
    old_window = _table_window(body.shape[0])
    if old_window is None:
        raise AdaptationError(
            f"{key}: checkpoint table {_shape(v)} is not a square window's (2W-1)^2 offsets (+{extra} extra rows)"
        )
    out = resize_rel_pos_bias_table(body, new_window, old_window, method=method)
    return out if tail is None else torch.cat([out, tail], dim=0)


def adapt_state_dict(
    state_dict: dict[str, Tensor],
    model: torch.nn.Module,
    *,
    method: str = "bicubic",
    antialias: bool = False,
    reinit_head: str | None = "auto",
    old_grid: tuple[int, int] | None = None,
    rel_pos_method: str | None = None,
) -> tuple[dict[str, Tensor], AdaptationReport]:
    """Make ``state_dict`` loadable into ``model`` (timm ViT, Swin, or anything with matching keys).

    Target shapes come from ``model.state_dict()``; the model is only read, never modified.

    * ``*pos_embed``: resampled to ``model.patch_embed.grid_size`` (prefix tokens kept;
      ``num_prefix_tokens``, or 0 with ``no_embed_class``). The old grid is inferred as square
      from the checkpoint; pass ``old_grid`` for non-square pretraining grids (and to force a
      resample when a non-square grid is merely transposed, which a shape check can't see).
    * ``*.relative_position_bias_table``: resized to the owning attention module's window.
    * ``*.relative_position_index`` / ``*.attn_mask``: never copied (reported as dropped).
    * classifier head with a different shape: dropped so the model keeps its fresh init when
      ``reinit_head="auto"``; ``"always"`` drops it even if shapes match (new label set of the
      same size); ``None`` treats a head mismatch as an error.
    * any other shape mismatch: ``AdaptationError`` listing every offending key.
    * ``*patch_embed.proj.weight`` with another kernel size (a new patch size): FlexiViT's
      pseudo-inverse resample (timm's ``resample_patch_embed``), so a patch upscaled with the image
      embeds as the pretraining patch did; fine-tuning at 2x resolution with 2x patches keeps the token grid.

    ``rel_pos_method`` defaults to ``method`` (use "geometric" for timm's BEiT-style resize).
    Returns the new dict (tensors not adapted are the checkpoint's own objects) and a report.
    """
    _check_method(method, INTERP_METHODS, antialias)
    rel_pos_method = method if rel_pos_method is None else rel_pos_method
    _check_method(rel_pos_method, REL_POS_METHODS)
    if reinit_head not in ("auto", "always", None):
        raise ValueError(f"reinit_head must be 'auto', 'always' or None, got {reinit_head!r}")

    target = model.state_dict()
    sd = _unwrap(state_dict)
    report = AdaptationReport(method=method, antialias=antialias)
    reinit = _head_keys_to_reinit(model, target, sd, reinit_head)
    out: dict[str, Tensor] = {}
    errors: list[str] = []
    for k, v in sd.items():
        if k.endswith(_REBUILT_SUFFIXES) or k not in target:
            report.dropped.append(k)
        elif k in reinit:
            report.reinitialized.append((k, _shape(v), _shape(target[k])))
        elif not isinstance(v, Tensor):
            errors.append(f"{k}: checkpoint value is {type(v).__name__}, not a tensor")
        else:
            new = _adapt_or_error(k, v, target[k], model, old_grid, method, antialias, rel_pos_method)
            if isinstance(new, str):
                errors.append(new)
                continue
            if new is not v:
                report.adapted.append((k, _shape(v), _shape(new)))
            out[k] = new
    if errors:
        raise AdaptationError(
            f"{len(errors)} checkpoint tensor(s) cannot be adapted to the model:\n  " + "\n  ".join(errors)
        )
    report.missing = [k for k in target if k not in sd and not k.endswith(_REBUILT_SUFFIXES)]
    return out, report


def _adapt_or_error(k: str, v: Tensor, target: Tensor, model, old_grid, method, antialias, rel_pos_method):
    """The adapted tensor, or the message saying why ``k`` cannot be adapted (collected, so all are reported)."""
    try:
        return _adapt_tensor(k, v, target, model, old_grid, method, antialias, rel_pos_method)
    except AdaptationError as e:
        return str(e)
    except ValueError as e:  # from the pure functions: attach the key
        return f"{k}: {e}"


def _head_keys_to_reinit(model: torch.nn.Module, target: Mapping, sd: Mapping, reinit_head) -> set[str]:
    """The head is a unit: if any of its tensors mismatches, all of them are reinitialised."""
    reinit: set[str] = set()
    for p in _head_prefixes(model):
        keys = [k for k in (f"{p}.weight", f"{p}.bias") if k in target]
        mismatch = any(k in sd and _shape(sd[k]) != _shape(target[k]) for k in keys)
        if keys and (reinit_head == "always" or (reinit_head == "auto" and mismatch)):
            reinit.update(k for k in keys if k in sd)
    return reinit


def _adapt_tensor(k: str, v: Tensor, t: Tensor, model, old_grid, method, antialias, rel_pos_method) -> Tensor:
    """One checkpoint tensor made to fit the model's (raises AdaptationError naming the key when it cannot)."""
    same = _shape(v) == _shape(t)
    leaf = k.rsplit(".", 1)[-1]
    if leaf.endswith("pos_embed") and v.ndim == 3 and (not same or (old_grid is not None and leaf == "pos_embed")):
        new = _adapt_token_pos_embed(
            k, v, t, _owner(model, k), old_grid if leaf == "pos_embed" else None, method, antialias
        )
    elif leaf.endswith("pos_embed") and v.ndim == 4 and not same:
        # NHWC (1, H, W, C): timm's nhwc helper is exactly this; validate first
        if v.shape[0] != 1 or t.ndim != 4 or v.shape[-1] != t.shape[-1]:
            raise AdaptationError(f"{k}: checkpoint {_shape(v)} vs model {_shape(t)}")
        new = resample_abs_pos_embed_nhwc(v, new_size=list(t.shape[1:3]), interpolation=method, antialias=antialias)
    elif leaf == _REL_TABLE_SUFFIX and not same:
        new = _adapt_rel_table(k, v, t, _owner(model, k), rel_pos_method)
    elif same:
        return v
    elif k.endswith("patch_embed.proj.weight"):
        if v.ndim != 4 or t.ndim != 4 or v.shape[:2] != t.shape[:2]:
            raise AdaptationError(
                f"{k}: checkpoint {_shape(v)} vs model {_shape(t)}: the embedding width or input channels differ "
                f"(only the patch size may change)"
            )
        if method not in _ANTIALIAS_METHODS:
            raise AdaptationError(
                f"{k}: a new patch size is resampled with {' or '.join(_ANTIALIAS_METHODS)}, not {method}"
            )
        # FlexiViT's pseudo-inverse resize (timm's): a patch upsampled to the new size embeds as the old one did
        new = resample_patch_embed(v, list(t.shape[-2:]), interpolation=method, antialias=antialias)
    else:
        raise AdaptationError(f"{k}: checkpoint {_shape(v)} vs model {_shape(t)}")
    if _shape(new) != _shape(t):  # defensive: never hand back a tensor that won't load
        raise AdaptationError(f"{k}: adapted to {_shape(new)} but model expects {_shape(t)}")
    return new


def load_adapted(model: torch.nn.Module, state_dict: dict[str, Tensor], **kw) -> AdaptationReport:
    """``adapt_state_dict`` + ``model.load_state_dict(strict=False)``; returns the report.

    strict=False is needed for the reinitialised head / missing keys, which the report lists;
    unexpected keys can't happen after adaptation, so they raise instead of being ignored.
    """
    sd, report = adapt_state_dict(state_dict, model, **kw)
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise AdaptationError(f"unexpected keys after adaptation: {result.unexpected_keys}")
    return report
