"""The GAN training step and the epoch loop shared by train_pannuke.py, train_utp.py,
train_conic.py, train_folder.py and their _ddp twins. The step's losses are in losses.py.

One loop runs the same on one device and under torchrun (runtime.distributed).
Rank 0 alone writes checkpoints, sample grids, plots and wandb logs. A run can end on a
time budget (--budget-minutes) and keep its best generator by a realism score (--eval-every).
"""
import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from config import (EMA_BATCHNORM_BATCH_SIZE, EMA_BATCHNORM_BATCHES, EVAL_BATCH_SIZE, EVAL_FEATURE_WIDTH, EVAL_SEED,
                    EVAL_TILES, GAN_OPTIONS, INSTANCE_DATASETS, R1_INTERVAL, check_budget_left, check_epochs_left,
                    check_training_config, flag_text, gan_values, settle_config, training_parser)
from augment import DiscriminatorAugment
from dataset.masks import get_label_set
from ema import GeneratorEMA, recompute_batchnorm_stats
from gan import (CHECKPOINT_KIND, CHECKPOINT_VERSION, build_discriminator, build_generator, check_model_config, generate,
                 model_config, prepare_batch, prepare_mask, read_resume_checkpoint)
from losses import LOSSES, lowpass_l1, r1_penalty
from loop import Loop, StopRequest
from metrics import frechet_distance
from report import save_loss_plot, triplet_grid
from runtime import (SeededSampler, autocast_context, claim_run_dir, distributed, init_wandb, load_model_state,
                     loader_workers, main_process_log, make_loader, make_optimizer, maybe_compile,
                     resolve_precision, unwrap, wrap_ddp)
from segmenter import build_segmenter
from utils import UserError, atomic_save_png, seed_everything

LOSS_NAMES = ("loss_d", "loss_g_adv", "loss_l1")


# --------------------------------------------------------------------------- one step

class StepConfig(SimpleNamespace):
    """What the losses (losses.py) need: every "losses" option of config.GAN_OPTIONS
    (the label ranges as tuples) and the autocast context."""

    def __init__(self, autocast=contextlib.nullcontext(), options=None, **overrides):
        defaults = {o.name: o.default for o in GAN_OPTIONS if o.group == "losses"}
        given = gan_values(options, ("losses",)) if options is not None else {}
        super().__init__(**{**defaults, **given, **overrides}, autocast=autocast)


def gan_train_step(nets, mask, real, cfg, step=1):
    """One update of D then G with the losses of D's kind (losses.LOSSES), D's inputs
    augmented by nets.augment (--d-augment) in both, and every R1_INTERVAL-th `step` the
    R1 penalty (--r1-gamma). Returns (loss_d, loss_g_adv, loss_l1) as one detached tensor
    (no host-device synchronisation here; the caller decides when to read them).
    LabelMix and R1 are part of loss_d, feature matching part of loss_g_adv."""
    d_loss, g_adv_loss = LOSSES[unwrap(nets.discriminator).kind]
    # D's weights get no gradient outside D's own loss: calling the unwrapped D there keeps
    # DDP from expecting an all-reduce for it.
    plain_d = unwrap(nets.discriminator)
    with cfg.autocast:
        fake = nets.generator(mask)
        d_inputs = nets.augment(mask, real, fake.detach())
        loss_d = d_loss(nets.discriminator, *d_inputs, cfg)
    if nets.augment.ada is not None:
        with torch.no_grad(), cfg.autocast:
            nets.augment.observe(discriminator_logits(plain_d(*d_inputs[:2])), len(mask))
    if cfg.r1_gamma and step % R1_INTERVAL == 0:
        loss_d = loss_d + cfg.r1_gamma / 2 * R1_INTERVAL * r1_term(nets, mask, real)
    nets.opt_d.zero_grad(set_to_none=True)
    nets.scaler_d.scale(loss_d).backward()
    nets.scaler_d.step(nets.opt_d)
    nets.scaler_d.update()

    # Freezing D's weights in G's step skips their gradients.
    plain_d.requires_grad_(False)
    with cfg.autocast:
        loss_adv = g_adv_loss(plain_d, *nets.augment(mask, real, fake), cfg)
        loss_l1 = lowpass_l1(fake, real, cfg.l1_lowpass) * cfg.l1_lambda
        loss_g = loss_adv + loss_l1
    nets.opt_g.zero_grad(set_to_none=True)
    nets.scaler_g.scale(loss_g).backward()
    nets.scaler_g.step(nets.opt_g)
    nets.scaler_g.update()
    plain_d.requires_grad_(True)
    return torch.stack([loss_d.detach(), loss_adv.detach(), loss_l1.detach()]).float()


