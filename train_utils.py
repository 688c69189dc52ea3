"""The pix2pix training step and the epoch loop shared by train_pannuke.py,
train_utp.py and their _ddp twins.

One loop runs the same on one device and under torchrun (runtime.distributed).
Rank 0 alone writes checkpoints, sample grids, plots and wandb logs.
"""
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from config import RUN_OPTIONS
from figures import save_loss_plot, triplet_grid
from gan import (
    CHECKPOINT_KIND,
    CHECKPOINT_VERSION,
    build_discriminator,
    build_generator,
    generate,
    model_config_from_args,
    prepare_batch,
    read_checkpoint,
)
from runtime import (
    SeededSampler,
    autocast_context,
    barrier,
    distributed,
    load_model_state,
    loader_workers,
    make_loader,
    make_optimizer,
    maybe_compile,
    resolve_precision,
    unwrap,
    wrap_ddp,
)
from utils import (
    UserError,
    atomic_save_png,
    atomic_save_torch,
    get_rng_state,
    resolve_wandb_mode,
    seed_everything,
    set_rng_state,
)

LOSS_NAMES = ("loss_d", "loss_g_adv", "loss_l1")


# --------------------------------------------------------------------------- one step

@dataclass
class StepConfig:
    l1_lambda: float
    real_label_range: tuple
    fake_label_range: tuple
    smooth_real: bool
    smooth_fake: bool
    autocast: object


def discriminator_targets(logits, label_range, smooth, hard_value):
    if not smooth:
        return torch.full_like(logits, hard_value, dtype=torch.float32)
    lo, hi = label_range
    return torch.rand(logits.shape, device=logits.device).mul_(hi - lo).add_(lo)


def gan_train_step(generator, discriminator, opt_g, opt_d, scaler_g, scaler_d, mask, real, cfg):
    """One pix2pix update of D then G. Returns the three losses as one detached tensor
    (no host-device synchronisation here; the caller decides when to read them)."""
    bce = nn.functional.binary_cross_entropy_with_logits
    with cfg.autocast:
        fake = generator(mask)
        d_real = discriminator(mask, real)
        d_fake = discriminator(mask, fake.detach())
        loss_d = 0.5 * (bce(d_real.float(), discriminator_targets(d_real, cfg.real_label_range, cfg.smooth_real, 1.0))
                        + bce(d_fake.float(), discriminator_targets(d_fake, cfg.fake_label_range, cfg.smooth_fake, 0.0)))
    opt_d.zero_grad(set_to_none=True)
    scaler_d.scale(loss_d).backward()
    scaler_d.step(opt_d)
    scaler_d.update()

    # D's weights get no gradient in G's step: freezing them skips that work, and
    # calling the unwrapped D keeps DDP from expecting a gradient all-reduce.
    plain_d = unwrap(discriminator)
    plain_d.requires_grad_(False)
    with cfg.autocast:
        d_fake = plain_d(mask, fake)
        loss_adv = bce(d_fake.float(), torch.ones_like(d_fake, dtype=torch.float32))
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
                      smooth_fake=args.smooth_fake, autocast=autocast)


# --------------------------------------------------------------------------- wandb

def init_wandb(args, out_dir, run_id):
    mode = resolve_wandb_mode(args.wandb)
    if mode == "disabled":
        return None
    import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.run_name, id=run_id,
                     resume="allow" if run_id else None, dir=str(out_dir), mode=mode, config=vars(args))
    print(f"wandb: {mode} run {run.id} in {run.dir}" + (" (upload later with `wandb sync`)" if mode == "offline" else ""))
    return run


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


def take_run_options(args, saved, log, names=RUN_OPTIONS):
    """On resume, the run-defining options `names` that the command line does not give
    (args.options_given, from config.options_given) take the checkpoint's values."""
    taken = []
    for name in names:
        if name in saved and hasattr(args, name) and name not in args.options_given \
                and getattr(args, name) != saved[name]:
            setattr(args, name, saved[name])
            taken.append(f"--{name.replace('_', '-')} {saved[name]}")
    if taken:
        log(f"resume: as the checkpoint's run: {', '.join(taken)} (flags given on the command line win)")


def run_training(args, build_datasets, require_distributed=False):
    """Train G and D. `build_datasets(args)` returns (train dataset, sample dataset);
    items are (labels uint8 (H, W), image uint8 (3, H, W))."""
    with distributed(args.device, args.dist_timeout, args.channels_last, require=require_distributed) \
            as (info, device, args.channels_last), StopRequest() as stop:
        _train(args, build_datasets, info, device, stop)


