"""The skeleton every training loop runs on: the GAN's (train_utils.py) and the
nucleus segmenter's (train_segmenter.py).

It owns what a loop must get right to be safe: stop requests (SIGTERM/SIGINT save
and exit 143 at a step boundary), the run's position (epoch, batch in the epoch,
step, the epoch's partial sums) and its restoration from a checkpoint, the RNG
state of every rank, atomic checkpoints, one epoch of steps over a
SeededSampler with a progress bar and periodic reductions, and the training time
(loading and steps, across resumes) that ends a run with a time budget. A loop brings its step
(a function of one batch returning detached per-step values), its checkpoint
payload (weights, optimisers, configs) and its end-of-epoch metrics.
"""
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from runtime import DistInfo, barrier
from utils import atomic_save_torch, get_rng_state, set_rng_state

# Checkpoint entries the skeleton writes and reads back on resume, next to each loop's own.
POSITION_KEYS = ("epoch", "batches_done", "step", "history", "rng", "world_size", "partial_sums", "train_seconds")


def training_clock():
    """Seconds on a monotonic clock: what the training time (Position.seconds) is read from; a test can
    replace it to run a time budget without waiting."""
    return time.monotonic()


class StopRequest:
    """SIGTERM/SIGINT (e.g. SLURM preemption, Ctrl-C) ask the loop to save and stop at
    the next step boundary instead of dying mid-write."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        # A second Ctrl-C gives up at once; a repeated SIGTERM (SLURM and torchrun can
        # both send one) must not cut short the save the first one asked for.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


@dataclass
class Position:
    """Where the run is: epochs finished, batches finished in the current epoch, optimiser
    steps, per-epoch history, `sums`: the epoch's per-step values summed over those
    batches, followed by their count, and `seconds`: the training time so far, every run
    of it together, as all ranks agree on it."""
    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    wandb_run_id: str = None
    sums: torch.Tensor = None
    seconds: float = 0.0


@dataclass
class Loop:
    """One run's shared machinery. `names` are the values each step returns (their epoch
    means go into the history); `payload()` gives the loop's own checkpoint entries.
    Without `out_dir` nothing is saved (a stop then exits all the same). `resume_hint`
    tells a stopped run's user how to continue; `progress` shows a bar per epoch; `run_id`
    (the run folder's) goes into every checkpoint, so a resume can tell it is this run's;
    `budget_seconds` (0: none) of training time ends an epoch early (`out_of_time`)."""
    out_dir: Path
    info: DistInfo
    device: torch.device
    names: tuple
    payload: Callable[[], dict]
    stop: StopRequest
    log_every: int
    save_every_steps: int = 0
    resume_hint: str = None
    progress: bool = True
    run_id: str = None
    budget_seconds: float = 0

    @property
    def last_checkpoint(self):
        return None if self.out_dir is None else Path(self.out_dir) / "checkpoints" / "last.pt"

    def zeros(self):
        return torch.zeros(len(self.names) + 1)

    def out_of_time(self, position):
        return bool(self.budget_seconds) and position.seconds >= self.budget_seconds

    def restore(self, resume, resume_path, log):
        """The position a checkpoint carries (a fresh one without), and this rank's RNG state
        when the world size is unchanged. A mid-epoch position under another world size
        restarts that epoch: the sampler's split of it differs."""
        if resume is None:
            return Position(sums=self.zeros())
        # Segmenter checkpoints from before this skeleton record whole epochs, and no step count.
        position = Position(epoch=resume["epoch"], batches_done=resume.get("batches_done", 0), step=resume.get("step", 0),
                            history=list(resume["history"]), wandb_run_id=resume.get("wandb_run_id"),
                            sums=self.zeros(), seconds=float(resume.get("train_seconds", 0.0)))
        same_world = resume.get("world_size", 1) == self.info.world_size
        if same_world:
            rng = resume["rng"]
            set_rng_state(rng[self.info.rank] if isinstance(rng, list) else rng)
        if position.batches_done:
            if not same_world:
                log(f"note: resuming mid-epoch with a different world size; epoch {position.epoch + 1} restarts")
                position.batches_done = 0
            elif self.info.is_main:  # the saved sums are the whole job's: one rank carries them on
                position.sums = resume["partial_sums"].clone()
        log(f"resumed from {resume_path}: epoch {position.epoch + 1}, batch {position.batches_done}, "
            f"step {position.step}")
        return position

    def state(self, position, sums):
        """The checkpoint: the loop's payload and the position, with every rank's RNG state and
        the job's partial sums (a collective under DDP: every rank calls it)."""
        rng = get_rng_state()
        if self.info.distributed:
            gathered = [None] * self.info.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
            sums = sums.clone()
            dist.all_reduce(sums)
        return {**self.payload(), "epoch": position.epoch, "batches_done": position.batches_done,
                "step": position.step, "partial_sums": sums.cpu(), "history": position.history, "rng": rng,
                "world_size": self.info.world_size, "wandb_run_id": position.wandb_run_id, "run_id": self.run_id,
                "train_seconds": position.seconds}

    def save(self, position, sums, also_as=None, last=True):
        """One state as last.pt (unless `last` is False) and as `also_as` beside it (every rank calls it)."""
        if self.out_dir is None:
            return
        state = self.state(position, sums)
        if self.info.is_main:
            if last:
                atomic_save_torch(state, self.last_checkpoint)
            if also_as:
                atomic_save_torch(state, self.last_checkpoint.parent / also_as)
        barrier()

    def reduce(self, sums, stop_requested, seconds=0.0):
        """The job's means so far this epoch, whether any rank was asked to stop, and the ranks'
        mean training time (`seconds` is this rank's): one all-reduce, and the loop's only
        host-device sync."""
        count = len(self.names)
        packed = torch.cat([sums, torch.tensor([float(stop_requested), seconds], device=sums.device)])
        if self.info.distributed:
            dist.all_reduce(packed)
            seconds = packed[count + 2].item() / self.info.world_size
        means = (packed[:count] / packed[count].clamp(min=1)).tolist()
        return dict(zip(self.names, means)), packed[count + 1].item() > 0, seconds

    def epoch(self, position, loader, sampler, step, desc, on_log=None, until_step=None, on_step=None):
        """One epoch from position.batches_done on (or up to step `until_step`, or until the
        training time reaches the budget): `step(batch)` per batch, then `on_step(sums)`.
        Every --log-every steps the means go to the progress bar and `on_log(means)`. A stop
        request saves last.pt where the run stands and exits with status 143. Returns this
        rank's sums."""
        sampler.set_epoch(position.epoch, skip=position.batches_done * loader.batch_size)
        sums = position.sums.to(self.device)
        position.sums = self.zeros()
        count = len(self.names)
        epoch_batches = position.batches_done + len(loader)
        # A lone process checks the (host-side) stop flag and its clock every step; under DDP all
        # ranks must agree on the step, so both travel with the --log-every reduction.
        check_every = self.log_every if self.info.distributed else 1
        seconds = position.seconds  # this rank's training time: loading and steps, not saves or on_step
        with tqdm(loader, desc=desc, disable=not (self.info.is_main and self.progress), dynamic_ncols=True,
                  initial=position.batches_done, total=epoch_batches) as bar:
            mark = training_clock()
            for batch in bar:
                sums[:count] += step(batch)
                sums[count] += 1
                position.step += 1
                position.batches_done += 1
                seconds += training_clock() - mark
                stopping = False
                if position.step % self.log_every == 0 or position.batches_done == epoch_batches:
                    means, stopping, seconds = self.reduce(sums, self.stop.requested, seconds)
                    position.seconds = seconds
                    bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in means.items()})
                    if on_log is not None:
                        on_log(means)
                elif position.step % check_every == 0:
                    stopping = self.stop.requested
                    position.seconds = seconds
                if stopping:
                    self.save(position, sums)
                    if self.info.is_main:
                        saved = f"saved {self.last_checkpoint} (epoch {position.epoch + 1}, batch " \
                                f"{position.batches_done})" if self.out_dir is not None else "nothing saved"
                        hint = self.resume_hint or f"continue with --resume {self.last_checkpoint}"
                        print(f"stopped by signal; {saved}; {hint}", flush=True)
                    raise SystemExit(143)
                if self.save_every_steps and position.step % self.save_every_steps == 0:
                    self.save(position, sums)
                if on_step is not None:
                    on_step(sums)
                if position.step == until_step or self.out_of_time(position):
                    break
                mark = training_clock()
        return sums

    def end_epoch(self, position, sums, extra=None):
        """The epoch's means (over the whole job) into the history with `extra` entries,
        the position moved to the next epoch. Returns the means."""
        if self.info.distributed:
            dist.all_reduce(sums)
        count = len(self.names)
        means = dict(zip(self.names, (sums[:count] / sums[count].clamp(min=1)).tolist()))
        position.epoch += 1
        position.batches_done = 0
        position.history.append({"epoch": position.epoch, **means, **(extra or {})})
        return means
