"""The one training loop, for every stage and objective; one ``Trainer`` per rank.

A rank builds data, model (through the objective) and DeepSpeed engine, resumes from the latest complete
checkpoint of its run folder (model, optimizer, data position, RNG, MLflow run), trains for ``epochs x
steps_per_epoch`` optimizer steps with the same number of steps on every rank, evaluates and checkpoints every N
steps and at the end, and stops cleanly (checkpoint first) when a signal asks it to (Ctrl-C, SIGTERM, Slurm's
pre-timeout USR2). What differs between objectives is in ``pipeline/train/objectives``; what differs between
stages comes in through ``StageHooks``; tracking is a component the loop writes to, never waits for.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from pipeline.config import Config, flatten, to_dict
from pipeline.data.loader import RankData
from pipeline.data.plan import plan_data
from pipeline.data.transforms import DeviceNormalize
from pipeline.files import atomic_write
from pipeline.model.factory import count_parameters, create_model, input_size
from pipeline.rundir import EXIT_RESUMABLE, RunDir
from pipeline.tracking.progress import Progress
from pipeline.tracking.telemetry import StepTelemetry
from pipeline.tracking.tracker import Tracker, host_tags
from pipeline.train import checkpoint as ckpt
from pipeline.train.ema import create_ema, ema_state, load_ema_state
from pipeline.train.engine import DistEnv, compute_dtype, create_engine, device
from pipeline.train.heartbeat import Heartbeat
from pipeline.train.hooks import StageHooks
from pipeline.train.objectives import StepContext, build_objective
from pipeline.train.objectives.base import all_sum
from pipeline.train.optim import make_optimizer, make_schedule
from pipeline.train.signals import Fault, StopFlag
from pipeline.train.startup import StartupClock

log = logging.getLogger("pipeline")


@dataclass
class Window:
    """What happened since the last log step (loss summed on the device: no sync in the hot loop)."""

    loss: torch.Tensor
    steps: int = 0
    skipped: int = 0
    wait_s: float = 0.0
    last_error: str = ""
    start: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.loss.zero_()
        self.steps = self.skipped = 0
        self.wait_s, self.start = 0.0, time.perf_counter()


class KeyLog:
    """``data.record_keys``: which samples each step trained on, per rank (one JSON line per micro batch)."""

    def __init__(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def append(self, step: int, micro: int, keys: list[str]) -> None:
        self.file.write(json.dumps({"step": step, "micro": micro, "keys": keys}, separators=(",", ":")) + "\n")
        self.file.flush()


class Trainer:
    def __init__(
        self,
        config: Config,
        run: RunDir,
        env: DistEnv,
        hooks: Sequence[StageHooks] = (),
        startup: Optional[StartupClock] = None,
    ):
        self.config, self.run, self.env, self.hooks = config, run, env, list(hooks)
        self.startup = startup or StartupClock()
        self.is_main = env.rank == 0
        self.stop = StopFlag()
        self.fault = Fault.from_environ(env.rank, env.attempt)
        self.dev, self.dtype = device(), compute_dtype(config)
        self.step = 0
        self.resume_tag = ckpt.latest_complete(run.checkpoints)
        self.tracker: Optional[Tracker] = None
        self.heartbeat = Heartbeat(
            run.heartbeat(env.rank),
            rank=env.rank,
            node=env.node,
            attempt=env.attempt,
            interval_s=config.launch.heartbeat_s,
        )

    # -- building ----------------------------------------------------------------------------------
    def build(self) -> None:
        """Data plan, model (wrapped by the objective), EMA, engine, schedule and loaders, on every rank."""
        from timm.utils import random_seed

        config, env = self.config, self.env
        self.stop.install()
        for hook in self.hooks:
            hook.before_start(self)
        random_seed(config.run.seed, env.rank)  # timm's Mixup draws from NumPy, drop-path from torch
        self.plan = plan_data(config, env.world_size, build_index=False)  # the CLI indexed the shards already
        self.startup.mark("data_plan")
        num_classes = config.model.num_classes or self.plan.num_classes or 0
        self.objective = build_objective(config, num_classes)
        model = create_model(config.model, self.objective.head_classes(num_classes))
        if self.resume_tag is None:
            for hook in self.hooks:
                hook.on_model_built(model, self)
        self.model, module = model, self.objective.wrap(model)
        self.ema = create_ema(module, config, self.dev)
        self.img_size = input_size(model)
        flops = self.objective.forward_flops(module, self.img_size, config.model.in_chans) if self.is_main else None
        self.telemetry = StepTelemetry(config, env, flops, self.dev)
        self.startup.mark("model")
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.total_steps = max(1, round(config.optim.epochs * self.steps_per_epoch))
        optimizer = make_optimizer(module, config, self.dev)
        self.universal = self._prepare_elastic_resume()
        self.engine = create_engine(module, optimizer, config, env.world_size, load_universal=self.universal)
        self.writer = self._background_writer()
        self.schedule = make_schedule(
            optimizer, config, self.total_steps, round(config.optim.warmup_epochs * self.steps_per_epoch)
        )
        self.startup.mark("engine")  # DeepSpeed's initialize: its op builds/loads, ZeRO partitioning
        self.keys = KeyLog(self.run.keys(env.rank)) if config.data.record_keys else None
        self.data = RankData(
            config,
            self.plan,
            env.rank,
            env.world_size,
            self.img_size,
            pin_memory=self.dev.type == "cuda",
            require_labels=self.objective.needs_labels,
        )
        self.normalize = DeviceNormalize(config, self.dev)
        self.startup.mark("loaders")

    def _background_writer(self):
        """``checkpoint.background_write`` (default: on with CUDA): DeepSpeed's engine saves through it."""
        enabled = self.config.checkpoint.background_write
        if not (self.dev.type == "cuda" if enabled is None else enabled):
            return None
        from pipeline.train.background import BackgroundCheckpointEngine, can_defer_copy

        defer = can_defer_copy(self.engine.module, self.config.deepspeed.zero_stage)
        writer = BackgroundCheckpointEngine(self.env.rank, pin=self.dev.type == "cuda", defer_copy=defer)
        self.engine.checkpoint_engine = writer
        return writer

    def _prepare_elastic_resume(self) -> bool:
        """Whether the checkpoint to resume was written by another number of ranks: then rank 0 converts it to a
        universal checkpoint (once; the others wait), which the engine loads re-partitioned."""
        if self.resume_tag is None:
            return False
        meta = ckpt.read_meta(self.run.checkpoints / self.resume_tag)
        problem = ckpt.elastic_problem(meta, self.env.world_size, self.config.deepspeed.zero_stage)
        if problem:
            raise RuntimeError(f"run {self.run.name} cannot resume from {self.resume_tag}: {problem}")
        if not ckpt.needs_universal(meta, self.env.world_size):
            return False
        done = self.run.checkpoints / ckpt.UNIVERSAL / self.resume_tag / ckpt.MARKER
        if self.is_main and not done.exists():
            log.info(
                "checkpoint %s was written by %d ranks, this run has %d: converting it to a universal "
                "checkpoint (DeepSpeed ds_to_universal)",
                self.resume_tag,
                meta["world_size"],
                self.env.world_size,
            )
            start = time.perf_counter()
            ckpt.to_universal(self.run.checkpoints, self.resume_tag)
            log.info("converted in %.1f s", time.perf_counter() - start)
        while not done.exists():  # rank 0 failing ends the job
            time.sleep(0.5)
        return True

    def resume(self) -> None:
        """Model, optimizer, RNG, data position, objective and EMA state from the latest complete checkpoint."""
        if self.resume_tag is None:
            return
        state = ckpt.load(
            self.engine, self.run.checkpoints, self.resume_tag, rank=self.env.rank, universal=self.universal
        )
        if state.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise RuntimeError(
                f"checkpoint {self.resume_tag} was made with {state['steps_per_epoch']} steps per "
                f"epoch, this run has {self.steps_per_epoch}: data or batch size changed"
            )
        self.step = int(state["step"])
        self.objective.load_state_dict(state.get("objective") or {})
        load_ema_state(self.ema, state.get("ema"))
        if self.is_main:
            self.run.truncate_train_log(self.step)  # what a killed attempt logged after this checkpoint
        self.startup.mark("resume")

    def start_tracking(self) -> None:
        """The MLflow run (rank 0 sends; created on the first attempt, continued on the next), progress output."""
        env, config = self.env, self.config
        hosts = [None] * env.world_size
        dist.all_gather_object(hosts, env.node)  # the launcher's node names: the same ones system metrics use
        self.tracker = Tracker(config, self.run.path, enabled=self.is_main, img_size=self.img_size, job_id=env.job_id)
        self.progress = Progress(self.total_steps, self.step, enabled=self.is_main)
        if not self.is_main:
            return
        if self.resume_tag is None:
            self.tracker.log_params(flatten(to_dict(config)))
            self.tracker.log_artifact(self.run.config)
            atomic_write(self.run.datasets, json.dumps(self.plan.datasets, indent=2))  # a fine-tune reads it
            self.tracker.log_datasets(self.plan.datasets)
            for hook in self.hooks:
                hook.on_tracking_started(self)
        restarts = self.run.bump_restarts() if self.resume_tag else 0
        params = count_parameters(self.model)
        self.tracker.set_tags(
            {
                **host_tags(env.world_size, hosts),
                "restarts": restarts,
                "parameters": params,
                "steps_total": self.total_steps,
                "objective": self.objective.name,
                **self.telemetry.tags(),
            }
        )
        self.tracker.log_metrics({"restarts": restarts}, self.step)
        self._log_failures()
        log.info(
            "%s %s (%s): %s params, %d ranks on %s, %d steps (%d/epoch, global batch %d, micro %d), %s",
            config.run.stage,
            config.model.name,
            self.objective.name,
            f"{params:,}",
            env.world_size,
            ",".join(sorted(set(hosts))),
            self.total_steps,
            self.steps_per_epoch,
            config.data.batch_size,
            config.micro_batch_size(env.world_size),
            f"resumed from {self.resume_tag}" if self.resume_tag else "fresh",
        )

    def _log_failures(self) -> None:
        """Each earlier failed attempt of this run and its cause (launch.max_failures retries), in MLflow."""
        failures = self.run.read_failures()
        tags = {
            f"failure.{i + 1}": f"step {f.get('step')}: {f.get('cause', '?')}"[:500] for i, f in enumerate(failures)
        }
        self.tracker.set_tags({**tags, "failures": len(failures), "run_state": "running"})
        if failures:
            self.tracker.log_metrics({"failures": len(failures)}, self.step)

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        """Returns 0 when the run is complete, EXIT_RESUMABLE when it stopped early with a checkpoint. A failure
        is marked in MLflow (FAILED, tag run_state) before it propagates; a retry sets the run RUNNING again."""
        self.heartbeat.start()
        try:
            return self._train()
        except BaseException as exc:
            self.heartbeat.fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            if self.tracker is not None:
                self.tracker.set_tags({"run_state": "failed"})
                self.tracker.finish("FAILED")
                self.tracker.close(wait_s=min(self.config.tracking.final_wait_s, 10.0))
            raise
        finally:
            self.heartbeat.stop()

    def _train(self) -> int:
        self.build()
        self.resume()
        self.start_tracking()
        self.startup.mark("tracking")  # the MLflow run created (or continued), its first params and tags
        if self.resume_tag is None and self.objective.baseline_eval:
            self.log_eval(self.evaluate())  # where the run starts from (a self-supervised run's k-NN at random init)
            self.startup.mark("baseline_eval")
        self.engine.train()
        window = Window(torch.zeros((), dtype=torch.float64, device=self.dev))
        batches = iter(self.data.train_batches(start_step=self.step))
        stopped = None
        while self.step < self.total_steps:
            self.train_step(batches, window)
            if self.step % self.config.tracking.log_every_steps == 0 or self.step == self.total_steps:
                self.log_window(window)
            stopped = self.after_step()
            if stopped:
                break
        del batches  # stops the loader's workers before the final evaluation starts its own
        return self.stop_early(stopped) if stopped else self.finish()

    def train_step(self, batches, window: Window) -> None:
        """One optimizer step: ``grad_accum_steps`` micro batches through the objective's loss."""
        accum = self.config.optim.grad_accum_steps
        self.schedule.step_update(self.step)
        for micro in range(accum):
            wait_start = time.perf_counter()
            batch = next(batches)
            window.wait_s += time.perf_counter() - wait_start
            self.startup.mark("first_batch")  # the loader's workers started, shards opened, one batch decoded
            window.skipped += batch.skipped
            window.last_error = batch.error or window.last_error
            if self.keys is not None:
                self.keys.append(self.step, micro, batch.keys)
            images = self.normalize(batch.images.to(self.dev, non_blocking=True), training=True)
            labels = batch.labels.to(self.dev, non_blocking=True)
            ctx = StepContext(self.step, micro, self.env.rank, self.config.run.seed, self.dtype, self.dev)
            loss = self.objective.loss(self.engine, images, labels, ctx)
            self.engine.backward(loss)
            if self.writer is not None:
                self.writer.wait_staged()  # a save's copy overlapping this step must finish before the update
            self.engine.step()
            window.loss += loss.detach() / accum
        self.step += 1
        window.steps += 1
        self.startup.mark("first_step")
        self.heartbeat.progress(self.step)
        if self.ema is not None:
            self.ema.update(self.engine.module, step=self.step)

    def after_step(self) -> Optional[str]:
        """Evaluation and checkpoints at their intervals; the stop agreement. Returns why it stops, if it does."""
        config, step, total = self.config, self.step, self.total_steps
        self.report_written()
        if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total:
            self.log_eval(self.evaluate())
        if self.fault is not None:
            self.fault.maybe_trigger(step, self.stop)
        if config.run.stop_at_step and step >= config.run.stop_at_step and step < total:
            self.stop.request(f"run.stop_at_step={config.run.stop_at_step}")
        if self.stop.agreed():
            return self.stop.reason
        if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 and step < total:
            self.save("interval")
        return None

    # -- reporting ---------------------------------------------------------------------------------
    def log_window(self, window: Window) -> None:
        """Collective: the window's loss and skip counts over the ranks, throughput, telemetry; rank 0 logs."""
        batch, world = self.config.data.batch_size, self.env.world_size
        loss_sum, skipped = all_sum([window.loss.item(), window.skipped], self.dev)
        elapsed = time.perf_counter() - window.start
        group = self.schedule.optimizer.param_groups[0]
        metrics = {
            "train_loss": loss_sum / world / window.steps,
            "lr": group["lr"] / group.get("lr_scale", 1.0),
            "grad_norm": _finite(self.engine.get_global_grad_norm()),
            "images_per_s": window.steps * batch / elapsed,
            "data_wait_fraction": window.wait_s / elapsed,
            "epoch": self.step / self.steps_per_epoch,
            "skipped_samples": skipped,
        }
        metrics.update(
            self.telemetry.at_log_step(  # collective: per-GPU rates, MFU, each node's system load
                metrics["images_per_s"], window.steps * batch / world / elapsed, window.wait_s / elapsed
            )
        )
        if self.is_main:
            self.run.append_train_log({"step": self.step, "train_loss": metrics["train_loss"], "lr": metrics["lr"]})
            self.tracker.log_metrics(metrics, self.step)
            self._report_startup()
            self.progress.update(self.step, metrics)
            if skipped:
                self.progress.write(
                    f"skipped {int(skipped)} sample(s) (undecodable or unreadable) in the last {window.steps} "
                    f"steps; last: {window.last_error}"
                )
        window.reset()

    def _report_startup(self) -> None:
        """Once per attempt, at its first logged metric: where the start-up went, in the log and in MLflow."""
        if "first_metric" in self.startup.marks:
            return
        self.startup.mark("first_metric")
        log.info("start-up: first step %s", self.startup.describe("first_step"))
        record = self.startup_record()
        atomic_write(self.run.startup, json.dumps({"attempt": self.env.attempt, **record}, indent=2))
        self.tracker.log_metrics({f"startup_{name}_s": seconds for name, seconds in record.items()}, self.step)

    def startup_record(self) -> dict[str, float]:
        """Seconds per start-up phase, then from the command's start to the first step and the first metric."""
        return {
            **self.startup.phases(),
            "to_first_step": self.startup.since_start("first_step"),
            "to_first_metric": self.startup.since_start("first_metric"),
        }

    def evaluate(self) -> dict[str, float]:
        """The objective's evaluation of the model (and of its EMA weights, as ``*_ema``) over the val shards."""
        result = self._evaluate(self.engine, self.dtype)
        if self.ema is not None:
            ema = self._evaluate(self.ema.module, torch.float32)
            result.update({f"{k}_ema": v for k, v in ema.items() if k not in ("val_samples", "val_skipped")})
        return result

    @torch.no_grad()
    def _evaluate(self, module, dtype: torch.dtype) -> dict[str, float]:
        """Ranks may hold different numbers of val batches: they agree per batch whether anyone still has one,
        and a rank without one runs the objective's dummy forward, so ZeRO-3's gathers stay matched."""
        module.eval()
        ctx = StepContext(self.step, 0, self.env.rank, self.config.run.seed, dtype, self.dev)
        evaluation = self.objective.evaluation(module, ctx, self.img_size)
        loader = self.data.val_batches()
        batches = iter(loader) if loader is not None else iter(())
        skipped = 0
        while True:
            batch = next(batches, None)
            flag = torch.tensor([0.0 if batch is None else 1.0], device=self.dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if not flag.item():
                break
            if batch is None or batch.images.numel() == 0:  # nothing left here, or only a count of skipped samples
                skipped += batch.skipped if batch is not None else 0
                evaluation.dummy()
                continue
            skipped += batch.skipped
            self.heartbeat.progress(self.step, "evaluating")
            evaluation.add(self.normalize(batch.images.to(self.dev), training=False), batch.labels.to(self.dev))
        del batches, loader
        module.train()
        result = evaluation.result()
        (skipped,) = all_sum([skipped], self.dev)
        if result:
            result["val_skipped"] = skipped
        if self.is_main:
            for name, picture in evaluation.pictures().items():
                self.tracker.log_image(picture, f"{name}_step{self.step:08d}.png")
        return result

    def log_eval(self, result: dict) -> None:
        if self.is_main and result:
            self.tracker.log_metrics(result, self.step)
            self.progress.write(f"eval at step {self.step}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))

    # -- checkpoints and the end -------------------------------------------------------------------
    def save(self, reason: str) -> None:
        """Collective: every rank writes its part; the checkpoint counts once all have (COMPLETE marker). With
        background writes the loop waits only for the copy (and for the previous save, if still in flight)."""
        state = {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "step_in_epoch": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.env.world_size,
            "reason": reason,
            "objective": self.objective.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = ema_state(self.ema)
        self.heartbeat.progress(self.step, "saving")
        result = ckpt.save(
            self.engine,
            self.run.checkpoints,
            self.step,
            state,
            rank=self.env.rank,
            keep_last=self.config.checkpoint.keep_last,
            world_size=self.env.world_size,
            zero_stage=self.config.deepspeed.zero_stage,
            writer=self.writer,
        )
        self.report_written()  # the previous save, finished while this one waited for it
        if self.writer is not None:
            self.heartbeat.note(writing=result.tag)
        self.heartbeat.progress(self.step)
        if self.is_main:
            self._log_saved(result, reason)

    def _log_saved(self, result, reason: str) -> None:
        mib = result.bytes / 2**20
        if self.writer is None:
            self.progress.write(f"checkpoint {result.tag} saved ({reason}) in {result.seconds:.1f}s, {mib:.1f} MiB")
        else:
            self.progress.write(
                f"checkpoint {result.tag} ({reason}): copied in {result.seconds:.1f}s ({mib:.1f} MiB), "
                "writing in the background"
            )
        self.tracker.log_metrics({"checkpoint_seconds": result.seconds, "checkpoint_mib": mib}, self.step)
        self.tracker.set_tags(
            {"checkpoint.last_path": result.path, "checkpoint.last_step": self.step, "checkpoint.last_reason": reason}
        )

    def report_written(self) -> None:
        """Background saves that finished since the last look (rank 0: the checkpoint is complete)."""
        if self.writer is None:
            return
        for written in self.writer.poll():
            if not self.writer.in_flight():
                self.heartbeat.note(writing=None)
            if self.is_main:
                self.progress.write(
                    f"checkpoint {written.tag} complete: written in {written.seconds:.1f}s, "
                    f"{written.bytes / 2**20:.1f} MiB from rank 0"
                )
                self.tracker.log_metrics({"checkpoint_write_seconds": written.seconds}, self.step)

    def wait_for_writes(self) -> None:
        """Collective: every rank's background save is done, and its marker written (stop, end of the run)."""
        if self.writer is None:
            return
        self.heartbeat.progress(self.step, "saving")
        self.writer.wait()
        dist.barrier()
        self.report_written()
        self.heartbeat.progress(self.step)

    def stop_early(self, reason: str) -> int:
        """A checkpoint, then exit 3: the run is resumable, and MLflow says so (KILLED, tag run_state=stopped)."""
        self.save(f"stop: {reason}")
        self.wait_for_writes()
        self.progress.close()
        self.tracker.set_tags({"run_state": "stopped", "stopped_reason": reason})
        self.tracker.finish("KILLED")
        if self.is_main:
            log.info(
                "stopped at step %d/%d (%s); the run resumes from here when started again",
                self.step,
                self.total_steps,
                reason,
            )
        dist.barrier()
        self.tracker.close()  # bounded wait for the tracking backlog (rank 0), after the other ranks are done
        return EXIT_RESUMABLE

    def finish(self) -> int:
        """Final evaluation and checkpoint, the stage's end hooks, then summary.json: the run is complete."""
        final = self.evaluate()
        self.log_eval(final)
        self.wait_for_writes()  # every rank then sees the same complete tags
        if ckpt.latest_complete(self.run.checkpoints) != ckpt.tag_for(self.step):
            self.save("end")
        self.wait_for_writes()  # the stage's end hooks read the final checkpoint (a fine-tune's export)
        self.progress.close()
        if self.is_main:
            for hook in self.hooks:
                hook.on_finished(self, final)
            history = [(r["step"], r["train_loss"]) for r in self.run.read_train_log()]
            summary = {
                "step": self.step,
                "epochs": self.config.optim.epochs,
                "world_size": self.env.world_size,
                "optimizer_steps": self.engine.global_steps,
                "micro_batches": self.engine.micro_steps,
                "objective": self.objective.name,
                "final": final,
                "loss_history": history,
                "checkpoint": str(self.run.checkpoints / ckpt.tag_for(self.step)),
                "startup_s": self.startup_record(),  # this attempt's
            }
            atomic_write(self.run.summary, json.dumps(summary, indent=2))
            self.tracker.log_artifact(self.run.summary)
            self.tracker.set_tags({"run_state": "finished"})
            self.tracker.finish("FINISHED")
            log.info("done: step %d, %s", self.step, ", ".join(f"{k} {v:.2f}" for k, v in final.items()))
        dist.barrier()
        self.tracker.close()
        return 0


def _finite(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