# --------------------------------------------------------------------------- the loop

@dataclass
class Networks:
    """G and D (wrapped for DDP/compile as configured), their optimisers and scalers; with
    --ema-half-life G's moving average and the training masks (one-hot batches, made on
    demand) its BatchNorm statistics are re-estimated from; D's input augmentation."""
    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    ema: GeneratorEMA = None
    ema_masks: Callable[[], Iterable[torch.Tensor]] = None
    augment: DiscriminatorAugment = field(default_factory=lambda: DiscriminatorAugment("none", 0, "cpu"))
    calibrated_at: int = -1  # the average's images_seen when its BatchNorm statistics were last estimated

    def painter(self):
        """The generator that paints samples and checkpoints: the average, with BatchNorm
        statistics of its own (ema.py says why; re-estimated once per update, not per use),
        or the raw G."""
        if self.ema is None:
            return unwrap(self.generator)
        if self.calibrated_at != self.ema.images_seen:
            recompute_batchnorm_stats(self.ema.model, self.ema_masks())
            self.calibrated_at = self.ema.images_seen
        return self.ema.model

    def ema_state(self):
        """The average as a checkpoint holds it, BatchNorm statistics re-estimated."""
        self.painter()
        return self.ema.state_dict()


def ema_mask_batches(train_set, device, channels_last, num_classes, edges=False):
    """A function giving the fixed training masks the average's BatchNorm statistics are
    re-estimated from, as one-hot batches of at least two (BatchNorm's minimum). The masks are
    spread evenly over the training set: its first tiles often come from a few source images,
    and statistics from those made the average paint saturated noise on lizard_128."""
    count = min(len(train_set), EMA_BATCHNORM_BATCHES * EMA_BATCHNORM_BATCH_SIZE)
    labels = [train_set[int(i)][0] for i in np.linspace(0, len(train_set) - 1, count).round()]
    batches = [torch.stack(labels[i:i + EMA_BATCHNORM_BATCH_SIZE])
               for i in range(0, count, EMA_BATCHNORM_BATCH_SIZE)]
    batches = [b for b in batches if b[..., 0, 0].numel() >= 2]
    return lambda: (prepare_mask(b, device, channels_last, num_classes, edges) for b in batches)


def discriminator_logits(output):
    """D's logits from its output: a patch D's tensor, or a multiscale D's last feature per scale."""
    return [scale[-1] for scale in output] if isinstance(output, list) else output


def r1_term(nets, mask, real):
    """R1 on D's (augmented) real inputs, in fp32 (a gradient of a gradient)."""
    real = real.detach().float().requires_grad_(True)
    return r1_penalty(unwrap(nets.discriminator)(*nets.augment(mask, real)), real)


def build_networks(cfg, model_cfg, resume, info, device, channels_last, precision):
    """G and D from the run's model config, with the checkpoint's weights and optimiser
    state when resuming. The RNG calls here come in a fixed order (weights, then the
    per-rank RNG state of a fresh run; Loop.restore restores a resumed one's), so a
    run is reproducible from its seed."""
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
        set_lr(nets, lr)
    else:
        # Same weights on every rank (DDP also broadcasts rank 0's), different dropout noise.
        torch.manual_seed(cfg.seed + info.rank)
    if cfg.ema_half_life:
        nets.ema = GeneratorEMA(generator, cfg.ema_half_life, cfg.ema_rampup or None)
        if resume is not None and "generator_ema" in resume:  # else the average starts from the resumed G
            nets.ema.load_state_dict(resume["generator_ema"])
    # OASIS scores every pixel by its class: cutout's pixels of no class have no target.
    nets.augment = DiscriminatorAugment(cfg.d_augment, cfg.seed * 1000003 + info.rank, device,
                                        exclude=("cutout",) if model_cfg["discriminator"] == "oasis" else ())
    if resume is not None and "d_augment" in resume:
        nets.augment.load_state_dict(resume["d_augment"])
    nets.generator = maybe_compile(wrap_ddp(nets.generator, info, device), cfg.compile)
    nets.discriminator = maybe_compile(wrap_ddp(nets.discriminator, info, device), cfg.compile)
    return nets


