"""The GAN training step and the epoch loop shared by train_pannuke.py,
train_utp.py, train_conic.py and their _ddp twins. The step's losses are in losses.py.

One loop runs the same on one device and under torchrun (runtime.distributed).
Rank 0 alone writes checkpoints, sample grids, plots and wandb logs.
"""
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from config import check_epochs_left, check_option_ranges, check_training_config, settle_config, training_parser
from gan import (CHECKPOINT_KIND, CHECKPOINT_VERSION, build_discriminator, build_generator, check_model_config, generate,
                 model_config, prepare_batch, read_resume_checkpoint)
from losses import LOSSES
from report import save_loss_plot, triplet_grid
from runtime import (SeededSampler, autocast_context, barrier, distributed, init_wandb, load_model_state,
                     loader_workers, main_process_log, make_loader, make_optimizer, maybe_compile, prepare_run_dir,
                     resolve_precision, unwrap, wrap_ddp)
from utils import UserError, atomic_save_png, atomic_save_torch, get_rng_state, seed_everything, set_rng_state

LOSS_NAMES = ("loss_d", "loss_g_adv", "loss_l1")


# --------------------------------------------------------------------------- one step

@dataclass
class StepConfig:
    """What the losses (losses.py) need. The last three matter only to the multiscale
    and OASIS discriminators and default to their plain form (hinge, no feature
    matching, no LabelMix)."""
    l1_lambda: float
    real_label_range: tuple
    fake_label_range: tuple
    smooth_real: bool
    smooth_fake: bool
    autocast: object
    gan_loss: str = "hinge"
    feat_match_lambda: float = 0.0
    labelmix_lambda: float = 0.0


def gan_train_step(generator, discriminator, opt_g, opt_d, scaler_g, scaler_d, mask, real, cfg):
    """One update of D then G with the losses of D's kind (losses.LOSSES). Returns
    (loss_d, loss_g_adv, loss_l1) as one detached tensor (no host-device
    synchronisation here; the caller decides when to read them). LabelMix is part of
    loss_d and feature matching part of loss_g_adv."""
    d_loss, g_adv_loss = LOSSES[unwrap(discriminator).kind]
    with cfg.autocast:
        fake = generator(mask)
        loss_d = d_loss(discriminator, mask, real, fake.detach(), cfg)
    opt_d.zero_grad(set_to_none=True)
    scaler_d.scale(loss_d).backward()
    scaler_d.step(opt_d)
    scaler_d.update()

    # D's weights get no gradient in G's step: freezing them skips that work, and
    # calling the unwrapped D keeps DDP from expecting a gradient all-reduce.
    plain_d = unwrap(discriminator)
    plain_d.requires_grad_(False)
    with cfg.autocast:
        loss_adv = g_adv_loss(plain_d, mask, real, fake, cfg)
        loss_l1 = nn.functional.l1_loss(fake.float(), real.float()) * cfg.l1_lambda
        loss_g = loss_adv + loss_l1
    opt_g.zero_grad(set_to_none=True)
    scaler_g.scale(loss_g).backward()
    scaler_g.step(opt_g)
    scaler_g.update()
    plain_d.requires_grad_(True)
    return torch.stack([loss_d.detach(), loss_adv.detach(), loss_l1.detach()]).float()


def step_config_from_args(args, autocast):
    return StepConfig(l1_lambda=args.l1_lambda, real_label_range=tuple(args.real_label_range),
                      fake_label_range=tuple(args.fake_label_range), smooth_real=args.smooth_real,
                      smooth_fake=args.smooth_fake, autocast=autocast, gan_loss=args.gan_loss,
                      feat_match_lambda=args.feat_match_lambda, labelmix_lambda=args.labelmix_lambda)


# --------------------------------------------------------------------------- the loop

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
class Networks:
    """G and D (wrapped for DDP/compile as configured), their optimisers and scalers."""
    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler


@dataclass
class Progress:
    """Where the run is: epochs finished, batches finished in the current epoch, and
    `sums`, the losses summed over those batches followed by their count (slot BATCHES)."""
    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    wandb_run_id: str = None
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(len(LOSS_NAMES) + 1))


BATCHES = len(LOSS_NAMES)  # the slot of Progress.sums that counts batches


