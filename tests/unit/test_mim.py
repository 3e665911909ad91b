"""Masked image modelling: masks, MAE and SimMIM around timm models, unlabelled shards. Tiny models, CPU."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import timm
import torch

from pipeline.data.manifest import read_manifest
from pipeline.data.shards_cli import main as shards_main
from pipeline.data.sources import write_digits, write_imagefolder
from pipeline.model.adapt import load_adapted
from pipeline.model.mae import MaskedAutoencoder, check_pretrain_encoder, encoder_state_dict, patchify, unpatchify
from pipeline.model.masking import block_mask, mask_generator, mask_to_pixels, random_masking
from pipeline.model.simmim import SimMIM

VIT = {
    "model_name": "vit_tiny_patch16_224",
    "img_size": 16,
    "patch_size": 4,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}
SWIN = {
    "model_name": "swin_tiny_patch4_window7_224",
    "img_size": 16,
    "patch_size": 2,
    "window_size": 4,
    "embed_dim": 16,
    "depths": (1, 1),
    "num_heads": (1, 2),
    "drop_path_rate": 0.0,
}


def _timm(spec: dict, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(**{**spec, "num_classes": 0, **kw})


def _mae(**kw) -> MaskedAutoencoder:
    kw = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, **kw}
    return MaskedAutoencoder(_timm(VIT), **kw)


def _images(b: int = 4, size: int = 16) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- masks


def test_random_masking_exact_ratio_different_per_sample():
    m = random_masking(8, 64, 0.75, mask_generator(0, 0))
    assert m.ids_keep.shape == (8, 16)
    assert torch.equal(m.mask.sum(1), torch.full((8,), 48.0))
    assert torch.all(m.mask.gather(1, m.ids_keep) == 0)  # kept = visible
    assert len({tuple(row.tolist()) for row in m.mask}) == 8  # every sample its own subset
    shuffle = torch.cat([m.ids_keep, torch.argsort(m.mask, dim=1, stable=True)[:, 16:]], dim=1)
    assert torch.equal(torch.sort(shuffle, 1).values, torch.arange(64).expand(8, -1))
    # ids_restore un-shuffles: [visible, masked] gathered by it gives the visibility in original order
    order = torch.cat([torch.zeros(8, 16), torch.ones(8, 48)], dim=1).gather(1, m.ids_restore)
    assert torch.equal(order, m.mask)


@pytest.mark.parametrize(
    "n, ratio, keep", [(64, 0.75, 16), (49, 0.75, 12), (30, 0.75, 8), (10, 0.0, 10), (196, 0.6, 78)]
)
def test_random_masking_keeps_round_of_visible(n, ratio, keep):
    assert random_masking(3, n, ratio, mask_generator(1, 2)).ids_keep.shape == (3, keep)


def test_masks_are_a_pure_function_of_seed_step_micro_rank():
    def draw(*key):
        return random_masking(4, 64, 0.75, mask_generator(*key)).mask

    assert torch.equal(draw(0, 5, 1, 2), draw(0, 5, 1, 2))
    variants = [draw(0, 5, 1, 2), draw(1, 5, 1, 2), draw(0, 6, 1, 2), draw(0, 5, 0, 2), draw(0, 5, 1, 3)]
    assert len({tuple(v.flatten().tolist()) for v in variants}) == len(variants)
    b1 = block_mask(4, 32, 4, 8, 0.5, mask_generator(3, 1))
    assert torch.equal(b1, block_mask(4, 32, 4, 8, 0.5, mask_generator(3, 1)))
    assert not torch.equal(b1, block_mask(4, 32, 4, 8, 0.5, mask_generator(3, 2)))


def test_masking_rejects_bad_ratios_and_sizes():
    with pytest.raises(ValueError):
        random_masking(2, 16, 1.0, mask_generator(0, 0))
    with pytest.raises(ValueError):
        random_masking(2, 4, 0.9, mask_generator(0, 0))  # round(0.4) = 0 visible
    with pytest.raises(ValueError, match="multiple of the model patch size"):
        block_mask(2, 32, 4, 6, 0.5, mask_generator(0, 0))
    with pytest.raises(ValueError, match="multiple of mask_patch_size"):
        block_mask(2, 36, 4, 8, 0.5, mask_generator(0, 0))


def test_block_mask_masks_whole_blocks_at_the_ratio():
    mask = block_mask(6, 192, 4, 32, 0.6, mask_generator(0, 0))  # SimMIM's ImageNet setting
    assert mask.shape == (6, 48, 48)
    blocks = mask.view(6, 6, 8, 6, 8)
    assert torch.all(blocks.amax(dim=(2, 4)) == blocks.amin(dim=(2, 4)))  # constant on each 8x8-patch block
    assert torch.equal(blocks[:, :, 0, :, 0].sum(dim=(1, 2)), torch.full((6,), 22.0))  # round(36 * 0.6)
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 6
    pixels = mask_to_pixels(mask, 4)
    assert pixels.shape == (6, 1, 192, 192) and pixels.mean() == pytest.approx(22 / 36)


# ---------------------------------------------------------------------------------------------- MAE


def test_mae_encoder_sees_only_visible_tokens():
    mae = _mae(mask_ratio=0.75)
    seen = []
    mae.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    loss, pred, mask = mae(_images(), mask_generator(0, 0))
    assert seen == [1 + 4]  # cls + round(16 * 0.25)
    assert pred.shape == (4, 16, 4 * 4 * 3) and mask.shape == (4, 16) and loss.ndim == 0


@pytest.mark.parametrize("variant", [{}, {"reg_tokens": 2, "no_embed_class": True}])
def test_mae_encoder_with_nothing_masked_is_timms_forward_features(variant):
    mae = MaskedAutoencoder(_timm(VIT, **variant), decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    x = _images()
    ids_keep = torch.arange(16).expand(4, -1)
    assert torch.allclose(mae.forward_encoder(x, ids_keep), mae.encoder.forward_features(x), atol=1e-6)
    seen = []
    mae.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    _, pred, _ = mae(x, mask_generator(0, 0))
    assert seen == [mae.num_prefix + 4] and pred.shape == (4, 16, 48)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_counts_masked_patches_only(norm_pix):
    mae = _mae(norm_pix_loss=norm_pix)
    x = _images()
    mask = random_masking(4, 16, 0.75, mask_generator(0, 0)).mask
    pred = torch.randn(4, 16, 48)
    base = mae.loss(x, pred, mask)
    b, visible = torch.nonzero(mask == 0)[0].tolist()
    masked = torch.nonzero(mask[b] == 1)[0].item()
    p2 = pred.clone()
    p2[b, visible] += 5.0
    assert mae.loss(x, p2, mask) == base
    x2 = x.clone()  # visible patch (row, col) of the 4x4 grid -> its pixels change, loss must not
    r, c = divmod(visible, 4)
    x2[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = torch.randn(3, 4, 4)
    assert mae.loss(x2, pred, mask) == base
    p3 = pred.clone()
    p3[b, masked] += 5.0
    assert mae.loss(x, p3, mask) != base
    x3 = x.clone()
    r, c = divmod(masked, 4)
    x3[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = torch.randn(3, 4, 4)
    assert mae.loss(x3, pred, mask) != base


def test_mae_loss_is_mean_mse_over_masked_patches():
    mae = _mae()
    x = _images()
    mask = random_masking(4, 16, 0.75, mask_generator(0, 0)).mask
    target = patchify(x, 4)
    pred = target + 2.0 * mask.unsqueeze(-1)  # exact on visible, off by 2 on masked patches
    assert mae.loss(x, pred, mask).item() == pytest.approx(4.0)


def test_norm_pix_loss_normalises_each_patch():
    x = _images()
    t = _mae(norm_pix_loss=True).targets(x)
    assert torch.allclose(t.mean(-1), torch.zeros(4, 16), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(4, 16), atol=1e-3)
    mask = random_masking(4, 16, 0.75, mask_generator(0, 0)).mask
    pred = torch.randn(4, 16, 48)
    # per-patch affine changes of the image (here: global) leave the normalised loss unchanged
    assert _mae(norm_pix_loss=True).loss(3 * x + 1, pred, mask).item() == pytest.approx(
        _mae(norm_pix_loss=True).loss(x, pred, mask).item(), rel=1e-4
    )
    assert _mae().loss(3 * x + 1, pred, mask) != _mae().loss(x, pred, mask)


@pytest.mark.parametrize("pos", ["sincos", "learned"])
def test_mae_gradients_reach_every_parameter(pos):
    mae = _mae(decoder_pos_embed=pos, norm_pix_loss=True)
    loss, _, _ = mae(_images(), mask_generator(0, 0))
    loss.backward()
    for name, p in mae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # no unused parameter for DDP / DeepSpeed


def test_mae_state_dict_layout_and_strict_encoder_load():
    mae = _mae(decoder_pos_embed="sincos")
    keys = mae.state_dict().keys()
    assert {k.split(".")[0] for k in keys if not k.startswith("encoder.")} == {
        "mask_token",
        "decoder_embed",
        "decoder_blocks",
        "decoder_norm",
        "decoder_pred",
    }  # sincos not saved
    assert "decoder_pos_embed" in _mae(decoder_pos_embed="learned").state_dict()
    plain = timm.create_model(**{**VIT, "num_classes": 0})
    plain.load_state_dict(mae.encoder.state_dict(), strict=True)
    x = _images()
    assert torch.equal(plain.eval()(x), mae.encoder.eval()(x))
    assert {"encoder.pos_embed", "encoder.cls_token", "mask_token"} <= mae.no_weight_decay()
    assert {id(p) for p in mae.external_parameters()} == {id(mae.encoder.pos_embed), id(mae.encoder.cls_token)}


def test_mae_encoder_adapts_to_the_finetune_model():
    mae = _mae()
    ft = timm.create_model(**{**VIT, "img_size": 32, "num_classes": 10})
    weights = encoder_state_dict(mae.state_dict())
    assert weights.keys() == mae.encoder.state_dict().keys()
    report = load_adapted(ft, weights)
    assert [a[0] for a in report.adapted] == ["pos_embed"]
    assert report.missing == ["head.weight", "head.bias"]
    assert torch.equal(ft.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)
    # the full MAE dict matches no key: load_adapted would keep the random init, hence encoder_state_dict
    assert "pos_embed" in load_adapted(timm.create_model(**{**VIT, "num_classes": 10}), mae.state_dict()).missing
    with pytest.raises(KeyError):
        encoder_state_dict(ft.state_dict())
    avg = timm.create_model(**{**VIT, "img_size": 32, "num_classes": 10, "global_pool": "avg"})
    report = load_adapted(avg, mae.encoder.state_dict())  # MAE's global-pool fine-tune: new fc_norm
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(report.dropped) == {"norm.weight", "norm.bias"}


def test_pretraining_refuses_parameters_without_gradients():
    with pytest.raises(ValueError, match="head"):
        check_pretrain_encoder(timm.create_model(**{**VIT, "num_classes": 10}))
    with pytest.raises(ValueError, match="fc_norm"):
        MaskedAutoencoder(_timm(VIT, global_pool="avg"))
    with pytest.raises(ValueError, match="head"):
        SimMIM(timm.create_model(**{**SWIN, "num_classes": 10}), mask_patch_size=4)


def test_mae_reconstruction_and_features():
    mae = _mae(norm_pix_loss=True)
    x = _images()
    assert torch.equal(unpatchify(patchify(x, 4), 4, (4, 4), 3), x)
    _, _, mask = mae(x, mask_generator(0, 0))
    perfect = mae.targets(x)  # a perfect normalised prediction reconstructs the image
    _, masked, recon = mae.reconstruct(x, perfect, mask)
    assert torch.allclose(recon, x, atol=1e-4)
    pixel_mask = mask_to_pixels(mask.view(4, 4, 4), 4)
    assert torch.all(masked[pixel_mask.expand_as(x) == 1] == 0)
    assert torch.equal(masked[pixel_mask.expand_as(x) == 0], x[pixel_mask.expand_as(x) == 0])
    cls, avg = mae.features(x, "token"), mae.features(x, "avg")
    assert cls.shape == avg.shape == (4, 32) and not torch.allclose(cls, avg)
    assert torch.equal(mae.features(x), cls)  # the encoder's own global_pool ("token")


def test_forward_needs_exactly_one_mask_source():
    mae, x = _mae(), _images()
    with pytest.raises(ValueError):
        mae(x)
    masking = mae.masking(4, mask_generator(0, 0))
    assert torch.equal(mae(x, masking=masking)[0], mae(x, mask_generator(0, 0))[0])


# ---------------------------------------------------------------------------------------------- SimMIM


@pytest.mark.parametrize("spec, mps", [(VIT, 8), (SWIN, 4)])
def test_simmim_loss_counts_masked_pixels_only(spec, mps):
    model = SimMIM(_timm(spec), mask_ratio=0.5, mask_patch_size=mps)
    x = _images()
    mask = model.masking(4, mask_generator(0, 0))
    pixels = mask_to_pixels(mask, model.patch_size).expand_as(x)
    pred = torch.randn_like(x)
    base = model.loss(x, pred, mask)
    p2 = pred.clone()
    p2[pixels == 0] += 3.0
    assert model.loss(x, p2, mask) == base
    p3 = pred.clone()
    p3[pixels == 1] += 3.0
    assert model.loss(x, p3, mask) != base
    assert model.loss(x, x + 0.5, mask).item() == pytest.approx(0.5, rel=1e-4)  # mean over masked pixels x C


@pytest.mark.parametrize("spec, mps", [(VIT, 8), (SWIN, 4)])
def test_simmim_encoder_is_timms_and_blind_to_masked_pixels(spec, mps):
    model = SimMIM(_timm(spec), mask_ratio=0.5, mask_patch_size=mps).eval()
    x = _images()
    ref = model.encoder.forward_features(x)
    out = model.forward_encoder(x, torch.zeros(4, 16 // model.patch_size, 16 // model.patch_size))
    ref = ref.permute(0, 3, 1, 2) if model.is_swin else ref[:, 1:].transpose(1, 2).reshape(out.shape)
    assert torch.allclose(out, ref, atol=1e-5)
    mask = model.masking(4, mask_generator(0, 0))
    pixels = mask_to_pixels(mask, model.patch_size).expand_as(x)
    noisy = torch.where(pixels == 1, torch.randn_like(x), x)  # new content under the mask only
    assert torch.allclose(model.forward_encoder(noisy, mask), model.forward_encoder(x, mask), atol=1e-5)
    assert not torch.allclose(model.forward_encoder(x, mask), out, atol=1e-3)  # the mask token does act


@pytest.mark.parametrize("spec, mps", [(VIT, 8), (SWIN, 4)])
def test_simmim_mask_token_replaces_the_patch_embedding(spec, mps):
    """ViT: before the position embedding (masked tokens keep their position); Swin: after patch_embed's norm."""
    model = SimMIM(_timm(spec), mask_patch_size=mps)
    first = model.encoder.layers[0] if model.is_swin else model.encoder.blocks[0]
    seen = []
    first.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    mask = model.masking(4, mask_generator(0, 0))
    model.forward_encoder(_images(), mask)
    tokens, token = seen[0], model.mask_token.detach().flatten()
    if model.is_swin:
        assert torch.equal(tokens[mask == 1], token.expand(int(mask.sum()), -1))
    else:
        expected = token + model.encoder.pos_embed.detach()[0, 1:]  # (N, C): mask token at each position
        masked = mask.flatten(1) == 1
        assert torch.allclose(tokens[:, 1:][masked], expected.expand(4, -1, -1)[masked], atol=1e-6)
    assert not torch.allclose(tokens[..., 0], tokens[..., 0].flatten()[0])  # not everything is the token


