"""Runtime helpers every script shares: devices and precision, the torchrun process
group, data loaders with the seeded sampler, model wrappers (DDP, compile) and the
optimiser. Nothing here knows about GANs; the GAN lives in gan.py and its training
loop in train_utils.py.

`distributed()` runs the same on one device and under torchrun: it reads RANK /
LOCAL_RANK / WORLD_SIZE from the environment when they are there.
"""
import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from config import DIST_TIMEOUT_MINUTES
from run_folder import RunFolder, input_paths
from utils import UserError, resolve_wandb_mode

# --------------------------------------------------------------------------- devices and processes

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


def main_process_log(*args, **kwargs):
    """print, on the first process of a torchrun job only (usable before distributed())."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


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
    """--channels-last auto (or None, as runs recorded it before `auto`): NHWC on CUDA, where
    tensor-core convolutions want it, and on CPUs with AVX-512 (oneDNN's blocked NHWC kernels),
    where bench.py measured the GAN step 24% faster in bf16 with AMX and 7-15% faster in fp32
    without; NCHW on AVX2-only CPUs, where NHWC measured 3-8% slower (docs/performance.md)."""
    if flag in (None, "auto"):
        return device.type == "cuda" or cpu_has_fast_bf16() or torch.backends.cpu.get_cpu_capability() == "AVX512"
    return flag in (True, "on")


def cpu_has_fast_bf16():
    """bf16 autocast on CPU only pays with AMX tiles. Measured by bench.py on two Xeons: with AMX,
    bf16 matmuls ran at 1914 GFLOP/s against 359 in fp32; with AVX512-BF16 but no AMX, at 166
    against 306, and bf16 training was slower than fp32 (docs/performance.md). Without AVX512-BF16
    bf16 is emulated and far slower still."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


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

def configure_cuda_backends(device):
    """cuDNN autotuning and TF32 matmuls on CUDA: the settings every script trains and
    generates with (bench.py too, after measuring its fp32 peaks without them)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def distributed(device_arg="auto", timeout_minutes=DIST_TIMEOUT_MINUTES, channels_last=None, require=False):
    """Start the process group (under torchrun), pick the device and memory layout,
    and always tear the group down again. Yields (DistInfo, device, channels_last)."""
    info, device = setup_distributed(device_arg, timeout_minutes, require=require)
    try:
        configure_cuda_backends(device)
        yield info, device, resolve_channels_last(channels_last, device)
    finally:
        cleanup_distributed()


# --------------------------------------------------------------------------- run folders

def claim_folder(info, path, *args, **kwargs):
    """run_folder.RunFolder.claim(path, ...) on the main process; once it has, the other ranks
    join the folder (their writes are checked too). A context manager, as RunFolder is."""
    folder = RunFolder.claim(path, *args, **kwargs) if info.is_main else None
    barrier()
    return folder or RunFolder.join(path)


def claim_run_dir(args, what, resume, info):
    """A training run's folder, claimed before any work (claim_folder): a folder holding another
    run is refused unless --resume continues that very run, and --overwrite deletes only that
    run's output."""
    out_dir = Path(args.out_dir)
    inputs = input_paths(args)
    if getattr(args, "demo", False):
        inputs.pop("--data-dir")  # the demo writes its data into its own run folder
    folder = claim_folder(info, out_dir, what, inputs=inputs, overwrite=args.overwrite, one_run=True,
                          resume=None if resume is None else (resume.get("run_id"), args.resume),
                          continue_hint=f"continue it with --resume {out_dir / 'checkpoints' / 'last.pt'}")
    if info.is_main:
        folder.record("wandb")
        # Temp files left by a run killed while saving; the checkpoints themselves are intact.
        for stale in (out_dir / "checkpoints").glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    return folder


# --------------------------------------------------------------------------- wandb

def init_wandb(args, run_id=None):
    """A wandb run in args.out_dir for the options `config.add_wandb_args` adds, or
    None with --wandb disabled; `run_id` continues a resumed run's."""
    mode = resolve_wandb_mode(args.wandb)
    if mode == "disabled":
        return None
    import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=args.run_name, id=run_id,
                         resume="allow" if run_id else None, dir=str(args.out_dir), mode=mode, config=vars(args))
    except wandb.errors.CommError as exc:  # AuthenticationError too: a malformed or refused API key
        # wandb's telemetry exporter would log its own refused uploads at exit, after the one error line.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        raise UserError(f"wandb {mode}: {' '.join(str(exc).split())} (check WANDB_API_KEY or `wandb login`, "
                        f"or use --wandb offline)") from None
    later = " (upload later with `wandb sync`)" if mode == "offline" else ""
    print(f"wandb: {mode} run {run.id} in {run.dir}{later}")
    return run


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


# --------------------------------------------------------------------------- models

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
