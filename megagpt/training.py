"""pretrain(): set-up, the training loop, evaluation, log lines and TensorBoard.

The loop does not know which pipeline schedule runs, whether the optimizer is ZeRO-sharded, which precision is
used, or whether DeepSpeed runs the step: the Trainer feeds micro-batches to one `engines.Engine`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megagpt.checkpoint.format import (CheckpointError, checkpoint_format_problem, has_checkpoint,
                                       read_iterations_to_skip, read_tracker, write_iterations_to_skip)
from megagpt.checkpoint.sharded import prune_checkpoints, set_rng_state
from megagpt.config import (Config, ConfigError, all_data_prefixes, global_batch_size_at, non_persistent_dir,
                            num_microbatches, num_model_chunks, raise_if, train_iters, validate)
from megagpt.data.batches import MicroBatches, build_datasets
from megagpt.data.indexed_dataset import IndexedDataset, IndexedDatasetError
from megagpt.data.sampler import build_data_loader
from megagpt.data.tokenizer import data_tokenizer
from megagpt.model.gpt import GPTModel, build_model_chunks
from megagpt.model.softmax import attention_backend_line
from megagpt.engines import build_engine
from megagpt.engines.base import Engine, MicroBatch
from megagpt.engines.native import params_dtype
from megagpt.diagnostics.guardrails import Guardrails
from megagpt.parallel import comm
from megagpt.plan import activation_check, dry_run, startup_report
from megagpt.run_control import RunControl
from megagpt.parallel import random as tp_random
from megagpt.parallel.launch import LaunchEnv, detect_launch_env, init_distributed
from megagpt.parallel.state import ParallelState
from megagpt.profiling import Instruments
from megagpt.timers import Timers
from megagpt.train_log import TrainingLog, wandb_problems


@dataclass
class TrainResult:
    """What a run produced, for callers and tests: per-iteration losses (identical on every rank)."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[Optional[float]] = field(default_factory=list)
    global_batch_sizes: list[int] = field(default_factory=list)
    validation_losses: list[float] = field(default_factory=list)
    consumed_samples: int = 0
    skipped_iterations: int = 0
    exit_reason: Optional[str] = None    # why the run stopped before --train-iters (exit flags), if it did


def environment_problems(config: Config) -> list[str]:
    """What the file system says against the config: missing data or DeepSpeed config files, a --load directory
    written by the other engine. (Arithmetic rules are config.validate's.)"""
    problems = [f"data file {prefix + ext} does not exist" for prefix in all_data_prefixes(config.data)
                for ext in (".bin", ".idx") if not os.path.exists(prefix + ext)]
    p = config.parallel
    if p.deepspeed and p.deepspeed_config and not os.path.exists(p.deepspeed_config):
        problems.append(f"deepspeed config {p.deepspeed_config} does not exist")
    if config.train.load:
        problem = checkpoint_format_problem(config.train.load, p.deepspeed)
        if problem:
            problems.append(problem)
        try:
            has_checkpoint(config.train.load, p.deepspeed)
        except CheckpointError as exc:
            problems.append(str(exc))
    return problems + wandb_problems(config)


def resume_directory(config: Config, verbose: bool) -> Optional[str]:
    """The checkpoint directory to resume from: --load, or the non-persistent directory when it holds a newer
    checkpoint (unless --ckpt-step names an iteration of --load); None (start from scratch, with a notice) when
    neither holds one."""
    t, deepspeed = config.train, config.parallel.deepspeed
    if t.ckpt_step is not None:      # a chosen iteration of --load: nothing else is considered
        if not has_checkpoint(t.load, deepspeed):
            raise ConfigError(f"--ckpt-step {t.ckpt_step}: --load {t.load} holds no complete checkpoint")
        return t.load
    candidates = [d for d in (t.load, non_persistent_dir(t) if t.non_persistent_save_interval else None)
                  if d and has_checkpoint(d, deepspeed)]
    if not candidates:
        if t.load and verbose:
            print(f" no checkpoint in --load {t.load}: training from scratch", flush=True)
        return None
    newest = max(candidates, key=lambda d: read_tracker(d) if not deepspeed else 0)
    if newest != t.load and verbose:
        print(f" resuming from the newer non-persistent checkpoint in {newest}", flush=True)
    return newest