def build_networks(cfg, model_cfg, resume, info, device, channels_last, precision):
    """G and D from the run's model config, with the checkpoint's weights and optimiser
    state when resuming. The RNG calls here come in a fixed order (weights, then the
    restored or per-rank RNG state), so a run is reproducible from its seed."""
    seed_everything(cfg.seed)
    generator, discriminator = build_generator(model_cfg), build_discriminator(model_cfg)
    if resume is not None:
        load_model_state(generator, resume["generator"], cfg.resume, "generator")
        load_model_state(discriminator, resume["discriminator"], cfg.resume, "discriminator")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = generator.to(device, memory_format=memory_format)
    discriminator = discriminator.to(device, memory_format=memory_format)

    lr = learning_rate(cfg, info)
    nets = Networks(generator, discriminator,
                    make_optimizer(generator.parameters(), lr, (cfg.beta1, cfg.beta2), device),
                    make_optimizer(discriminator.parameters(), lr, (cfg.beta1, cfg.beta2), device),
                    torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                    torch.amp.GradScaler(device.type, enabled=precision == "fp16"))
    if resume is not None:
        for name in ("opt_g", "opt_d", "scaler_g", "scaler_d"):
            getattr(nets, name).load_state_dict(resume[name])
        # load_state_dict brings back the saved lr; use this run's (--lr, --scale-lr x world size).
        for group in (*nets.opt_g.param_groups, *nets.opt_d.param_groups):
            group["lr"] = lr
        if resume.get("world_size", 1) == info.world_size:
            set_rng_state(resume["rng"][info.rank] if isinstance(resume["rng"], list) else resume["rng"])
    else:
        # Same weights on every rank (DDP also broadcasts rank 0's), different dropout noise.
        torch.manual_seed(cfg.seed + info.rank)
    nets.generator = maybe_compile(wrap_ddp(nets.generator, info, device), cfg.compile)
    nets.discriminator = maybe_compile(wrap_ddp(nets.discriminator, info, device), cfg.compile)
    return nets


def as_flags(model_cfg, keys):
    """Model config entries as the command-line flags that set them."""
    flags = []
    for key in keys:
        value = model_cfg[key]
        name = key.replace("_", "-")
        flags.append((f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}")
    return " ".join(flags)


def check_resume(cfg, model_cfg, resume):
    """A checkpoint resumes only the same networks on the same label set, with epochs left."""
    if resume is None:
        return
    saved = resume["model_config"]
    if saved["label_set"] != model_cfg["label_set"]:
        raise UserError(f"checkpoint {cfg.resume} is conditioned on the {saved['label_set']} "
                        f"label set, but {cfg.data_dir} gives {model_cfg['label_set']} masks")
    differ = [k for k in {**saved, **model_cfg} if saved.get(k) != model_cfg.get(k)]
    if differ:
        raise UserError(f"checkpoint {cfg.resume} was trained with {as_flags(saved, [k for k in differ if k in saved])}, "
                        f"but this run asks for {as_flags(model_cfg, [k for k in differ if k in model_cfg])}; leave "
                        f"out those flags to resume with the checkpoint's networks")
    check_epochs_left(cfg, resume)


def learning_rate(cfg, info):
    return cfg.lr * (info.world_size if cfg.scale_lr else 1)


def restore_progress(cfg, resume, info, log):
    """The counters and history a checkpoint carries (a fresh Progress without one)."""
    if resume is None:
        return Progress()
    progress = Progress(epoch=resume["epoch"], batches_done=resume["batches_done"], step=resume["step"],
                        history=list(resume["history"]), wandb_run_id=resume.get("wandb_run_id"))
    if progress.batches_done:
        if resume.get("world_size", 1) != info.world_size:
            log(f"note: resuming mid-epoch with a different world size; epoch {progress.epoch + 1} restarts")
            progress.batches_done = 0
        elif info.is_main:  # the saved sums are the whole job's: one rank carries them on
            progress.sums = resume["partial_sums"].clone()
    log(f"resumed from {cfg.resume}: epoch {progress.epoch + 1}, batch {progress.batches_done}, step {progress.step}")
    return progress


def checkpoint_state(cfg, model_cfg, nets, progress, sums, info, wandb_run_id):
    """Everything needed to resume, gathered from all ranks (a collective under DDP:
    every rank calls it). `sums` are this rank's loss sums for the current epoch."""
    rng = get_rng_state()
    if info.distributed:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, rng)
        rng = gathered
        sums = sums.clone()
        dist.all_reduce(sums)
    return {
        "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION,
        "generator": unwrap(nets.generator).state_dict(), "discriminator": unwrap(nets.discriminator).state_dict(),
        "opt_g": nets.opt_g.state_dict(), "opt_d": nets.opt_d.state_dict(),
        "scaler_g": nets.scaler_g.state_dict(), "scaler_d": nets.scaler_d.state_dict(),
        "epoch": progress.epoch, "batches_done": progress.batches_done, "step": progress.step,
        "partial_sums": sums.cpu(), "history": progress.history, "rng": rng, "world_size": info.world_size,
        "model_config": model_cfg, "config": vars(cfg), "wandb_run_id": wandb_run_id,
    }