@pytest.mark.parametrize("spec, mps", [(VIT, 8), (SWIN, 4)])
def test_simmim_gradients_shapes_and_strict_encoder_load(spec, mps):
    model = SimMIM(_timm(spec), mask_patch_size=mps)
    loss, pred, mask = model(_images(), mask_generator(0, 0))
    assert pred.shape == (4, 3, 16, 16)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "mask_token", "decoder"}
    plain = timm.create_model(**{**spec, "num_classes": 0})
    plain.load_state_dict(model.encoder.state_dict(), strict=True)
    original, masked, recon = model.reconstruct(_images(), pred, mask)
    assert torch.equal(recon[masked != 0], original[masked != 0])
    assert model.features(_images()).shape == (4, model.encoder.num_features)


def test_simmim_swin_stride_and_finetune_adaptation():
    model = SimMIM(_timm(SWIN), mask_patch_size=4)
    assert model.stride == 4  # patch 2 x one patch merging
    assert model.external_parameters() == []  # Swin: every encoder parameter lives in a submodule that runs
    assert len(SimMIM(_timm(VIT), mask_patch_size=8).external_parameters()) == 2
    ft = timm.create_model(**{**SWIN, "img_size": 32, "num_classes": 10})
    report = load_adapted(ft, model.encoder.state_dict())
    assert set(report.missing) == {"head.fc.weight", "head.fc.bias"}