def check_resume(cfg, model_cfg, resume):
    """A checkpoint resumes only the same networks on the same label set, with epochs left."""
    if resume is None:
        return
    saved = resume["model_config"]
    saved_classes, data_classes = get_label_set(saved["label_set"]), get_label_set(model_cfg["label_set"])
    if not saved_classes.same_classes(data_classes):
        raise UserError(f"checkpoint {cfg.resume} is conditioned on the {saved_classes.describe()}, but "
                        f"{cfg.data_dir} gives {data_classes.name} masks (the {data_classes.describe()})")
    differ = [k for k in {**saved, **model_cfg} if k != "label_set" and saved.get(k) != model_cfg.get(k)]
    if differ:
        def flags(record):
            return " ".join(flag_text(k, record[k]) for k in differ if k in record)
        raise UserError(f"checkpoint {cfg.resume} was trained with {flags(saved)}, but this run asks for "
                        f"{flags(model_cfg)}; leave out those flags to resume with the checkpoint's networks")
    check_epochs_left(cfg, resume)
    check_budget_left(cfg, resume)


def learning_rate(cfg, info):
    return cfg.lr * (info.world_size if cfg.scale_lr else 1)


def set_lr(nets, lr):
    for group in (*nets.opt_g.param_groups, *nets.opt_d.param_groups):
        group["lr"] = lr


def budget_lr_factor(seconds, budget_seconds):
    """The share of the learning rate a --budget-minutes run steps with after `seconds` of training:
    1 over the first half of the budget, then linearly down to 0 at its end (pix2pix's n_epochs_decay,
    in time instead of epochs)."""
    return min(1.0, max(0.0, (budget_seconds - seconds) / (budget_seconds / 2)))


# --------------------------------------------------------------------------- the best generator (--eval-every)

class RealismProbe:
    """--eval-every's score of a generator: the Frechet distance (metrics.frechet_distance) between the
    fixed held-out tiles and the generator's paintings of their masks (eval mode, noise seeded per tile),
    in the pooled encoder features (Segmenter.pooled_features) of an untrained segmenter built from
    EVAL_SEED. There are no downloadable weights to score with here, and a network trained during the run
    would move its own yardstick; random features fixed by a seed score every step of a run, and of its
    resumes, in the same space. Lower is better; the numbers compare only within one run."""

    def __init__(self, items, num_classes, device, channels_last, autocast, edges=False):
        self.num_classes, self.device, self.channels_last, self.autocast = num_classes, device, channels_last, autocast
        self.edges = edges
        with torch.random.fork_rng(devices=[]):  # leaves the training run's random stream as it was
            torch.manual_seed(EVAL_SEED)
            self.net = build_segmenter({"encoder": "unet", "width": EVAL_FEATURE_WIDTH})
            # He initialisation keeps the features' scale through the untrained layers (PyTorch's default
            # shrinks it about threefold per layer), so the distances come out as readable numbers.
            for module in self.net.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.net = self.net.eval().to(device)
        labels, images = map(torch.stack, zip(*items))
        self.batches = list(zip(labels.split(EVAL_BATCH_SIZE), images.split(EVAL_BATCH_SIZE)))
        self.real = torch.cat([self.features(prepare_batch(*batch, device, channels_last, num_classes)[1])
                               for batch in self.batches])

    @torch.no_grad()
    def features(self, images):
        """(N, D) float64 features of images in [-1, 1], in fp32 whatever the run's precision."""
        return self.net.pooled_features(images.float().add(1).div(2)).double().cpu()

    def score(self, generator):
        fakes, start = [], 0
        for labels, _ in self.batches:
            mask = prepare_mask(labels, self.device, self.channels_last, self.num_classes, self.edges)
            seeds = range(start, start + len(mask))
            fakes.append(self.features(generate(generator, mask, self.autocast, "eval", seeds)))
            start += len(mask)
        return frechet_distance(self.real, torch.cat(fakes))


