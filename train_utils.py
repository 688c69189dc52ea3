"""The training loop shared by train_pannuke.py, train_utp.py and their _ddp twins.

One loop runs the same on one device and under torchrun: `setup_distributed` reads
RANK / LOCAL_RANK / WORLD_SIZE from the environment when they are there. Rank 0
alone writes checkpoints, sample grids, plots and wandb logs.
"""
import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from config import RUN_OPTIONS
from dataset.masks import NUM_CLASSES, labels_to_onehot, labels_to_rgb
from discriminator_model import Discriminator
from generator_model import Generator, init_weights
from utils import (UserError, atomic_torch_save, atomic_write, get_rng_state, load_checkpoint_of_kind,
                   resolve_wandb_mode, save_loss_plot, seed_everything, set_rng_state)

CHECKPOINT_KIND = "he-pix2pix"
CHECKPOINT_VERSION = 1
LOSS_NAMES = ("loss_d", "loss_g_adv", "loss_l1")


# --------------------------------------------------------------------------- devices

@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device_arg, timeout_minutes, require=False):
    """Start the process group when launched by torchrun; pick this process's device."""
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("WORLD_SIZE", 1)))
    if require and "RANK" not in os.environ:
        raise UserError("this script is meant to be started by torchrun, e.g. "
                        "`torchrun --nproc_per_node=NUM_GPUS ...`; use the script without _ddp for one device")
    device = resolve_device(device_arg, info.local_rank)
    if info.distributed or "RANK" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return info, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def resolve_device(device_arg, local_rank=0):
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is visible to PyTorch")
    if device_arg in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_channels_last(flag, device):
    """--channels-last unset: NHWC on CUDA, where tensor-core convolutions want it; NCHW
    on CPU, where NHWC weights cost layout copies in the optimiser and weight gradients."""
    return device.type == "cuda" if flag is None else flag


