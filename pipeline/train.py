"""The one training loop, for pretraining and fine-tuning alike; runs once per rank.

A rank: joins the process group, builds data/model/engine, resumes from the latest complete
checkpoint of its run directory (model, optimizer, data position, RNG, MLflow run), trains for
``epochs x steps_per_epoch`` optimizer steps with the same number of steps on every rank, evaluates
and checkpoints every N steps and at the end, and stops cleanly (checkpoint first) when asked to by a
signal (Ctrl-C, SIGTERM, Slurm's pre-timeout USR2).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import Config, flatten, to_dict
from .data import RankData, plan_data
from .engine import compute_dtype, create_engine, device, init_distributed
from .models import count_parameters, create_model, input_size
from .progress import Progress
from .tracking import Tracker, host_tags

log = logging.getLogger("pipeline")

SUMMARY_FILE = "summary.json"
EXIT_REQUEUE = 3  # the run stopped early on request, with a checkpoint to resume from


# ----------------------------------------------------------------------------------------------------
# Stop requests (signals) -> a checkpoint at the next step boundary, agreed by all ranks


class StopFlag:
    """Set by a signal handler; ranks agree on it with one tiny all-reduce per step."""

    def __init__(self):
        self.reason: Optional[str] = None

    def install(self, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)) -> None:
        for sig in signals:
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler, None):
                signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:  # a second Ctrl-C: really stop now
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def request(self, reason: str) -> None:
        self.reason = reason

    def agreed(self, dev: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.reason else 0.0], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


STOP = StopFlag()


# ----------------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """Where training is: optimizer steps done, and the plan's fixed numbers."""

    step: int
    total_steps: int
    steps_per_epoch: int
    accum: int
    history: list = field(default_factory=list)  # (step, loss) at log steps, for summary.json

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch


def _criteria(config: Config, num_classes: int):
    """timm's losses and Mixup/CutMix, as the augment section asks."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    a = config.augment
    mixup = None
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                      label_smoothing=a.label_smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if a.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(a.label_smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def _all_sum(values: list[float], dev: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, data: RankData, dev: torch.device, dtype: torch.dtype, img_size: int,
             num_classes: int) -> dict[str, float]:
    """Top-1/top-5 over this rank's val shards, summed over ranks. Ranks may hold different numbers
    of val batches; they agree per batch whether anyone still has one, and a rank without one runs a
    dummy forward so ZeRO-3's parameter gathers stay matched."""
    engine.eval()
    loader = data.val_batches()
    batches = iter(loader) if loader is not None else iter(())
    k5 = min(5, num_classes)
    correct1 = correct5 = count = skipped = 0
    while True:
        batch = next(batches, None)
        flag = torch.tensor([0.0 if batch is None else 1.0], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            break
        if batch is None or batch[0].numel() == 0:
            if batch is not None:
                skipped += batch[2]
            engine(torch.zeros(1, 3, img_size, img_size, device=dev, dtype=dtype))
            continue
        images, labels, dropped, _ = batch
        skipped += dropped
        logits = engine(images.to(dev, dtype)).float()
        top = logits.topk(k5, dim=1).indices.cpu()
        hits = top == labels.view(-1, 1)
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.numel()
    del batches, loader
    engine.train()
    c1, c5, n, s = _all_sum([correct1, correct5, count, skipped], dev)
    if n == 0:
        return {}
    return {"val_top1": 100.0 * c1 / n, f"val_top{k5}": 100.0 * c5 / n, "val_samples": n, "val_skipped": s}


def _save(engine, run_dir: Path, loop: Loop, env, config: Config, tracker: Tracker, progress: Progress,
          reason: str) -> None:
    client_state = {"step": loop.step, "epoch": loop.epoch, "step_in_epoch": loop.step % loop.steps_per_epoch,
                    "steps_per_epoch": loop.steps_per_epoch, "world_size": env.world_size, "reason": reason,
                    "history": loop.history}
    result = ckpt.save(engine, run_dir / "checkpoints", loop.step, client_state, rank=env.rank,
                       keep_last=config.checkpoint.keep_last)
    if env.rank == 0:
        progress.write(f"checkpoint {result.tag} saved ({reason}) in {result.seconds:.1f}s, "
                       f"{result.bytes / 2**20:.1f} MiB")
        tracker.log_metrics({"checkpoint_seconds": result.seconds, "checkpoint_mib": result.bytes / 2**20},
                            loop.step)


def train(config: Config, run_dir: Path) -> int:
    """One rank's whole job. Returns 0 when the run is complete, EXIT_REQUEUE when stopped early."""
    env = init_distributed(config)
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{env.rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    STOP.install()
    dev = device()
    dtype = compute_dtype(config)
    seed_everything(config.run.seed + env.rank)  # timm's Mixup draws from numpy, drop-path from torch

    plan = plan_data(config, env.world_size)
    num_classes = config.model.num_classes or len(plan.classes or [])
    model = create_model(config.model, num_classes)
    if config.run.stage == "finetune":
        from .finetune import load_pretrained  # the adaptation step (position embeddings etc.)

        load_pretrained(model, config, run_dir, is_main=env.rank == 0)
    img_size = input_size(model)
    total_steps = max(1, round(config.optim.epochs * plan.steps_per_epoch))
    warmup_steps = round(config.optim.warmup_epochs * plan.steps_per_epoch)
    engine, _, schedule = create_engine(model, config, env.world_size, total_steps, warmup_steps)
    data = RankData(config, plan, env.rank, env.world_size, img_size, pin_memory=dev.type == "cuda")
    criterion, mixup = _criteria(config, num_classes)
    loop = Loop(0, total_steps, plan.steps_per_epoch, config.optim.grad_accum_steps)

    tag = ckpt.latest_complete(run_dir / "checkpoints")
    resumed_from = None
    if tag is not None:
        state = ckpt.load(engine, run_dir / "checkpoints", tag, rank=env.rank)
        if state.get("steps_per_epoch") not in (None, plan.steps_per_epoch):
            raise RuntimeError(f"checkpoint {tag} was made with {state['steps_per_epoch']} steps per epoch, "
                               f"this run has {plan.steps_per_epoch}: data or batch size changed")
        loop.step, loop.history, resumed_from = int(state["step"]), list(state.get("history", [])), tag

    hosts = [None] * env.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    tracker = Tracker(config, run_dir, enabled=env.rank == 0)
    if env.rank == 0:
        if resumed_from is None:
            tracker.log_params(flatten(to_dict(config)))
            tracker.log_artifact(run_dir / "config.yaml")
        restarts = _bump_restarts(run_dir) if resumed_from else 0
        tracker.set_tags({**host_tags(env.world_size, hosts), "restarts": restarts,
                          "parameters": count_parameters(model), "steps_total": total_steps})
        log.info("%s %s: %s params, %d ranks on %s, %d steps (%d/epoch, global batch %d, micro %d), %s",
                 config.run.stage, config.model.name, f"{count_parameters(model):,}", env.world_size,
                 ",".join(sorted(set(hosts))), total_steps, plan.steps_per_epoch, config.data.batch_size,
                 config.micro_batch_size(env.world_size), f"resumed from {resumed_from}" if resumed_from else "fresh")

    progress = Progress(total_steps, loop.step, enabled=env.rank == 0)
    engine.train()
    window_loss = torch.zeros((), dtype=torch.float64, device=dev)
    window_steps = window_skipped = 0
    window_start, window_wait = time.perf_counter(), 0.0
    last_error = ""
    stopped = None

    while loop.step < total_steps:
        epoch = loop.epoch
        skip = (loop.step % plan.steps_per_epoch) * loop.accum
        batches = iter(data.train_batches(epoch, skip_batches=skip))
        while loop.step < total_steps and loop.epoch == epoch:
            schedule.step_update(loop.step)
            for _ in range(loop.accum):
                wait_start = time.perf_counter()
                images, labels, dropped, error = next(batches)
                window_wait += time.perf_counter() - wait_start
                window_skipped += dropped
                last_error = error or last_error
                images = images.to(dev, non_blocking=True)
                labels = labels.to(dev, non_blocking=True)
                if mixup is not None:
                    images, labels = mixup(images, labels)
                loss = criterion(engine(images.to(dtype)).float(), labels)
                engine.backward(loss)
                engine.step()
                window_loss += loss.detach() / loop.accum
            loop.step += 1
            window_steps += 1

            if loop.step % config.tracking.log_every_steps == 0 or loop.step == total_steps:
                loss_sum, skipped_sum = _all_sum([window_loss.item(), window_skipped], dev)
                elapsed = time.perf_counter() - window_start
                metrics = {"train_loss": loss_sum / env.world_size / window_steps,
                           "lr": schedule.optimizer.param_groups[0]["lr"] / schedule.optimizer.param_groups[0].get("lr_scale", 1.0),
                           "grad_norm": _float(engine.get_global_grad_norm()),
                           "images_per_s": window_steps * config.data.batch_size / elapsed,
                           "data_wait_fraction": window_wait / elapsed,
                           "epoch": loop.step / plan.steps_per_epoch, "skipped_samples": skipped_sum}
                if env.rank == 0:
                    loop.history.append((loop.step, metrics["train_loss"]))
                    tracker.log_metrics(metrics, loop.step)
                    progress.update(loop.step, metrics)
                    if skipped_sum:
                        progress.write(f"skipped {int(skipped_sum)} undecodable sample(s) in the last "
                                       f"{window_steps} steps; last: {last_error}")
                window_loss.zero_()
                window_steps = window_skipped = 0
                window_start, window_wait = time.perf_counter(), 0.0

            if config.eval.every_steps and loop.step % config.eval.every_steps == 0 and loop.step < total_steps:
                _log_eval(evaluate(engine, data, dev, dtype, img_size, num_classes), loop, tracker, progress, env)
            if config.run.stop_at_step and loop.step >= config.run.stop_at_step and loop.step < total_steps:
                STOP.request(f"run.stop_at_step={config.run.stop_at_step}")
            if STOP.agreed(dev):
                stopped = STOP.reason or "stop requested on another rank"
                break
            if config.checkpoint.every_steps and loop.step % config.checkpoint.every_steps == 0 \
                    and loop.step < total_steps:
                _save(engine, run_dir, loop, env, config, tracker, progress, "interval")
        del batches
        if stopped:
            break

    if stopped:
        _save(engine, run_dir, loop, env, config, tracker, progress, f"stop: {stopped}")
        progress.close()
        if env.rank == 0:
            log.info("stopped at step %d/%d (%s); the run resumes from here when started again",
                     loop.step, total_steps, stopped)
        dist.barrier()
        return EXIT_REQUEUE

    final = evaluate(engine, data, dev, dtype, img_size, num_classes)
    _log_eval(final, loop, tracker, progress, env)
    if ckpt.latest_complete(run_dir / "checkpoints") != ckpt.tag_for(loop.step):
        _save(engine, run_dir, loop, env, config, tracker, progress, "end")
    progress.close()
    if env.rank == 0:
        summary = {"step": loop.step, "epochs": config.optim.epochs, "world_size": env.world_size,
                   "final": final, "loss_history": loop.history,
                   "checkpoint": str(run_dir / "checkpoints" / ckpt.tag_for(loop.step))}
        ckpt.atomic_write(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        tracker.log_artifact(run_dir / SUMMARY_FILE)
        tracker.finish("FINISHED")
        log.info("done: step %d, %s", loop.step, ", ".join(f"{k} {v:.2f}" for k, v in final.items()))
    dist.barrier()
    return 0


def _log_eval(result: dict, loop: Loop, tracker: Tracker, progress: Progress, env) -> None:
    if env.rank == 0 and result:
        tracker.log_metrics(result, loop.step)
        progress.write(f"eval at step {loop.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _float(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _bump_restarts(run_dir: Path) -> int:
    path = run_dir / "restarts"
    count = int(path.read_text()) + 1 if path.exists() else 1
    ckpt.atomic_write(path, str(count))
    return count


def run_worker(run_dir: str | Path) -> int:
    """Entry point of one rank, started by a launcher with RANK/WORLD_SIZE/MASTER_* set."""
    from .config import from_yaml_file

    run_dir = Path(run_dir)
    config = from_yaml_file(run_dir / "config.yaml")
    try:
        return train(config, run_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1]))