def save_checkpoint(state, ckpt_dir, info, also_as=None):
    if info.is_main:
        atomic_save_torch(state, ckpt_dir / "last.pt")
        if also_as:
            atomic_save_torch(state, ckpt_dir / also_as)
    barrier()


def reduce_progress(sums, stop_requested, info, device):
    """The job's mean losses so far this epoch, and whether any rank was asked to stop:
    one all-reduce, and the loop's only host-device sync."""
    packed = torch.cat([sums, torch.tensor([float(stop_requested)], device=device)])
    if info.distributed:
        dist.all_reduce(packed)
    means = (packed[:BATCHES] / packed[BATCHES].clamp(min=1)).tolist()
    return dict(zip(LOSS_NAMES, means)), packed[BATCHES + 1].item() > 0


def train_epoch(cfg, nets, progress, loader, sampler, loader_rng, step_cfg, info, device, channels_last, stop,
                save, run, num_classes):
    """One epoch from progress.batches_done on; returns this rank's loss sums. A stop
    request saves last.pt mid-epoch and exits with status 143."""
    epoch = progress.epoch
    sampler.set_epoch(epoch, skip=progress.batches_done * cfg.batch_size)
    loader_rng.manual_seed(cfg.seed * 1000003 + epoch)
    nets.generator.train()
    nets.discriminator.train()
    sums = progress.sums.to(device)
    progress.sums = torch.zeros_like(progress.sums)
    epoch_batches = progress.batches_done + len(loader)
    # A lone process checks the (host-side) stop flag every step; under DDP all ranks
    # must agree on the step, so the flag travels with the --log-every reduction.
    check_every = cfg.log_every if info.distributed else 1
    with tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not info.is_main, dynamic_ncols=True,
              initial=progress.batches_done, total=epoch_batches) as bar:
        for labels, image in bar:
            mask, real = prepare_batch(labels, image, device, channels_last, num_classes)
            losses = gan_train_step(nets.generator, nets.discriminator, nets.opt_g, nets.opt_d, nets.scaler_g,
                                    nets.scaler_d, mask, real, step_cfg)
            sums[:BATCHES] += losses
            sums[BATCHES] += 1
            progress.step += 1
            progress.batches_done += 1
            last = progress.batches_done == epoch_batches
            if progress.step % cfg.log_every == 0 or last:
                means, stopping = reduce_progress(sums, stop.requested, info, device)
                bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in means.items()})
                if run is not None:
                    run.log({**{f"train/{k}": v for k, v in means.items()}, "epoch": epoch}, step=progress.step)
            elif progress.step % check_every == 0:
                stopping = stop.requested
            else:
                stopping = False
            if stopping:
                save(sums)
                last_pt = Path(cfg.out_dir) / "checkpoints" / "last.pt"
                if info.is_main:
                    print(f"stopped by signal; saved {last_pt} (epoch {epoch + 1}, batch {progress.batches_done}); "
                          f"continue with --resume {last_pt}")
                raise SystemExit(143)
            if cfg.save_every_steps and progress.step % cfg.save_every_steps == 0:
                save(sums)
    return sums


def end_of_epoch(cfg, nets, progress, sums, samples, labels, info, device, channels_last, autocast, save, run, log):
    """Epoch means into the history, checkpoints, the sample grid, the loss plot, wandb."""
    if info.distributed:
        dist.all_reduce(sums)
    means = (sums[:BATCHES] / sums[BATCHES].clamp(min=1)).tolist()
    progress.epoch += 1
    progress.batches_done = 0
    progress.history.append({"epoch": progress.epoch, **dict(zip(LOSS_NAMES, means))})
    keep = f"epoch_{progress.epoch:04d}.pt" if cfg.save_every and progress.epoch % cfg.save_every == 0 else None
    save(torch.zeros_like(progress.sums), also_as=keep)
    if not info.is_main:
        return
    out_dir = Path(cfg.out_dir)
    grid_path = out_dir / "samples" / f"epoch_{progress.epoch:04d}.png"
    if samples is not None:
        mask, real = prepare_batch(*samples, device, channels_last, labels.num_classes)
        fake = generate(unwrap(nets.generator), mask, autocast, "eval")
        atomic_save_png(triplet_grid(samples[0], real, fake, labels), grid_path)
    save_loss_plot(progress.history, out_dir / "loss_curves.png")
    log(f"epoch {progress.epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in zip(LOSS_NAMES, means))
        + f" | samples {grid_path}")
    if run is not None:
        log_epoch_to_wandb(run, means, grid_path, out_dir / "checkpoints" / "last.pt", progress)