@dataclass
class Best:
    """The lowest --eval-every score so far and the step it came at (every checkpoint carries both, so a
    resumed run keeps them), and the step last scored."""
    score: float = None
    step: int = None
    scored_at: int = None

    @classmethod
    def from_checkpoint(cls, resume):
        return cls() if resume is None else cls(resume.get("best_realism_fd"), resume.get("best_step"))

    def offer(self, score, step):
        """Whether `score` at `step` is a new best (and if so, keep it)."""
        self.scored_at = step
        if math.isfinite(score) and (self.score is None or score < self.score):
            self.score, self.step = score, step
            return True
        return False

    def state(self):
        return {} if self.score is None else {"best_realism_fd": self.score, "best_step": self.step}


def evaluate(loop, nets, probe, best, position, sums, run):
    """Score the painter on rank 0 (the other ranks get the score, so that all of them write best.pt or
    none: saving is a collective), log it, and write checkpoints/best.pt when the score improves."""
    info = loop.info
    score = probe.score(nets.painter()) if info.is_main else 0.0
    if info.distributed:
        shared = torch.tensor([score], dtype=torch.float64, device=loop.device)
        dist.broadcast(shared, 0)
        score = shared.item()
    improved = best.offer(score, position.step)
    if improved:
        loop.save(position, sums, also_as="best.pt", last=False)
    if info.is_main:
        kept = f"best {best.score:.4g} at step {best.step}" if best.score is not None else "no best yet"
        tqdm.write(f"step {position.step}: eval/realism_fd {score:.4g} ({kept})"  # below the progress bar
                   + (f"; saved {loop.last_checkpoint.parent / 'best.pt'}" if improved else ""))
        if run is not None:
            run.log({"eval/realism_fd": score, **({"eval/best_realism_fd": best.score} if best.score is not None
                                                   else {})}, step=position.step)


def gan_payload(cfg, model_cfg, nets, channels_last, best):
    """The GAN's own checkpoint entries (loop.Loop adds the position and RNG state), with the
    memory layout --channels-last resolved to and the best --eval-every score so far."""
    return {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION,
            "generator": unwrap(nets.generator).state_dict(), "discriminator": unwrap(nets.discriminator).state_dict(),
            "opt_g": nets.opt_g.state_dict(), "opt_d": nets.opt_d.state_dict(),
            "scaler_g": nets.scaler_g.state_dict(), "scaler_d": nets.scaler_d.state_dict(),
            "model_config": model_cfg, "config": vars(cfg), "channels_last": channels_last,
            **({"generator_ema": nets.ema_state()} if nets.ema is not None else {}),
            **({"d_augment": nets.augment.state_dict()} if nets.augment.mode != "none" else {}), **best.state()}


@dataclass
class Samples:
    """The fixed test items each epoch's grid paints, and how to paint them."""
    items: tuple
    labels: object
    device: torch.device
    channels_last: bool
    autocast: object
    edges: bool = False   # the instance-edge channel (model config's instance_edges)


def epoch_extras(nets):
    return {"d_augment_p": nets.augment.p} if nets.augment.ada is not None else None


def end_of_epoch(cfg, loop, nets, position, sums, samples, run):
    """Epoch means into the history, checkpoints, the sample grid, the loss plot, wandb."""
    means = loop.end_epoch(position, sums, epoch_extras(nets))
    keep = f"epoch_{position.epoch:04d}.pt" if cfg.save_every and position.epoch % cfg.save_every == 0 else None
    loop.save(position, loop.zeros(), also_as=keep)
    epoch_outputs(cfg, loop, nets, position, position.epoch, means, position.history, samples, run)


def end_of_budget(cfg, loop, nets, position, sums, samples, run):
    """The budget ran out inside an epoch: last.pt where the run stands (a resume with a larger budget goes on
    from there), then what an epoch's end writes, for the epoch so far (the loss plot ends with its means)."""
    means = loop.reduce(sums, False)[0]
    loop.save(position, sums)
    partial = {"epoch": position.epoch + 1, **means, **(epoch_extras(nets) or {})}
    epoch_outputs(cfg, loop, nets, position, position.epoch + 1, means, position.history + [partial], samples, run,
                  f" (to batch {position.batches_done})")