def _train(args, build_datasets, info, device, stop):
    out_dir = Path(args.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    precision = resolve_precision(args.precision, device)
    autocast = autocast_context(device, precision)
    log = print if info.is_main else (lambda *a, **k: None)

    if info.is_main:
        # Temp files left by a run killed while saving; the checkpoints themselves are intact.
        for stale in ckpt_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    resume = read_checkpoint(args.resume) if args.resume else None
    if resume is not None:
        take_run_options(args, resume["config"], log)
    model_cfg = model_config_from_args(args)
    if resume is not None and resume["model_config"] != model_cfg:
        raise UserError(f"checkpoint {args.resume} was trained with {resume['model_config']}, but this run asks "
                        f"for {model_cfg}; leave out --ngf/--ndf/--norm/--dropout to resume with the checkpoint's")

    seed_everything(args.seed)
    generator = build_generator(model_cfg)
    discriminator = build_discriminator(model_cfg)
    if resume is not None:
        load_model_state(generator, resume["generator"], args.resume, "generator")
        load_model_state(discriminator, resume["discriminator"], args.resume, "discriminator")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    generator = generator.to(device, memory_format=memory_format)
    discriminator = discriminator.to(device, memory_format=memory_format)

    lr = args.lr * (info.world_size if args.scale_lr else 1)
    betas = (args.beta1, args.beta2)
    opt_g = make_optimizer(generator.parameters(), lr, betas, device)
    opt_d = make_optimizer(discriminator.parameters(), lr, betas, device)
    scaler_g = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scaler_d = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    start_epoch, skip_batches, history, run_id, step = 0, 0, [], None, 0
    partial_sums = torch.zeros(len(LOSS_NAMES) + 1)
    if resume is not None:
        opt_g.load_state_dict(resume["opt_g"])
        opt_d.load_state_dict(resume["opt_d"])
        # load_state_dict brings back the saved lr; use this run's (--lr, --scale-lr x world size).
        for group in (*opt_g.param_groups, *opt_d.param_groups):
            group["lr"] = lr
        scaler_g.load_state_dict(resume["scaler_g"])
        scaler_d.load_state_dict(resume["scaler_d"])
        start_epoch, skip_batches = resume["epoch"], resume["batches_done"]
        history, run_id, step = list(resume["history"]), resume.get("wandb_run_id"), resume["step"]
        if skip_batches:
            if resume.get("world_size", 1) != info.world_size:
                log(f"note: resuming mid-epoch with a different world size; epoch {start_epoch + 1} restarts")
                skip_batches = 0
            elif info.is_main:  # the saved sums are the whole job's: one rank carries them on
                partial_sums = resume["partial_sums"].clone()
        if resume.get("world_size", 1) == info.world_size:
            set_rng_state(resume["rng"][info.rank] if isinstance(resume["rng"], list) else resume["rng"])
        log(f"resumed from {args.resume}: epoch {start_epoch + 1}, batch {skip_batches}, step {step}")
    else:
        # Same weights on every rank (DDP also broadcasts rank 0's), different dropout noise.
        torch.manual_seed(args.seed + info.rank)

    generator = maybe_compile(wrap_ddp(generator, info, device), args.compile)
    discriminator = maybe_compile(wrap_ddp(discriminator, info, device), args.compile)

    train_set, sample_set = build_datasets(args)
    sampler = SeededSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed)
    workers = loader_workers(args.workers, device)
    loader_rng = torch.Generator()
    loader = make_loader(train_set, args.batch_size, workers, device, sampler=sampler, generator=loader_rng)
    samples = [sample_set[i] for i in range(min(args.num_samples, len(sample_set)))]
    sample_labels = torch.stack([s[0] for s in samples]) if samples else None
    sample_images = torch.stack([s[1] for s in samples]) if samples else None

    log(f"training on {len(train_set)} images, {info.world_size} process(es) on {device.type}, "
        f"precision {precision}, batch {args.batch_size} x {info.world_size} = "
        f"{args.batch_size * info.world_size} effective, lr {lr:g}, {workers} loader worker(s)")
    run = init_wandb(args, out_dir, run_id) if info.is_main else None
    step_cfg = step_config_from_args(args, autocast)

    def checkpoint_state(epoch, batches_done, sums):
        rng = get_rng_state()
        if info.distributed:
            gathered = [None] * info.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
            sums = sums.clone()
            dist.all_reduce(sums)
        return {
            "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION,
            "generator": unwrap(generator).state_dict(), "discriminator": unwrap(discriminator).state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "scaler_g": scaler_g.state_dict(), "scaler_d": scaler_d.state_dict(),
            "epoch": epoch, "batches_done": batches_done, "step": step, "partial_sums": sums.cpu(),
            "history": history, "rng": rng, "world_size": info.world_size,
            "model_config": model_cfg, "config": {k: v for k, v in vars(args).items()},
            "wandb_run_id": run.id if run is not None else run_id,
        }

    def save(epoch, batches_done, sums, also_as=None):
        state = checkpoint_state(epoch, batches_done, sums)  # collective under DDP: all ranks call
        if info.is_main:
            atomic_save_torch(state, ckpt_dir / "last.pt")
            if also_as:
                atomic_save_torch(state, ckpt_dir / also_as)
        barrier()

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, skip=skip_batches * args.batch_size)
        loader_rng.manual_seed(args.seed * 1000003 + epoch)
        generator.train()
        discriminator.train()
        sums = partial_sums.to(device)  # [loss_d, loss_g_adv, loss_l1, batches]
        partial_sums = torch.zeros_like(partial_sums)
        batches_done = skip_batches
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not info.is_main,
                   dynamic_ncols=True, initial=skip_batches, total=skip_batches + len(loader))
        epoch_batches = skip_batches + len(loader)  # not bar.initial: a disabled tqdm (ranks > 0) lacks it
        skip_batches = 0
        for labels, image in bar:
            mask, real = prepare_batch(labels, image, device, args.channels_last)
            losses = gan_train_step(generator, discriminator, opt_g, opt_d, scaler_g, scaler_d, mask, real, step_cfg)
            sums[:3] += losses
            sums[3] += 1
            step += 1
            batches_done += 1
            if step % args.log_every == 0 or batches_done == epoch_batches:
                # The only host-device sync in the loop, once every --log-every steps.
                flags = torch.tensor([float(stop.requested)], device=device)
                reduced = torch.cat([sums, flags])
                if info.distributed:
                    dist.all_reduce(reduced)
                means = (reduced[:3] / reduced[3]).tolist()
                bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in zip(LOSS_NAMES, means)})
                if run is not None:
                    run.log({**{f"train/{k}": v for k, v in zip(LOSS_NAMES, means)}, "epoch": epoch}, step=step)
                if reduced[4].item() > 0:
                    save(epoch, batches_done, sums)
                    log(f"stopped by signal; saved {ckpt_dir / 'last.pt'} (epoch {epoch + 1}, batch {batches_done}); "
                        f"continue with --resume {ckpt_dir / 'last.pt'}")
                    raise SystemExit(143)
            if args.save_every_steps and step % args.save_every_steps == 0:
                save(epoch, batches_done, sums)
        bar.close()

        if info.distributed:
            dist.all_reduce(sums)
        means = (sums[:3] / sums[3].clamp(min=1)).tolist()
        history.append({"epoch": epoch + 1, **dict(zip(LOSS_NAMES, means))})
        keep = f"epoch_{epoch + 1:04d}.pt" if args.save_every and (epoch + 1) % args.save_every == 0 else None
        save(epoch + 1, 0, torch.zeros_like(partial_sums), also_as=keep)
        if info.is_main:
            grid_path = out_dir / "samples" / f"epoch_{epoch + 1:04d}.png"
            if sample_labels is not None:
                mask, real = prepare_batch(sample_labels, sample_images, device, args.channels_last)
                fake = generate(unwrap(generator), mask, autocast, "eval")
                atomic_save_png(triplet_grid(sample_labels, real, fake), grid_path)
            save_loss_plot(history, out_dir / "loss_curves.png")
            log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in zip(LOSS_NAMES, means))
                + f" | samples {grid_path}")
            if run is not None:
                import wandb
                payload = {f"epoch/{k}": v for k, v in zip(LOSS_NAMES, means)}
                if grid_path.exists():
                    payload["samples"] = wandb.Image(str(grid_path), caption="mask | real | fake")
                run.log({**payload, "epoch": epoch + 1}, step=step)
                if run.settings.mode == "online":
                    artifact = wandb.Artifact(f"{run.id}-checkpoint", type="model")
                    artifact.add_file(str(ckpt_dir / "last.pt"))
                    run.log_artifact(artifact, aliases=["latest", f"epoch-{epoch + 1}"])
    if run is not None:
        run.finish()
    log(f"done: {ckpt_dir / 'last.pt'}")
