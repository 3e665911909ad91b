"""Tests for pipeline.adapt: resolution / window adaptation of checkpoints (CPU, tiny models)."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.model.adapt import (
    AdaptationError,
    AdaptationReport,
    adapt_state_dict,
    load_adapted,
    relative_position_index,
    resample_pos_embed,
    resize_rel_pos_bias_table,
)

VIT = dict(patch_size=4, embed_dim=48, depth=2, num_heads=3)
SWIN = dict(embed_dim=24, depths=(2, 2), num_heads=(1, 2))


def vit(img_size=32, **kw):
    torch.manual_seed(0)
    args = {**VIT, "num_classes": 10, **kw}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, **args).eval()


def swin(img_size=32, window_size=4, **kw):
    torch.manual_seed(0)
    args = {**SWIN, "num_classes": 10, **kw}
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, window_size=window_size, **args
    ).eval()


def randomized_sd(model):
    """State dict with random values, so 'kept' vs 'fresh init' is distinguishable."""
    g = torch.Generator().manual_seed(1)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
        for k, v in model.state_dict().items()
    }


def reference_resample(pe, old, new, prefix, antialias):
    grid = pe[:, prefix:].reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([pe[:, :prefix], out.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], dim=1)


# ---------------------------------------------------------------- pure functions


def test_identity_is_exact():
    pe = torch.randn(1, 1 + 8 * 8, 16)
    assert torch.equal(resample_pos_embed(pe, (8, 8)), pe)
    pe_ns = torch.randn(1, 2 + 6 * 10, 16, dtype=torch.bfloat16)
    assert torch.equal(resample_pos_embed(pe_ns, (6, 10), (6, 10), num_prefix_tokens=2), pe_ns)
    table = torch.randn(13 * 13, 3)
    assert torch.equal(resize_rel_pos_bias_table(table, (7, 7)), table)
    assert torch.equal(resize_rel_pos_bias_table(table, (7, 7), (7, 7), method="geometric"), table)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old,new", [((8, 8), (16, 16)), ((8, 12), (16, 24)), ((12, 12), (6, 6))])
def test_matches_direct_interpolate(old, new, antialias):
    torch.manual_seed(0)
    prefix = 2
    pe = torch.randn(1, prefix + old[0] * old[1], 8)
    out = resample_pos_embed(pe, new, old if old[0] != old[1] else None, num_prefix_tokens=prefix, antialias=antialias)
    assert out.shape == (1, prefix + new[0] * new[1], 8)
    torch.testing.assert_close(out, reference_resample(pe, old, new, prefix, antialias), rtol=0, atol=1e-6)
    assert torch.equal(out[:, :prefix], pe[:, :prefix])


def test_antialias_semantics():
    """antialias is not only about downsampling: torch's antialiased bicubic uses the a=-0.5
    (PIL) kernel, plain bicubic a=-0.75, so they differ when upsampling too (bilinear doesn't)."""
    pe = torch.randn(1, 1 + 64, 8)
    up = [resample_pos_embed(pe, (16, 16), antialias=a) for a in (False, True)]
    assert not torch.allclose(up[0], up[1], atol=1e-3)
    up_lin = [resample_pos_embed(pe, (16, 16), method="bilinear", antialias=a) for a in (False, True)]
    torch.testing.assert_close(up_lin[0], up_lin[1], rtol=0, atol=1e-6)
    down_lin = [resample_pos_embed(pe, (4, 4), method="bilinear", antialias=a) for a in (False, True)]
    assert not torch.allclose(down_lin[0], down_lin[1], atol=1e-3)


def test_dtype_preserved_and_computed_in_float32():
    pe = torch.randn(1, 1 + 64, 8).to(torch.bfloat16)
    out = resample_pos_embed(pe, (16, 16))
    assert out.dtype == torch.bfloat16
    ref = reference_resample(pe.float(), (8, 8), (16, 16), 1, False).to(torch.bfloat16)
    assert torch.equal(out, ref)
    table = torch.randn(49, 2).half()
    assert resize_rel_pos_bias_table(table, (8, 8)).dtype == torch.float16


def test_validation_errors():
    pe = torch.randn(1, 1 + 64, 8)
    with pytest.raises(ValueError, match="allowed: bicubic, bilinear"):
        resample_pos_embed(pe, (16, 16), method="cubic")
    with pytest.raises(ValueError, match="antialias"):
        resample_pos_embed(pe, (16, 16), method="nearest", antialias=True)
    with pytest.raises(ValueError, match="old_grid"):
        resample_pos_embed(torch.randn(1, 1 + 96, 8), (16, 24))
    with pytest.raises(ValueError, match="old_grid"):
        resample_pos_embed(pe, (16, 16), old_grid=(8, 9))
    with pytest.raises(ValueError, match="allowed"):
        resize_rel_pos_bias_table(torch.randn(49, 2), (8, 8), method="spline")
    with pytest.raises(ValueError, match="old_window"):
        resize_rel_pos_bias_table(torch.randn(50, 2), (8, 8))
    # nearest modes work (align_corners must not be passed to them)
    assert resample_pos_embed(pe, (16, 16), method="nearest").shape == (1, 257, 8)
    assert resize_rel_pos_bias_table(torch.randn(49, 2), (8, 8), method="nearest-exact").shape == (225, 2)


@pytest.mark.filterwarnings("ignore::UserWarning")  # from timm's geometric resize internals
def test_rel_pos_table_7_to_12():
    torch.manual_seed(0)
    table = torch.randn(13 * 13, 4)
    out = resize_rel_pos_bias_table(table, (12, 12))
    assert out.shape == (23 * 23, 4)
    ref = F.interpolate(table.T.reshape(1, 4, 13, 13), size=(23, 23), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, ref.reshape(4, -1).T, rtol=0, atol=1e-6)
    # timm's BEiT-style resize is available for parity with timm's Swin checkpoint_filter_fn
    geo = resize_rel_pos_bias_table(table, (12, 12), method="geometric")
    assert geo.shape == (529, 4)
    # geometric keeps the zero offset (centre row) exactly
    assert torch.allclose(geo[529 // 2], table[169 // 2])


def test_rel_pos_table_non_square_layout():
    # rows are (dh, dw) row-major: a table that depends only on dh must stay so after resize
    dh = torch.arange(-2, 3, dtype=torch.float32)  # window (3, 5): 5 x 9 offsets
    table = dh[:, None].expand(5, 9).reshape(45, 1)
    out = resize_rel_pos_bias_table(table, (6, 10), old_window=(3, 5))
    grid = out.reshape(11, 19)
    assert torch.allclose(grid, grid[:, :1].expand(11, 19), atol=1e-6)
    assert grid[0, 0] < grid[-1, 0]


def _field(h, w, fn):
    """fn sampled at pixel centres of an h x w grid covering the unit square -> (1, h*w, C)."""
    y = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return fn(yy, xx).float().reshape(1, h * w, -1)


def test_smooth_function_geometry():
    """Pixel-centre (align_corners=False) geometry: a field sampled on the old grid, resampled,
    ~equals the same field sampled at the new grid's pixel centres."""
    old, new = (8, 12), (16, 24)

    # linear field: bilinear and the a=-0.5 cubic (antialias path) reproduce it exactly away from
    # the clamped border, which only holds if old/new sample positions are where we think they
    # are; plain bicubic (a=-0.75) has a small symmetric ripple but no systematic shift
    def lin(yy, xx):
        return torch.stack([3 * yy - 1, 2 * xx + yy], dim=-1)

    pe = torch.cat([torch.full((1, 1, 2), 7.0), _field(*old, lin)], dim=1)
    inner = (slice(3, 13), slice(3, 21))  # new pixels whose 4x4 cubic support avoids the border clamp
    want = _field(*new, lin).reshape(*new, 2)[inner]
    for kw in (dict(method="bilinear"), dict(method="bicubic", antialias=True)):
        out = resample_pos_embed(pe, new, old, **kw)
        assert torch.equal(out[:, :1], pe[:, :1])
        torch.testing.assert_close(out[:, 1:].reshape(*new, 2)[inner], want, rtol=0, atol=1e-5)
    diff = resample_pos_embed(pe, new, old)[:, 1:].reshape(*new, 2)[inner] - want
    assert diff.abs().max() < 0.02 and diff.mean(dim=(0, 1)).abs().max() < 1e-5

    # smooth non-linear field: small error everywhere (incl. border) ...
    def smooth(yy, xx):
        return torch.stack([torch.sin(2.0 * yy + 1.0 * xx), torch.cos(1.5 * xx - 0.5 * yy)], dim=-1)

    out = resample_pos_embed(torch.cat([pe[:, :1], _field(*old, smooth)], dim=1), new, old)
    err = (out[:, 1:] - _field(*new, smooth)).abs().max().item()
    assert err < 0.06, err
    # ... and clearly smaller than with the align_corners=True (corner-aligned) convention
    grid = _field(*old, smooth).reshape(1, *old, 2).permute(0, 3, 1, 2)
    wrong = F.interpolate(grid, size=new, mode="bicubic", align_corners=True).permute(0, 2, 3, 1).reshape(1, -1, 2)
    assert (wrong - _field(*new, smooth)).abs().max().item() > 1.5 * err


def test_relative_position_index_matches_swin():
    idx = relative_position_index((4, 4))
    assert idx.shape == (16, 16) and idx.dtype == torch.long
    assert idx.min() == 0 and idx.max() == 7 * 7 - 1
    assert idx[0, 0] == (7 * 7) // 2  # zero offset is the centre of the table
    m = swin(64, 8)
    assert torch.equal(relative_position_index((8, 8)), m.layers[0].blocks[0].attn.relative_position_index)


# ---------------------------------------------------------------- ViT


def test_vit_8_to_16_grid_and_forward():
    src, dst = vit(32), vit(64)
    sd = randomized_sd(src)
    report = load_adapted(dst, sd)
    assert [a[0] for a in report.adapted] == ["pos_embed"]
    assert report.adapted[0][1:] == ((1, 65, 48), (1, 257, 48))
    assert not report.reinitialized and not report.dropped and not report.missing
    expected = reference_resample(sd["pos_embed"], (8, 8), (16, 16), 1, False)
    torch.testing.assert_close(dst.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert torch.equal(dst.head.weight, sd["head.weight"])  # 10 -> 10 classes: kept
    with torch.no_grad():
        assert dst(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_vit_non_square_grid():
    src, dst = vit((32, 48)), vit((64, 96))
    sd = randomized_sd(src)
    with pytest.raises(AdaptationError, match="not a square grid"):
        adapt_state_dict(sd, dst)
    out, report = adapt_state_dict(sd, dst, old_grid=(8, 12))
    assert out["pos_embed"].shape == (1, 1 + 16 * 24, 48)
    expected = reference_resample(sd["pos_embed"], (8, 12), (16, 24), 1, False)
    torch.testing.assert_close(out["pos_embed"], expected, rtol=0, atol=1e-6)
    dst.load_state_dict(out, strict=True)
    with torch.no_grad():
        assert dst(torch.randn(2, 3, 64, 96)).shape == (2, 10)


def test_vit_transposed_grid_needs_hint():
    # 8x12 -> 12x8 has the same token count: only the hint can reveal it, and then it is resampled
    sd = randomized_sd(vit((32, 48)))
    dst = vit((48, 32))
    out, report = adapt_state_dict(sd, dst)
    assert out["pos_embed"] is sd["pos_embed"] and not report.adapted
    out, report = adapt_state_dict(sd, dst, old_grid=(8, 12))
    assert [a[0] for a in report.adapted] == ["pos_embed"]
    assert not torch.equal(out["pos_embed"], sd["pos_embed"])


def test_vit_register_tokens_prefix_kept():
    src, dst = vit(32, reg_tokens=4), vit(64, reg_tokens=4)
    assert dst.num_prefix_tokens == 5
    sd = randomized_sd(src)
    load_adapted(dst, sd)
    assert dst.pos_embed.shape == (1, 5 + 256, 48)
    assert torch.equal(dst.pos_embed[:, :5], sd["pos_embed"][:, :5])
    assert torch.equal(dst.reg_token, sd["reg_token"])
    expected = reference_resample(sd["pos_embed"], (8, 8), (16, 16), 5, False)
    torch.testing.assert_close(dst.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert dst(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_vit_no_embed_class():
    src, dst = vit(32, reg_tokens=2, no_embed_class=True), vit(64, reg_tokens=2, no_embed_class=True)
    sd = randomized_sd(src)
    assert sd["pos_embed"].shape == (1, 64, 48)
    load_adapted(dst, sd)
    expected = reference_resample(sd["pos_embed"], (8, 8), (16, 16), 0, False)
    torch.testing.assert_close(dst.pos_embed.detach(), expected, rtol=0, atol=1e-6)


def test_head_reinitialized_when_num_classes_changes():
    sd = randomized_sd(vit(32, num_classes=10))
    dst = vit(64, num_classes=5)
    fresh = dst.head.weight.detach().clone()
    report = load_adapted(dst, sd)
    assert report.reinitialized == [("head.weight", (10, 48), (5, 48)), ("head.bias", (10,), (5,))]
    assert torch.equal(dst.head.weight, fresh)
    assert "head.weight" not in adapt_state_dict(sd, dst)[0]
    with pytest.raises(AdaptationError, match="head.weight"):
        adapt_state_dict(sd, dst, reinit_head=None)
    # "always" drops a same-shaped head too (new label set of equal size)
    out, rep = adapt_state_dict(sd, vit(32, num_classes=10), reinit_head="always")
    assert "head.weight" not in out and len(rep.reinitialized) == 2


def test_wrong_shape_elsewhere_raises_naming_every_key():
    dst = vit(64)
    sd = randomized_sd(vit(32))
    sd["blocks.0.mlp.fc1.weight"] = torch.randn(192, 40)
    sd["blocks.1.norm1.bias"] = torch.randn(40)
    with pytest.raises(AdaptationError) as ei:
        adapt_state_dict(sd, dst)
    msg = str(ei.value)
    assert "blocks.0.mlp.fc1.weight" in msg and "(192, 40)" in msg and "(192, 48)" in msg
    assert "blocks.1.norm1.bias" in msg


@pytest.mark.parametrize("make", [vit, swin], ids=["vit", "swin"])
def test_patch_size_doubled_with_resolution_embeds_the_upscaled_image_as_before(make):
    """FlexiViT resampling: patch 4 at 32 px -> patch 8 at 64 px keeps the token grid, and an image
    whose patches are each upscaled 2x (bicubic, the resize the kernel was resampled for) gives the pretrained
    model's features."""
    src = make(32)
    src.load_state_dict(randomized_sd(src))
    dst = make(64, patch_size=8)
    report = load_adapted(dst, src.state_dict())
    assert [k for k, *_ in report.adapted] == ["patch_embed.proj.weight"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = src.forward_features(x)
        after = dst.forward_features(_upscale_each_patch(x, 4))
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def _upscale_each_patch(x, p):
    """Each p x p patch resized to 2p x 2p on its own (bicubic, no antialias), the image reassembled."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)
    up = F.interpolate(patches, size=(2 * p, 2 * p), mode="bicubic", align_corners=False)
    up = up.reshape(b, h // p, w // p, c, 2 * p, 2 * p).permute(0, 3, 1, 4, 2, 5)
    return up.reshape(b, c, 2 * h, 2 * w)


def test_patch_embedding_of_another_width_refused():
    sd = randomized_sd(vit(32))
    dst = vit(64, patch_size=8, embed_dim=24, num_heads=3)
    with pytest.raises(AdaptationError, match="only the patch size may change"):
        adapt_state_dict(sd, dst)


def test_dropped_missing_and_unwrapping():
    dst = vit(64)
    sd = randomized_sd(vit(32))
    sd["decoder.extra"] = torch.zeros(3)
    del sd["norm.weight"]
    wrapped = {"module": {f"module.{k}": v for k, v in sd.items()}, "global_steps": 10}
    out, report = adapt_state_dict(wrapped, dst)
    assert report.dropped == ["decoder.extra"]
    assert report.missing == ["norm.weight"]
    res = dst.load_state_dict(out, strict=False)
    assert res.missing_keys == ["norm.weight"] and not res.unexpected_keys


def test_report_dict_and_summary():
    sd = randomized_sd(vit(32, num_classes=10))
    sd["old.buffer"] = torch.zeros(1)
    _, report = adapt_state_dict(sd, vit(64, num_classes=5))
    assert isinstance(report, AdaptationReport)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["method"] == "bicubic" and d["antialias"] is False
    assert d["adapted"][0] == {"name": "pos_embed", "old_shape": [1, 65, 48], "new_shape": [1, 257, 48]}
    text = report.summary()
    assert "pos_embed: [1, 65, 48] -> [1, 257, 48]" in text
    assert "head.weight" in text and "old.buffer (not in model)" in text
    assert len(text.splitlines()) == 1 + 1 + 2 + 1


# ---------------------------------------------------------------- Swin


def test_swin_window_4_to_8_and_forward():
    src, dst = swin(32, 4), swin(64, 8)
    sd = randomized_sd(src)
    # old original-Swin checkpoints persisted these buffers; they must never be copied
    sd["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    report = load_adapted(dst, sd)
    tables = [k for k in sd if k.endswith("relative_position_bias_table")]
    assert len(tables) == 4
    assert sorted(a[0] for a in report.adapted) == sorted(tables)
    for _name, old, new in report.adapted:
        assert old == (49, new[1]) and new == (15 * 15, new[1])
    assert set(report.dropped) == {"layers.0.blocks.0.attn.relative_position_index", "layers.0.blocks.1.attn_mask"}
    assert "buffer rebuilt by model" in report.summary()
    attn = dst.layers[1].blocks[1].attn
    assert attn.relative_position_bias_table.shape == (225, 2)
    ref = (
        F.interpolate(
            sd["layers.1.blocks.1.attn.relative_position_bias_table"].T.reshape(1, 2, 7, 7),
            size=(15, 15),
            mode="bicubic",
            align_corners=False,
        )
        .reshape(2, -1)
        .T
    )
    torch.testing.assert_close(attn.relative_position_bias_table.detach(), ref, rtol=0, atol=1e-6)
    for blk in (b for layer in dst.layers for b in layer.blocks):
        assert torch.equal(blk.attn.relative_position_index, relative_position_index((8, 8)))
    assert dst.layers[0].blocks[1].attn_mask.shape[-1] == 64  # the model's own, for window 8
    assert torch.equal(dst.head.fc.weight, sd["head.fc.weight"])
    with torch.no_grad():
        assert dst(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.filterwarnings("ignore::UserWarning")  # from timm's geometric resize internals
def test_swin_head_fc_reinit_and_geometric():
    sd = randomized_sd(swin(32, 4, num_classes=10))
    dst = swin(64, 8, num_classes=5)
    out, report = adapt_state_dict(sd, dst, rel_pos_method="geometric")
    assert {r[0] for r in report.reinitialized} == {"head.fc.weight", "head.fc.bias"}
    assert out["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (225, 1)
    res = dst.load_state_dict(out, strict=False)
    assert sorted(res.missing_keys) == ["head.fc.bias", "head.fc.weight"] and not res.unexpected_keys


def test_swin_head_count_mismatch_raises():
    sd = randomized_sd(swin(32, 4))
    sd["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.randn(49, 3)
    with pytest.raises(AdaptationError, match=r"layers\.0\.blocks\.0\.attn\.relative_position_bias_table"):
        adapt_state_dict(sd, swin(64, 8))


def test_unknown_method_rejected_by_adapt():
    with pytest.raises(ValueError, match="allowed"):
        adapt_state_dict({}, vit(32), method="lanczos")
    with pytest.raises(ValueError, match="reinit_head"):
        adapt_state_dict({}, vit(32), reinit_head="yes")


def test_generic_module_nhwc_and_prefixless_pos_embed():
    """Non-timm-ViT layouts: NHWC (1, H, W, C) pos embed and a prefix-less (1, L, C) absolute one."""

    class Tiny(torch.nn.Module):
        def __init__(self, g):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, g, g, 8))
            self.absolute_pos_embed = torch.nn.Parameter(torch.zeros(1, g * g, 8))
            self.proj = torch.nn.Linear(8, 8)

    src = {k: torch.randn(v.shape) for k, v in Tiny(4).state_dict().items()}
    dst = Tiny(8)
    report = load_adapted(dst, src)
    assert {a[0] for a in report.adapted} == {"pos_embed", "absolute_pos_embed"}
    ref = F.interpolate(src["pos_embed"].permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(dst.pos_embed.detach(), ref.permute(0, 2, 3, 1), rtol=0, atol=1e-6)
    ref = reference_resample(src["absolute_pos_embed"], (4, 4), (8, 8), 0, False)
    torch.testing.assert_close(dst.absolute_pos_embed.detach(), ref, rtol=0, atol=1e-6)
    assert torch.equal(dst.proj.weight, src["proj.weight"])
