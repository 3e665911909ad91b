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
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pipeline.train import checkpoint as ckpt
from pipeline.config import Config, flatten, to_dict
from pipeline.data.stream import DeviceNormalize, RankData, plan_data
from pipeline.train.ema import create_ema, ema_state, load_ema_state
from pipeline.train.engine import compute_dtype, create_engine, device, init_distributed
from pipeline.model.factory import count_parameters, create_model, input_size
from pipeline.tracking.progress import Progress
from pipeline.tracking.telemetry import StepTelemetry
from pipeline.tracking.tracker import Tracker, host_tags

log = logging.getLogger("pipeline")

SUMMARY_FILE = "summary.json"
EXIT_REQUEUE = 3  # the run stopped early on request, with a checkpoint to resume from


# ----------------------------------------------------------------------------------------------------
# Stop requests (signals) -> a checkpoint at the next step boundary, agreed by all ranks


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class StopFlag:
    """Set by a signal handler; ranks agree on it with one tiny all-reduce per step.

    A Python handler a launcher installed before (the Slurm task's) is chained, not replaced: it is
    called after the flag is set, and also for a signal only another rank received (forwarded by the
    agreement), so that the launcher knows why the run stopped (USR2: requeue it)."""

    def __init__(self):
        self.reason: Optional[str] = None
        self._group = None
        self.signals: set[int] = set()
        self._chained: dict[int, object] = {}

    def install(self, signals=STOP_SIGNALS) -> None:
        for sig in signals:
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, signal.default_int_handler, None):
                signal.signal(sig, self._handle)
            elif callable(current) and current != self._handle:
                self._chained[sig] = current
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:  # a second Ctrl-C: really stop now
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        self.signals.add(signum)
        if signum in self._chained:
            self._chained[signum](signum, frame)

    def request(self, reason: str) -> None:
        self.reason = reason

    def agreed(self) -> bool:
        """Collective. On a CPU gloo group, so on GPUs the check costs no device sync in the hot loop."""
        if self._group is None:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flags = torch.tensor([1 if self.reason else 0] + [int(s in self.signals) for s in STOP_SIGNALS],
                             dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        for sig, seen in zip(STOP_SIGNALS, flags[1:].tolist()):
            if seen and sig not in self.signals:  # another rank got it: tell this rank's launcher too
                self.signals.add(sig)
                self.reason = self.reason or f"{signal.Signals(sig).name} on another rank"
                if sig in self._chained:
                    self._chained[sig](sig, None)
        return bool(flags[0].item())


STOP = StopFlag()


@dataclass
class Fault:
    """TEST HOOK, off unless VITPIPE_FAULT is set: "rank=R,step=S[,action=raise|exit|hang]" makes rank R,
    on reaching step S by training, raise an error (default), die without a traceback (exit, like a
    crash or an OOM kill), or hold until a stop signal arrives (hang: a step that outlasts a time limit).
    The tests use it to check how failures and signals are handled on a real cluster."""

    rank: int
    step: int
    action: str = "raise"

    @classmethod
    def from_environ(cls, rank: int) -> Optional["Fault"]:
        spec = os.environ.get("VITPIPE_FAULT", "").strip()
        if not spec:
            return None
        try:
            fields = dict(item.split("=", 1) for item in spec.split(","))
            fault = cls(int(fields.pop("rank")), int(fields.pop("step")), fields.pop("action", "raise"))
            if fields or fault.action not in ("raise", "exit", "hang"):
                raise ValueError
        except (KeyError, ValueError):
            raise ValueError(f"VITPIPE_FAULT={spec!r}: expected 'rank=R,step=S[,action=raise|exit|hang]' "
                             "(a test hook; unset it for real runs)") from None
        return fault if fault.rank == rank else None

    def trigger(self) -> None:
        log.warning("VITPIPE_FAULT: rank %d at step %d: %s (test hook)", self.rank, self.step, self.action)
        if self.action == "exit":
            os._exit(17)
        if self.action == "hang":
            while STOP.reason is None:  # a signal handler sets it
                time.sleep(0.1)
            return
        raise RuntimeError(f"VITPIPE_FAULT: injected failure on rank {self.rank} at step {self.step}")


# ----------------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """Where training is: optimizer steps done, and the plan's fixed numbers."""

    step: int
    total_steps: int
    steps_per_epoch: int
    accum: int
    history: list = field(default_factory=list)  # (step, loss) at log steps, for summary.json
    ema: Optional[object] = None  # timm ModelEmaV3 when optim.ema_decay is set (pipeline/ema.py)

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
def evaluate(engine, data: RankData, normalize: DeviceNormalize, dev: torch.device, dtype: torch.dtype,
             img_size: int, num_classes: int) -> dict[str, float]:
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
        logits = engine(normalize(images.to(dev), training=False).to(dtype)).float()
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


def evaluate_with_ema(engine, ema, data: RankData, normalize: DeviceNormalize, dev: torch.device,
                      dtype: torch.dtype, img_size: int, num_classes: int) -> dict[str, float]:
    """evaluate() of the model and, when optim.ema_decay is set, of its EMA weights (fp32) as val_top*_ema."""
    result = evaluate(engine, data, normalize, dev, dtype, img_size, num_classes)
    if ema is not None:
        ema_result = evaluate(ema.module, data, normalize, dev, torch.float32, img_size, num_classes)
        result.update({f"{k}_ema": v for k, v in ema_result.items() if k.startswith("val_top")})
    return result


def _save(engine, run_dir: Path, loop: Loop, env, config: Config, tracker: Tracker, progress: Progress,
          reason: str) -> None:
    client_state = {"step": loop.step, "epoch": loop.epoch, "step_in_epoch": loop.step % loop.steps_per_epoch,
                    "steps_per_epoch": loop.steps_per_epoch, "world_size": env.world_size, "reason": reason,
                    "history": loop.history}
    if loop.ema is not None:
        client_state["ema"] = ema_state(loop.ema)
    result = ckpt.save(engine, run_dir / "checkpoints", loop.step, client_state, rank=env.rank,
                       keep_last=config.checkpoint.keep_last)
    if env.rank == 0:
        progress.write(f"checkpoint {result.tag} saved ({reason}) in {result.seconds:.1f}s, "
                       f"{result.bytes / 2**20:.1f} MiB")
        tracker.log_metrics({"checkpoint_seconds": result.seconds, "checkpoint_mib": result.bytes / 2**20},
                            loop.step)
        tracker.set_tags({"checkpoint.last_path": result.path, "checkpoint.last_step": loop.step,
                          "checkpoint.last_reason": reason})


def train(config: Config, run_dir: Path) -> int:
    """One rank's whole job. Returns 0 when the run is complete, EXIT_REQUEUE when stopped early."""
    env = init_distributed(config)
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{env.rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    STOP.install()
    fault = Fault.from_environ(env.rank)
    dev = device()
    dtype = compute_dtype(config)
    seed_everything(config.run.seed + env.rank)  # timm's Mixup draws from numpy, drop-path from torch

    plan = plan_data(config, env.world_size)
    num_classes = config.model.num_classes or len(plan.classes or [])
    model = create_model(config.model, num_classes)
    if config.run.stage == "finetune":
        from pipeline.finetune.pretrained import load_pretrained  # the adaptation step (position embeddings etc.)

        load_pretrained(model, config, run_dir, is_main=env.rank == 0)
    ema = create_ema(model, config, dev)
    img_size = input_size(model)
    telemetry = StepTelemetry(config, env.rank, env.local_rank, env.world_size, model, img_size, dev)  # FLOPs, peaks
    total_steps = max(1, round(config.optim.epochs * plan.steps_per_epoch))
    warmup_steps = round(config.optim.warmup_epochs * plan.steps_per_epoch)
    engine, _, schedule = create_engine(model, config, env.world_size, total_steps, warmup_steps)
    data = RankData(config, plan, env.rank, env.world_size, img_size, pin_memory=dev.type == "cuda")
    criterion, mixup = _criteria(config, num_classes)
    normalize = DeviceNormalize(config, dev)
    loop = Loop(0, total_steps, plan.steps_per_epoch, config.optim.grad_accum_steps, ema=ema)

    tag = ckpt.latest_complete(run_dir / "checkpoints")
    resumed_from = None
    if tag is not None:
        state = ckpt.load(engine, run_dir / "checkpoints", tag, rank=env.rank)
        if state.get("steps_per_epoch") not in (None, plan.steps_per_epoch):
            raise RuntimeError(f"checkpoint {tag} was made with {state['steps_per_epoch']} steps per epoch, "
                               f"this run has {plan.steps_per_epoch}: data or batch size changed")
        loop.step, loop.history, resumed_from = int(state["step"]), list(state.get("history", [])), tag
        load_ema_state(loop.ema, state.get("ema"))

    hosts = [None] * env.world_size
    dist.all_gather_object(hosts, os.environ.get("SLURMD_NODENAME") or socket.gethostname())  # Slurm's node name
    tracker = Tracker(config, run_dir, enabled=env.rank == 0, img_size=img_size)
    if env.rank == 0:
        if resumed_from is None:
            tracker.log_params(flatten(to_dict(config)))
            tracker.log_artifact(run_dir / "config.yaml")
            if config.run.stage == "finetune":
                from pipeline.finetune.pretrained import log_lineage

                log_lineage(tracker, run_dir)
        restarts = _bump_restarts(run_dir) if resumed_from else 0
        tracker.set_tags({**host_tags(env.world_size, hosts), "restarts": restarts,
                          "parameters": count_parameters(model), "steps_total": total_steps, **telemetry.tags()})
        tracker.log_metrics({"restarts": restarts}, loop.step)
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

    skip = (loop.step % plan.steps_per_epoch) * loop.accum
    batches = iter(data.train_batches(loop.epoch, skip_batches=skip))  # runs on through the epochs
    while loop.step < total_steps:
        schedule.step_update(loop.step)
        for _ in range(loop.accum):
            wait_start = time.perf_counter()
            images, labels, dropped, error = next(batches)
            window_wait += time.perf_counter() - wait_start
            window_skipped += dropped
            last_error = error or last_error
            images = normalize(images.to(dev, non_blocking=True), training=True)
            labels = labels.to(dev, non_blocking=True)
            if mixup is not None:
                images, labels = mixup(images, labels)
            loss = criterion(engine(images.to(dtype)).float(), labels)
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach() / loop.accum
        loop.step += 1
        window_steps += 1
        if loop.ema is not None:
            loop.ema.update(engine.module, step=loop.step)

        if loop.step % config.tracking.log_every_steps == 0 or loop.step == total_steps:
            loss_sum, skipped_sum = _all_sum([window_loss.item(), window_skipped], dev)
            elapsed = time.perf_counter() - window_start
            metrics = {"train_loss": loss_sum / env.world_size / window_steps,
                       "lr": schedule.optimizer.param_groups[0]["lr"] / schedule.optimizer.param_groups[0].get("lr_scale", 1.0),
                       "grad_norm": _float(engine.get_global_grad_norm()),
                       "images_per_s": window_steps * config.data.batch_size / elapsed,
                       "data_wait_fraction": window_wait / elapsed,
                       "epoch": loop.step / plan.steps_per_epoch, "skipped_samples": skipped_sum}
            metrics.update(telemetry.at_log_step(  # collective: per-GPU rates, MFU, each node's system load
                metrics["images_per_s"], window_steps * config.data.batch_size / env.world_size / elapsed,
                window_wait / elapsed))
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
            _log_eval(evaluate_with_ema(engine, loop.ema, data, normalize, dev, dtype, img_size, num_classes), loop, tracker, progress, env)
        if fault is not None and loop.step == fault.step:
            fault.trigger()
        if config.run.stop_at_step and loop.step >= config.run.stop_at_step and loop.step < total_steps:
            STOP.request(f"run.stop_at_step={config.run.stop_at_step}")
        if STOP.agreed():
            stopped = STOP.reason or "stop requested on another rank"
            break
        if config.checkpoint.every_steps and loop.step % config.checkpoint.every_steps == 0 \
                and loop.step < total_steps:
            _save(engine, run_dir, loop, env, config, tracker, progress, "interval")
    del batches

    if stopped:
        _save(engine, run_dir, loop, env, config, tracker, progress, f"stop: {stopped}")
        progress.close()
        if env.rank == 0:
            log.info("stopped at step %d/%d (%s); the run resumes from here when started again",
                     loop.step, total_steps, stopped)
        dist.barrier()
        tracker.close()  # bounded wait for the tracking backlog (rank 0), after the other ranks are done
        return EXIT_REQUEUE

    final = evaluate_with_ema(engine, loop.ema, data, normalize, dev, dtype, img_size, num_classes)
    _log_eval(final, loop, tracker, progress, env)
    if ckpt.latest_complete(run_dir / "checkpoints") != ckpt.tag_for(loop.step):
        _save(engine, run_dir, loop, env, config, tracker, progress, "end")
    progress.close()
    if env.rank == 0:
        if config.run.stage == "finetune":  # final weights + config as the run's model, registered in MLflow
            from pipeline.finetune.pretrained import export_model

            export_model(config, run_dir, ckpt.tag_for(loop.step), loop.ema, tracker, final)
        summary = {"step": loop.step, "epochs": config.optim.epochs, "world_size": env.world_size,
                   "final": final, "loss_history": loop.history,
                   "checkpoint": str(run_dir / "checkpoints" / ckpt.tag_for(loop.step))}
        ckpt.atomic_write(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        tracker.log_artifact(run_dir / SUMMARY_FILE)
        tracker.finish("FINISHED")
        log.info("done: step %d, %s", loop.step, ", ".join(f"{k} {v:.2f}" for k, v in final.items()))
    dist.barrier()
    tracker.close()  # bounded wait for the tracking backlog (rank 0), after the other ranks are done
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
    from pipeline.config import from_yaml_file

    run_dir = Path(run_dir)
    config = from_yaml_file(run_dir / "config.yaml")
    try:
        return train(config, run_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1]))