def resolve_vocab(config: Config) -> None:
    """Set model.vocab_size from the tokenizer and check the dataset's tokens fit it, before any allocation."""
    d = config.data
    if config.model.vocab_size is None or not d.mock_data:
        try:
            tokenizer = data_tokenizer(d)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"tokenizer: {exc}") from exc
        if config.model.vocab_size is not None and config.model.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"--vocab-size {config.model.vocab_size} differs from tokenizer {d.tokenizer_type}'s "
                              f"vocabulary of {tokenizer.vocab_size}")
        config.model.vocab_size = tokenizer.vocab_size
    if d.mock_data:
        return
    for prefix in all_data_prefixes(d):
        try:
            ds = IndexedDataset(prefix)
        except IndexedDatasetError as exc:
            raise ConfigError(str(exc)) from exc
        head = [np.asarray(ds[i]) for i in range(min(len(ds), 256))]
        highest = max([int(a.max()) for a in head if a.size], default=0)
        if highest >= config.model.vocab_size:
            raise ConfigError(f"dataset {prefix} holds token id {highest} but tokenizer {d.tokenizer_type} has only "
                              f"{config.model.vocab_size} ids: it was preprocessed with another tokenizer")


class Trainer:
    """Holds this rank's engine (model chunks, optimizer) and data; `train_step` and `evaluate` run one round."""

    def __init__(self, config: Config, ps: ParallelState, device: torch.device, launch: LaunchEnv) -> None:
        self.config, self.ps, self.device = config, ps, device
        self.tracker = tp_random.model_parallel_seed(config.train.seed, ps.tp_rank, ps.pp_rank, device)
        build_on = torch.device("cpu") if config.parallel.use_cpu_initialization else device
        self.chunks: list[GPTModel] = build_model_chunks(
            config.model, ps, seed=config.train.seed, tracker=self.tracker, num_chunks=num_model_chunks(config),
            sequence_parallel=config.parallel.sequence_parallel, params_dtype=params_dtype(config), device=build_on)
        for chunk in self.chunks:
            chunk.to(device)              # in place (the same Parameter objects): a no-op unless built on the CPU
        self.num_microbatches = num_microbatches(config, ps.dp_size)
        lg = config.logging    # the run's one Timers: the engine, optimizer and pipeline executor time into it
        self.timers = Timers(lg.timing_log_level, lg.timing_log_option, device, lg.barrier_with_l1_time)
        self.engine: Engine = build_engine(config, self.chunks, ps, self.tracker, launch.local_rank, self.timers)
        self.consumed_samples = 0
        self.consumed_valid_samples = 0   # validation samples read so far: a resume continues from there
        self.start_iteration = 0   # the last finished iteration: > 0 after resuming from a checkpoint
        self.last_saved = 0        # the iteration of this run's newest checkpoint (or the one it resumed from)
        self.iterations_to_skip = set(config.train.iterations_to_skip)   # grows with --on-spike rollback
        self.train_data = self.valid_data = None
        self.datasets = build_datasets(config, ps.dp_size, is_builder=launch.local_rank == 0)

    def save(self, directory: str, iteration: int, persistent: bool = True) -> None:
        """Checkpoint this rank's shards of `iteration` (collective: every rank calls it); with
        --keep-last-n-checkpoints, older ones are deleted once this one is complete (non-persistent ones: all but
        the newest)."""
        self.engine.save(directory, iteration, self.consumed_samples, self.consumed_valid_samples)
        if self.iterations_to_skip and self.ps.rank == 0:    # the run's history goes wherever its checkpoints go
            write_iterations_to_skip(directory, self.iterations_to_skip)
        if persistent:
            self.last_saved = iteration
        if not self.config.train.async_save:
            self._saved(directory)

    def poll_save(self, block: bool = False) -> None:
        """Collective under --async-save: mark a finished background save complete (`block`: wait for it)."""
        completed = self.engine.poll_save(block)
        if completed is not None:
            self._saved(completed[0])

    def _saved(self, directory: str) -> None:
        """A checkpoint in `directory` became complete: older ones may go."""
        keep = self.config.train.keep_last_n_checkpoints if directory == self.config.train.save else 1
        if keep and self.ps.rank == 0:
            prune_checkpoints(directory, keep)

    def load(self, directory: str, iteration: Optional[int] = None) -> dict:
        """Restore weights, optimizer, scheduler, consumed samples and iteration (default: the newest), and the
        iterations to skip recorded beside them; returns this rank's RNG states, to apply (`set_rng_state`) after
        `attach_data`, whose DataLoader iterator draws from the default generator."""
        loaded = self.engine.load(directory, iteration)
        self.iterations_to_skip.update(read_iterations_to_skip(directory))
        self.start_iteration, self.consumed_samples = loaded.iteration, loaded.consumed_samples
        self.consumed_valid_samples = loaded.consumed_valid_samples
        self.last_saved = loaded.iteration
        return loaded.rng_state

    def attach_data(self) -> None:
        """Loaders positioned at consumed_samples (after a resume), only on stages that read tokens or labels."""
        if not (self.ps.is_first_stage or self.ps.is_last_stage):
            return
        t, d = self.config.train, self.config.data
        train, valid, _ = self.datasets
        masked = data_tokenizer(d).eod if d.eod_mask_loss else None
        make = lambda ds, consumed: MicroBatches(build_data_loader(  # noqa: E731
            ds, consumed, t.micro_batch_size, self.ps.dp_rank, self.ps.dp_size, d.num_workers,
            cyclic=d.dataloader_type == "cyclic", pin_memory=self.device.type == "cuda"), self.device, masked)
        # A run resumed at its last iteration has nothing left to train on.
        self.train_data = make(train, self.consumed_samples) if self.consumed_samples < len(train) else None
        self.valid_data = make(valid, self.consumed_valid_samples) if valid is not None else None

    def _next_batches(self, data: Optional[MicroBatches], count: int) -> list[MicroBatch]:
        return data.next_step(count) if data is not None else []

    @property
    def global_batch_size(self) -> int:
        """The global batch size of the next step (it grows with consumed samples under --rampup-batch-size)."""
        return global_batch_size_at(self.config, self.ps.dp_size, self.consumed_samples)

    def _mean_over_dp(self, loss: float) -> float:
        """Mean over DP ranks of this rank's loss (each already a mean over its micro-batches)."""
        mean = torch.tensor([loss], dtype=torch.float64, device=self.device)
        comm.all_reduce(mean, self.ps.dp_group)
        return float(mean.item()) / self.ps.dp_size

    def train_step(self) -> tuple[float, bool, Optional[float]]:
        for model in self.chunks:
            model.train()
        gbs = self.global_batch_size
        count = gbs // (self.config.train.micro_batch_size * self.ps.dp_size)
        with self.timers("batch-generator", 2):     # training data only: evaluation is outside the timed interval
            batches = self._next_batches(self.train_data, count)
        loss, ok, grad_norm = self.engine.train_step(batches, count, gbs)
        self.consumed_samples += gbs
        return self._mean_over_dp(loss), ok, grad_norm

    def skip_step(self) -> int:
        """An iteration of --iterations-to-skip: read its data, so later iterations get theirs, and train nothing
        (no forward, backward, update or LR step, as Megatron). Returns the samples it skipped."""
        gbs = self.global_batch_size
        self._next_batches(self.train_data, gbs // (self.config.train.micro_batch_size * self.ps.dp_size))
        self.consumed_samples += gbs
        return gbs

    @torch.no_grad()
    def evaluate(self) -> float:
        for model in self.chunks:
            model.eval()
        count = self.num_microbatches    # evaluation always uses the final global batch size
        losses = [self._mean_over_dp(self.engine.eval_step(self._next_batches(self.valid_data, count), count))
                  for _ in range(self.config.train.eval_iters)]
        self.consumed_valid_samples += self.config.train.eval_iters * count * self.config.train.micro_batch_size * \
            self.ps.dp_size
        return float(np.mean(losses))


def print_startup(config: Config, trainer: Trainer, ps: ParallelState) -> None:
    """The resolved config (rank 0) and each rank's parameter count."""
    if ps.rank == 0:
        print(f"megagpt: world {ps.world_size} = TP {ps.tp_size} x PP {ps.pp_size} x DP {ps.dp_size}; "
              f"{trainer.num_microbatches} micro-batches per step; config:\n{config.to_json()}", flush=True)
        print(startup_report(config, ps.world_size), flush=True)
    n = sum(getattr(p, "ds_numel", p.numel()) for m in trainer.chunks for p in m.parameters())  # ZeRO-3: full size
    _print_in_rank_order(f" > rank {ps.rank} (tp {ps.tp_rank}, pp {ps.pp_rank}, dp {ps.dp_rank}): "
                         f"{n:,} parameters", ps)


def print_memory(trainer: Trainer, ps: ParallelState, iteration: int) -> None:
    """Each rank's bytes of params, grads and optimizer state, measured from the tensors. Printed after the
    first step, since the optimizer creates its state (Adam moments) then; beside them the bytes one micro-batch
    saved for backward in that step (native engine), against the plan's prediction."""
    mem = trainer.engine.memory_bytes()
    parts = [f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()]
    measured = getattr(trainer.engine, "activation_bytes", None)
    if measured:
        parts.append(activation_check(trainer.config, ps.world_size, ps.pp_rank, trainer.device.type, measured))
    _print_in_rank_order(f" > rank {ps.rank} memory after iteration {iteration}: " + " | ".join(parts), ps)


def _print_in_rank_order(line: str, ps: ParallelState) -> None:
    """Collective: every rank prints its line, rank 0 first."""
    for r in range(ps.world_size):
        if r == ps.rank:
            print(line, flush=True)
        dist.barrier()


def setup(config: Config, log: bool = True) -> tuple["Trainer", ParallelState]:
    """Validate, join the process group, build groups, model, optimizer and data for this rank."""
    launch = detect_launch_env()
    validate(config, launch.world_size)  # clear errors before any process group or allocation
    if config.train.dry_run:
        if launch.rank == 0:
            print(dry_run(config, launch.world_size), flush=True)
        raise SystemExit(0)
    raise_if(environment_problems(config))
    config.train.load = resume_directory(config, launch.rank == 0 and log)
    resolve_vocab(config)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    launch, device = init_distributed(config.parallel.distributed_backend)
    p = config.parallel
    ps = ParallelState(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, num_model_chunks(config),
                       p.pipeline_schedule)
    comm.all_reduce(torch.zeros(1, device=device), ps.pp_group)  # NCCL: every rank joins a group before its p2p
    m = config.model
    try:   # on CUDA this builds the fused softmax extension now, not at the first step
        attention = attention_backend_line(m.attention_backend, m.attention_core, device.type, params_dtype(config),
                                           m.seq_length, m.masked_softmax_fusion)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if log and ps.rank == 0:
        print(f" {attention}", flush=True)
    trainer = Trainer(config, ps, device, launch)
    rng_state = trainer.load(config.train.load, config.train.ckpt_step) if config.train.load else None
    trainer.attach_data()
    notice = set_rng_state(rng_state, trainer.tracker) if rng_state is not None else None   # None: a converted
    if notice and ps.rank == 0 and log:                            # checkpoint, whose streams were another layout's
        print(f" notice: {notice}", flush=True)
    if config.train.load and ps.rank == 0 and log:
        print(f" loaded checkpoint from {config.train.load} at iteration {trainer.start_iteration}", flush=True)
    if log:
        print_startup(config, trainer, ps)
    return trainer, ps


def pretrain(config: Config, log: bool = True) -> TrainResult:
    """Train per `config` under the launcher's environment; returns the per-iteration losses."""
    trainer, ps = setup(config, log)
    return train_loop(config, trainer, ps, log)


def train_loop(config: Config, trainer: Trainer, ps: ParallelState, log: bool = True) -> TrainResult:
    """Train from the trainer's start iteration to the end (or an exit flag), then save the final checkpoint."""
    t = config.train
    total_iters = train_iters(config, ps.dp_size)
    control = RunControl(t, None, trainer.device)
    guard = Guardrails(config, trainer, ps, log)   # pre-flight, NaN/spike checks, watchdog (diagnostics/)
    instruments = Instruments(config, ps.rank, trainer.device, trainer.start_iteration)  # profiler, manual GC
    try:
        with guard.watching():
            result = _iterate(config, trainer, ps, log, total_iters, control, guard, instruments)
    finally:
        control.close()
        guard.close()
        instruments.close()
    if t.save and result.exit_reason is None and trainer.last_saved < total_iters:
        trainer.save(t.save, total_iters)
    trainer.poll_save(block=True)
    result.consumed_samples = trainer.consumed_samples
    return result


def _iterate(config: Config, trainer: Trainer, ps: ParallelState, log: bool, total_iters: int,
             control: RunControl, guard: Guardrails, instruments: Instruments) -> TrainResult:
    """The iterations, their log lines, evaluations and checkpoints, until --train-iters or an exit flag."""
    t = config.train
    report = TrainingLog(config, ps, trainer.timers, trainer.chunks, total_iters, log)
    result = TrainResult()
    iteration = trainer.start_iteration
    while iteration < total_iters:
        iteration += 1
        if iteration in trainer.iterations_to_skip:
            report.skipped(iteration, trainer.skip_step())
            continue
        guard.begin_iteration(iteration)
        gbs = trainer.global_batch_size
        loss, ok, grad_norm = trainer.train_step()
        result.losses.append(loss)
        result.grad_norms.append(grad_norm)
        result.global_batch_sizes.append(gbs)
        result.skipped_iterations += 0 if ok else 1
        report.iteration(iteration, loss, grad_norm, gbs, trainer.consumed_samples, result.skipped_iterations,
                         trainer.engine)
        guard.end_iteration(iteration)
        report.pause()  # reports, evaluation, saving, profiler and manual GC are left out of the iteration time
        if guard.rollback_requested:    # --on-spike rollback: on from the newest checkpoint, skipping since
            iteration = guard.rollback(iteration)
            report.resume()
            continue
        instruments.after_iteration(iteration)
        if log and iteration == trainer.start_iteration + 1:
            print_memory(trainer, ps, iteration)
        if trainer.datasets[1] is not None and t.eval_interval and iteration % t.eval_interval == 0:
            with instruments.evaluation():
                val = trainer.evaluate()  # every rank joins: middle stages run the schedule without data
            result.validation_losses.append(val)
            report.validation(iteration, val, trainer.consumed_samples)
        if t.save and t.save_interval and iteration % t.save_interval == 0:
            trainer.save(t.save, iteration)
        elif t.non_persistent_save_interval and iteration % t.non_persistent_save_interval == 0:
            trainer.save(non_persistent_dir(t), iteration, persistent=False)
        trainer.poll_save()
        if control.should_exit(iteration):
            if t.save and trainer.last_saved < iteration:
                trainer.save(t.save, iteration)
            if ps.rank == 0 and log:
                print(f" exiting after iteration {iteration}: {control.reason}", flush=True)
            result.exit_reason = control.reason
            break
        report.resume()
    report.close()
    return result


def config_for_test(**overrides) -> Config:
    """A small Config for tests and demos: keyword names are field names of any section."""
    config = Config()
    sections = [getattr(config, f.name) for f in dataclasses.fields(config)]
    for key, value in overrides.items():
        owner = next((s for s in sections if key in {f.name for f in dataclasses.fields(s)}), None)
        if owner is None:
            raise KeyError(f"unknown config field {key}")
        setattr(owner, key, value)
    return config