def epoch_outputs(cfg, loop, nets, position, epoch, means, history, samples, run, note=""):
    """Rank 0: the sample grid of `epoch`, the loss plot of `history`, the console line, wandb."""
    if not loop.info.is_main:
        return
    out_dir = Path(cfg.out_dir)
    grid_path = out_dir / "samples" / f"epoch_{epoch:04d}.png"
    if samples.items is not None:
        mask, real = prepare_batch(*samples.items, samples.device, samples.channels_last, samples.labels.num_classes,
                                   samples.edges)
        fake = generate(nets.painter(), mask, samples.autocast, "eval")
        atomic_save_png(triplet_grid(samples.items[0], real, fake, samples.labels), grid_path)
    save_loss_plot(history, out_dir / "loss_curves.png")
    print(f"epoch {epoch}{note}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
          + f" | samples {grid_path}")
    if run is not None:
        log_epoch_to_wandb(run, means, grid_path, loop.last_checkpoint, position)


def log_epoch_to_wandb(run, means, grid_path, last_checkpoint, progress):
    import wandb
    payload = {f"epoch/{k}": v for k, v in means.items()}
    if grid_path.exists():
        payload["samples"] = wandb.Image(str(grid_path), caption="mask | real | fake")
    run.log({**payload, "epoch": progress.epoch}, step=progress.step)
    if run.settings.mode == "online":
        artifact = wandb.Artifact(f"{run.id}-checkpoint", type="model")
        artifact.add_file(str(last_checkpoint))
        run.log_artifact(artifact, aliases=["latest", f"epoch-{progress.epoch}"])


