"""The bare reference for the digits demo's speed (docs/performance.md, "The demo's own overhead"): the demo's
model and batch (configs/pretrain/digits_vit.yaml) trained on one batch held in memory, no loader, no DeepSpeed,
no tracking. ``python -m benchmarks.bare_demo [THREADS]``; prints images/s per round."""

from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> int:
    import timm
    import torch

    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(int(argv[0]) if argv else torch.get_num_threads())
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    images, labels = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(5):
        step()
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(30):
            step()
        rates.append(30 * 128 / (time.perf_counter() - start))
    print(f"bare digits loop, {torch.get_num_threads()} threads: images/s per round {[round(r) for r in rates]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