def cpu_has_fast_bf16():
    """bf16 autocast on CPU only pays with native bf16 instructions; elsewhere it is
    emulated and far slower than fp32 (0.3 vs 156 GFLOP/s measured on an AVX2-only EPYC)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(precision, device):
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return precision


def autocast_context(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def loader_workers(requested, device):
    """--workers when given (>= 0); for -1, a count from the cores this node gives
    each process (torchrun's LOCAL_WORLD_SIZE of them)."""
    if requested >= 0:
        return requested
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = max(1, cpus // max(1, local_world_size))
    if device.type == "cuda":
        return min(8, per_process)
    # On small CPUs the workers would steal cores from the training step itself.
    return 0 if per_process <= 4 else min(4, per_process // 2)


# --------------------------------------------------------------------------- data

class SeededSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (index, augmentation seed) pairs.

    The seed is a function of (run seed, epoch, index), so an item's augmentation is
    the same whatever the worker count, world size, or resume point. `set_epoch`
    also takes how many of this process's items to skip (resuming mid-epoch).
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        base = np.random.SeedSequence([self.seed, self.epoch])
        seeds = base.generate_state(len(self.dataset), dtype=np.uint32)
        return iter([(i, int(seeds[i])) for i in indices])

    def __len__(self):
        # skip = batches done x batch size can pass the end when the last batch was partial.
        return max(0, super().__len__() - self.skip)


def make_loader(dataset, batch_size, workers, device, sampler=None, generator=None):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=False, generator=generator,
        persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


def prepare_batch(labels, image, device, channels_last=True):
    """uint8 class map + uint8 image from the loader -> one-hot mask and [-1, 1] image on device.

    Items holding several crops, (B, K, H, W) and (B, K, 3, H, W), become a batch of B*K."""
    labels = labels.reshape(-1, *labels.shape[-2:])
    image = image.reshape(-1, *image.shape[-3:])
    labels = labels.to(device, non_blocking=True)
    image = image.to(device, non_blocking=True)
    mask = labels_to_onehot(labels)
    real = image.float().div_(127.5).sub_(1.0)
    if channels_last:
        mask = mask.contiguous(memory_format=torch.channels_last)
        real = real.contiguous(memory_format=torch.channels_last)
    return mask, real


# --------------------------------------------------------------------------- models

def model_config_from_args(args):
    return dict(ngf=args.ngf, ndf=args.ndf, norm=args.norm, dropout=args.dropout)


def build_generator(cfg):
    return init_weights(Generator(NUM_CLASSES, 3, ngf=cfg["ngf"], norm=cfg["norm"], dropout=cfg["dropout"]))


def build_discriminator(cfg):
    return init_weights(Discriminator(NUM_CLASSES, 3, ndf=cfg["ndf"], norm=cfg["norm"]))


def unwrap(model):
    """The plain module behind DDP and/or torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def strip_module_prefix(state_dict):
    """Checkpoints from older DDP code saved `module.`-prefixed keys; accept them."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_model_state(model, state_dict, path, what):
    try:
        model.load_state_dict(strip_module_prefix(state_dict))
    except RuntimeError as exc:
        # The first line only says "Error(s) in loading state_dict"; the next names a mismatch.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(f"checkpoint {path} does not fit this {what}: {detail}") from None


def read_checkpoint(path):
    """Load and check a pix2pix checkpoint of this project (weights_only=True)."""
    return load_checkpoint_of_kind(path, CHECKPOINT_KIND)


def load_generator(path, device):
    """Rebuild the generator a checkpoint describes and load its weights."""
    ckpt = read_checkpoint(path)
    generator = build_generator(ckpt["model_config"])
    load_model_state(generator, ckpt["generator"], path, f"generator ({ckpt['model_config']})")
    return generator.to(device), ckpt


def wrap_ddp(model, info, device):
    """DistributedDataParallel under torchrun, the model itself otherwise. On CUDA,
    BatchNorm becomes SyncBatchNorm first, so statistics cover the global batch (it
    rejects CPU modules, so on CPU each process normalises its own share). The
    conversion keeps the Parameter objects, so optimisers made earlier still hold them."""
    if not info.distributed:
        return model
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(model),
                                                   device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(model)


def maybe_compile(model, enabled):
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as exc:  # compilation is an optimisation: never fatal
        print(f"warning: torch.compile failed ({exc}); running eagerly")
        return model


def make_optimizer(params, lr, betas, device):
    # Fused Adam does the whole update in one kernel; fall back where unsupported.
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=device.type == "cuda")


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


# --------------------------------------------------------------------------- figures

def to_uint8_image(tensor):
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    return ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def triplet_grid(labels, real, fake, gap=4):
    """Rows of mask (palette) | real | fake, as one uint8 image."""
    rows = []
    for lab, r, f in zip(labels, real, fake):
        tiles = [labels_to_rgb(lab.cpu().numpy()), to_uint8_image(r), to_uint8_image(f)]
        spacer = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([tiles[0], spacer, tiles[1], spacer, tiles[2]], axis=1))
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([x for row in rows for x in (row, spacer)][:-1], axis=0)


def save_png(array, path):
    from PIL import Image
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


@torch.no_grad()
def generate(generator, mask, autocast, norm_mode="eval"):
    """Run the generator with an explicit normalisation mode, restoring its state.

    eval: running BatchNorm statistics and no dropout (deterministic); train: batch
    statistics and dropout as in the pix2pix paper, without touching the running
    statistics stored in the model.
    """
    was_training = generator.training
    # Only train mode updates BatchNorm's running statistics: keep them to put back.
    saved = {k: v.clone() for k, v in generator.state_dict().items()
             if norm_mode == "train" and ("running_" in k or "num_batches" in k)}
    generator.train(norm_mode == "train")
    with autocast:
        fake = generator(mask).float()
    if saved:
        generator.load_state_dict(saved, strict=False)
    generator.train(was_training)
    return fake


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
    info, device = setup_distributed(args.device, args.dist_timeout, require=require_distributed)
    args.channels_last = resolve_channels_last(args.channels_last, device)
    try:
        with StopRequest() as stop:
            _train(args, build_datasets, info, device, stop)
    finally:
        cleanup_distributed()


def _train(args, build_datasets, info, device, stop):
    out_dir = Path(args.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    precision = resolve_precision(args.precision, device)
    autocast = autocast_context(device, precision)
    log = print if info.is_main else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

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
            atomic_torch_save(state, ckpt_dir / "last.pt")
            if also_as:
                atomic_torch_save(state, ckpt_dir / also_as)
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
                save_png(triplet_grid(sample_labels, real, fake), grid_path)
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