def log_epoch_to_wandb(run, means, grid_path, last_checkpoint, progress):
    import wandb
    payload = {f"epoch/{k}": v for k, v in zip(LOSS_NAMES, means)}
    if grid_path.exists():
        payload["samples"] = wandb.Image(str(grid_path), caption="mask | real | fake")
    run.log({**payload, "epoch": progress.epoch}, step=progress.step)
    if run.settings.mode == "online":
        artifact = wandb.Artifact(f"{run.id}-checkpoint", type="model")
        artifact.add_file(str(last_checkpoint))
        run.log_artifact(artifact, aliases=["latest", f"epoch-{progress.epoch}"])


def run_training(cfg, resume, build_datasets, require_distributed=False):
    """Train G and D on the settled config `cfg` (config.settle_config), from `resume`
    (a checkpoint dict) when given. `build_datasets(cfg)` returns (train dataset,
    sample dataset); items are (labels uint8 (H, W), image uint8 (3, H, W))."""
    check_training_config(cfg)
    check_option_ranges(cfg, {"noise_dim": 0, "feat_match_lambda": 0, "labelmix_lambda": 0})
    with distributed(cfg.device, cfg.dist_timeout, cfg.channels_last, require=require_distributed) \
            as (info, device, channels_last), StopRequest() as stop:
        log = print if info.is_main else (lambda *a, **k: None)
        ckpt_dir = Path(cfg.out_dir) / "checkpoints"
        precision = resolve_precision(cfg.precision, device)
        autocast = autocast_context(device, precision)
        if info.is_main:
            prepare_run_dir(cfg.out_dir, resume is not None, cfg.overwrite)
            # Temp files left by a run killed while saving; the checkpoints themselves are intact.
            for stale in ckpt_dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        barrier()

        # --- data, and the networks it asks for
        train_set, sample_set = build_datasets(cfg)
        if len(train_set) == 0:
            raise UserError(f"no training images in {cfg.data_dir} with these options; nothing to train on")
        labels = train_set.label_set
        model_cfg = model_config(cfg, labels, train_set[0][0].shape[-1])
        check_resume(cfg, model_cfg, resume)
        check_model_config(model_cfg)
        sampler = SeededSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
        workers = loader_workers(cfg.workers, device)
        loader_rng = torch.Generator()
        loader = make_loader(train_set, cfg.batch_size, workers, device, sampler=sampler, generator=loader_rng)
        shown = [sample_set[i] for i in range(min(cfg.num_samples, len(sample_set)))]
        samples = tuple(map(torch.stack, zip(*shown))) if shown else None

        # --- networks and where the run stands
        nets = build_networks(cfg, model_cfg, resume, info, device, channels_last, precision)
        progress = restore_progress(cfg, resume, info, log)
        log(f"training on {len(train_set)} images, {info.world_size} process(es) on {device.type}, "
            f"precision {precision}, batch {cfg.batch_size} x {info.world_size} = "
            f"{cfg.batch_size * info.world_size} effective, lr {learning_rate(cfg, info):g}, {workers} loader worker(s)")
        run = init_wandb(cfg, progress.wandb_run_id) if info.is_main else None
        run_id = run.id if run is not None else progress.wandb_run_id
        step_cfg = step_config_from_args(cfg, autocast)

        def save(sums, also_as=None):
            save_checkpoint(checkpoint_state(cfg, model_cfg, nets, progress, sums, info, run_id), ckpt_dir, info,
                            also_as)

        # --- the epochs
        while progress.epoch < cfg.epochs:
            sums = train_epoch(cfg, nets, progress, loader, sampler, loader_rng, step_cfg, info, device,
                               channels_last, stop, save, run, labels.num_classes)
            end_of_epoch(cfg, nets, progress, sums, samples, labels, info, device, channels_last, autocast, save,
                         run, log)
        if run is not None:
            run.finish()
        log(f"done: {ckpt_dir / 'last.pt'}")


def train_main(dataset, add_data_args, out_dir, build_datasets, argv=None, require_distributed=False):
    """What each GAN entry point runs: settle the run's options (config.settle_config),
    then train. `add_data_args` and `build_datasets(cfg)` are the dataset's."""
    parser = training_parser(dataset, add_data_args, out_dir)
    cfg, resume = settle_config(parser, argv, read_resume_checkpoint, log=main_process_log)
    run_training(cfg, resume, build_datasets, require_distributed=require_distributed)