# ---------------------------------------------------------------------------------------------- shards


def _members(path: Path) -> set[str]:
    with tarfile.open(path) as tf:
        return {m.name.split(".", 1)[1] for m in tf.getmembers()}


def test_unlabeled_digits_have_the_same_splits_and_no_labels(tmp_path: Path):
    m = read_manifest(write_digits(tmp_path / "u", unlabeled=True, samples_per_shard=500))
    assert m["labeled"] is False and "classes" not in m and "num_classes" not in m
    assert m["splits"]["train"]["num_samples"] == 1497 and m["splits"]["val"]["num_samples"] == 300
    assert _members(tmp_path / "u" / m["splits"]["train"]["shards"][0]) == {"png", "json"}
    labeled = read_manifest(write_digits(tmp_path / "l", samples_per_shard=500))
    assert labeled["labeled"] is True and labeled["num_classes"] == 10
    for split in ("train", "val"):
        for a, b in zip(m["splits"][split]["shards"], labeled["splits"][split]["shards"]):
            with tarfile.open(tmp_path / "u" / a) as ua, tarfile.open(tmp_path / "l" / b) as la:
                assert [n for n in ua.getnames() if n.endswith(".png")] == [
                    n for n in la.getnames() if n.endswith(".png")
                ]


def test_flat_image_folder_is_unlabeled(tmp_path: Path, capsys):
    from PIL import Image

    src = tmp_path / "flat"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(src / f"img{i}.png")
    m = read_manifest(write_imagefolder(src, tmp_path / "o", val_fraction=0.2, image_format="png"))
    assert m["labeled"] is False and "classes" not in m and m["settings"]["labeled"] is False
    assert m["splits"]["train"]["num_samples"] == 4 and m["splits"]["val"]["num_samples"] == 1
    assert _members(tmp_path / "o" / m["splits"]["train"]["shards"][0]) == {"png", "json"}
    with tarfile.open(tmp_path / "o" / m["splits"]["train"]["shards"][0]) as tf:
        meta = json.loads(tf.extractfile(next(n for n in tf.getnames() if n.endswith(".json"))).read())
    assert "class_name" not in meta
    (src / "cls_a").mkdir()  # a class folder makes it labelled: --unlabeled then conflicts
    Image.new("RGB", (8, 8)).save(src / "cls_a" / "x.png")
    assert shards_main(["--source", str(src), "--out", str(tmp_path / "o2"), "--unlabeled"]) == 2
    assert "class subdirectories" in capsys.readouterr().err