def run_training(cfg, resume, build_datasets, require_distributed=False, folder_owned=False):
    """Train G and D on the settled config `cfg` (config.settle_config), from `resume`
    (a checkpoint dict) when given. `build_datasets(cfg)` returns (train dataset,
    sample dataset); items are (labels uint8 (H, W), image uint8 (3, H, W)).
    `folder_owned`: the caller (a study) already claimed the folder around cfg.out_dir."""
    check_training_config(cfg)
    with distributed(cfg.device, cfg.dist_timeout, cfg.channels_last, require=require_distributed) \
            as (info, device, channels_last), StopRequest() as stop:
        log = print if info.is_main else (lambda *a, **k: None)
        ckpt_dir = Path(cfg.out_dir) / "checkpoints"
        precision = resolve_precision(cfg.precision, device)
        autocast = autocast_context(device, precision)
        if cfg.instance_edges and cfg.dataset not in INSTANCE_DATASETS:
            raise UserError(f"--instance-edges needs nucleus instance maps, which {cfg.data_dir} ({cfg.dataset} "
                            f"data) does not have; CoNIC and PanNuke data do")
        with (contextlib.nullcontext() if folder_owned else claim_run_dir(cfg, "GAN training", resume, info)) as folder:
            # --- data, and the networks it asks for
            train_set, sample_set = build_datasets(cfg)
            if len(train_set) == 0:
                raise UserError(f"no training images in {cfg.data_dir} with these options; nothing to train on")
            labels, edges = train_set.label_set, cfg.instance_edges
            model_cfg = model_config(cfg, labels, train_set[0][0].shape[-1])
            check_resume(cfg, model_cfg, resume)
            check_model_config(model_cfg)
            if model_cfg["discriminator"] == "oasis" and (cfg.d_augment == "ada" or cfg.r1_gamma):
                raise UserError("--d-augment ada and --r1-gamma read a real/fake score per patch, which the OASIS "
                                "discriminator does not give: use them with --discriminator patch or multiscale")
            sampler = SeededSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed)
            workers = loader_workers(cfg.workers, device)
            loader_rng = torch.Generator()
            loader = make_loader(train_set, cfg.batch_size, workers, device, sampler=sampler, generator=loader_rng)
            shown = [sample_set[i] for i in range(min(cfg.num_samples, len(sample_set)))]
            samples = Samples(tuple(map(torch.stack, zip(*shown))) if shown else None, labels, device, channels_last,
                              autocast, edges)
            probe = None
            if cfg.eval_every:
                held_out = [sample_set[i] for i in range(min(EVAL_TILES, len(sample_set)))]
                if len(held_out) < 2:
                    raise UserError(f"--eval-every compares the painted and real held-out tiles, and needs at "
                                    f"least 2 of them; {cfg.data_dir} gives {len(held_out)} with these options")
                if info.is_main:  # rank 0 alone paints and scores; evaluate shares the score
                    probe = RealismProbe(held_out, labels.num_classes, device, channels_last, autocast, edges)

            # --- networks and where the run stands
            nets = build_networks(cfg, model_cfg, resume, info, device, channels_last, precision)
            if nets.ema is not None:
                nets.ema_masks = ema_mask_batches(train_set, device, channels_last, labels.num_classes, edges)
            best = Best.from_checkpoint(resume)
            loop = Loop(cfg.out_dir, info, device, LOSS_NAMES,
                        lambda: gan_payload(cfg, model_cfg, nets, channels_last, best), stop, cfg.log_every,
                        cfg.save_every_steps, run_id=folder and folder.run_id, budget_seconds=cfg.budget_minutes * 60)
            position = loop.restore(resume, cfg.resume, log)
            log(f"training on {len(train_set)} images, {info.world_size} process(es) on {device.type}, "
                f"precision {precision}, {'channels_last' if channels_last else 'NCHW'}, batch {cfg.batch_size} x "
                f"{info.world_size} = {cfg.batch_size * info.world_size} effective, lr {learning_rate(cfg, info):g}, "
                f"{workers} loader worker(s)")
            if cfg.budget_minutes:
                log(f"budget: {cfg.budget_minutes:g} min of training time, {position.seconds / 60:.2f} used; the lr "
                    f"decays linearly to 0 over the last {cfg.budget_minutes / 2:g} min; --epochs {cfg.epochs} at most")
            run = init_wandb(cfg, position.wandb_run_id) if info.is_main else None
            if run is not None:
                position.wandb_run_id = run.id
            step_cfg = StepConfig(autocast, cfg)

            def schedule_lr():
                if cfg.budget_minutes:
                    set_lr(nets, learning_rate(cfg, info) * budget_lr_factor(position.seconds, loop.budget_seconds))

            def step(batch):
                schedule_lr()
                mask, real = prepare_batch(*batch, device, channels_last, labels.num_classes, edges)
                losses = gan_train_step(nets, mask, real, step_cfg, position.step + 1)
                if nets.ema is not None:
                    nets.ema.update(unwrap(nets.generator), len(mask))
                return losses

            def log_losses(means):
                if run is not None:
                    logged = {**means, **(epoch_extras(nets) or {})}
                    run.log({**{f"train/{k}": v for k, v in logged.items()}, "epoch": position.epoch}, step=position.step)

            def after_step(sums):
                if cfg.eval_every and position.step % cfg.eval_every == 0:
                    evaluate(loop, nets, probe, best, position, sums, run)

            # --- the epochs
            while position.epoch < cfg.epochs and not loop.out_of_time(position):
                loader_rng.manual_seed(cfg.seed * 1000003 + position.epoch)
                nets.generator.train()
                nets.discriminator.train()
                sums = loop.epoch(position, loader, sampler, step, f"epoch {position.epoch + 1}/{cfg.epochs}", log_losses,
                                  on_step=after_step)
                out_of_time = loop.out_of_time(position)
                # The end of the run: score the generator it ends with (unless this step's was), before the last
                # save, so that last.pt carries the best score too.
                if cfg.eval_every and (out_of_time or position.epoch + 1 >= cfg.epochs) \
                        and best.scored_at != position.step:
                    evaluate(loop, nets, probe, best, position, sums, run)
                if out_of_time:
                    schedule_lr()  # 0 at the budget's end, so the saved optimiser states say so
                if position.batches_done * loader.batch_size >= sampler.num_samples:  # the epoch ran to its end
                    end_of_epoch(cfg, loop, nets, position, sums, samples, run)
                else:
                    end_of_budget(cfg, loop, nets, position, sums, samples, run)
            if run is not None:
                run.finish()
            if loop.out_of_time(position):
                log(f"budget reached: {cfg.budget_minutes:g} min of training time after step {position.step}; "
                    f"saved {ckpt_dir / 'last.pt'}")
            else:
                spent = f" (--epochs {cfg.epochs} reached with {position.seconds / 60:.2f} of the " \
                        f"{cfg.budget_minutes:g} min budget used)" if cfg.budget_minutes else ""
                log(f"done: {ckpt_dir / 'last.pt'}{spent}")


def train_main(dataset, add_data_args, out_dir, build_datasets, argv=None, require_distributed=False):
    """What each GAN entry point runs: settle the run's options (config.settle_config),
    then train. `add_data_args` and `build_datasets(cfg)` are the dataset's."""
    parser = training_parser(dataset, add_data_args, out_dir)
    cfg, resume = settle_config(parser, argv, read_resume_checkpoint, log=main_process_log)
    run_training(cfg, resume, build_datasets, require_distributed=require_distributed)
