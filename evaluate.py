r"""Score synthetic H&E images against the real ones they stand in for.

    python evaluate.py --real data/unitopatho/800 --fake synthetic/unitopatho \
        --masks data/unitopatho_masks/test/masks --segmenter runs/segmenter/checkpoints/last.pt \
        --run-dir runs/unitopatho --out-dir eval/unitopatho

Pairs: every image under --fake whose relative path also exists under --real
(R/<class>/<name> with S/<class>/<name>, or flat folders R/<name> with S/<name>);
other files are counted as unmatched and ignored. With class folders, every score
is also given per class.

FID and KID compare the real and the synthetic images of the pairs. Each image is
prepared identically: its centre square is cropped and resized to 299 x 299 with
PIL's antialiased bicubic filter (an 1812 px UniToPatho tile becomes about 2.6 um
per pixel), then fed as uint8 to the FID Inception (torch-fidelity's port of the
TF 2015-12-05 graph, as torchmetrics uses it) in fp32. Its weights come from
--inception-weights or the torch hub cache (downloaded there when possible), or
--inception-weights can name a 'fid-features' file (metrics.save_feature_net): a
small random network whose scores are not comparable to published FIDs. FID from
few images is biased upwards; compare runs at equal counts.

Mask fidelity (--segmenter, needs --masks): the segmenter labels each synthetic
image and each matching real one (resampled from --source-mpp to --model-mpp, as
make_masks.py does); per-class Dice/IoU against the mask the synthetic image was
generated from. The real images' scores are the reference the synthetic ones
should approach (they equal the masks exactly when the masks came from this
segmenter on these images).

Writes OUT/metrics.json and OUT/report.html (self-contained: figures embedded):
metric tables, a mask | real | synthetic grid per class (centre crops at native
resolution) and, with --run-dir, the training run's loss_curves.png.
"""
import argparse
import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

import config
import metrics
from dataset.common import read_rgb
from dataset.masks import NUM_CLASSES, labels_to_rgb
from dataset.unitopatho import missing_files_error
from dataset.unitopatho_mask import read_mask
from runtime import (autocast_context, loader_workers, make_loader, maybe_compile, resolve_channels_last,
                     resolve_device, resolve_precision)
from report import data_uri, fmt, grid, table
from segmenter import StainNormalizer, load_pannuke_segmenter, segment_image, segmenter_features
from run_folder import RunFolder, input_paths, manifest_options
from utils import UserError, atomic_save_text, run_main

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PREPROCESSING = (f"centre square crop, PIL bicubic (antialiased) resize to {metrics.INCEPTION_SIZE} x "
                 f"{metrics.INCEPTION_SIZE}, uint8 RGB, identical for real and synthetic images")
ALL = "all"


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=config.HelpFormatter)
    p.add_argument("--real", required=True, help="real images: class folders R/<class>/<name> or a flat folder")
    p.add_argument("--fake", required=True, help="synthetic images at the same relative paths (e.g. test.py's output)")
    p.add_argument("--out-dir", required=True, help="where metrics.json and report.html go")
    p.add_argument("--masks", default=None,
                   help="masks the synthetic images were generated from: palette PNGs at M/<name> or M/<class>/<name> "
                        "(for UniToPatho: MASKS_ROOT/test/masks)")
    p.add_argument("--segmenter", default=None, help="segmenter checkpoint (train_segmenter.py) for mask fidelity")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"FID Inception weights ({metrics.INCEPTION_FILES[0]} or pytorch-fid's "
                        f"{metrics.INCEPTION_FILES[1]}), or a 'fid-features' file from metrics.save_feature_net; "
                        f"default: the torch hub cache ({metrics.inception_cache_dir()}), downloading if possible")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the scores of an evaluation made with other options in --out-dir")
    p.add_argument("--run-dir", default=None, help="training run folder whose loss_curves.png goes into the report")
    p.add_argument("--batch-size", type=int, default=32, help="images per Inception forward pass")
    p.add_argument("--kid-subsets", type=int, default=100, help="random subsets KID is averaged over")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="images per KID subset (at most the set size)")
    g = p.add_argument_group("realism without downloaded weights")
    g.add_argument("--c2st-crops", type=int, default=4,
                   help="random crops per image for the classifier two-sample test (0: skip it)")
    g.add_argument("--c2st-size", type=int, default=64, help="side of those crops in pixels")
    g = p.add_argument_group("mask fidelity")
    config.add_segmentation_args(g, batch_flag="--tile-batch-size")
    g.add_argument("--mask-images", type=int, default=0, help="segment at most this many pairs per class (0: all)")
    g = p.add_argument_group("report")
    g.add_argument("--grid-rows", type=int, default=4, help="mask | real | synthetic rows per class")
    g.add_argument("--grid-crop", type=int, default=320, help="side of the centre crop shown, in native pixels")
    config.add_device_args(p)
    return p


# --------------------------------------------------------------------------- pairs

@dataclass
class Pair:
    rel: str        # relative path, the same under --real and --fake
    group: str      # class folder, or ALL for flat folders
    real: Path
    fake: Path
    mask: Path = None


def list_images(root):
    """Relative path -> file for the images in `root` and its direct subfolders."""
    found = {}
    for path in [*root.iterdir(), *(p for d in root.iterdir() if d.is_dir() for p in d.iterdir())]:
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            found[path.relative_to(root).as_posix()] = path
    return found


def match_pairs(real_dir, fake_dir, masks_dir):
    for what, folder in (("--real", real_dir), ("--fake", fake_dir), ("--masks", masks_dir)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{what} folder not found: {folder}")
    real, fake = list_images(real_dir), list_images(fake_dir)
    common = sorted(real.keys() & fake.keys())
    if not common:
        raise UserError(f"no image under --fake {fake_dir} has a match under --real {real_dir} "
                        f"({len(fake)} and {len(real)} images; pairs share their relative path, e.g. <class>/<name>)")
    pairs = [Pair(rel, rel.split("/")[0] if "/" in rel else ALL, real[rel], fake[rel]) for rel in common]
    if masks_dir is not None:
        missing = []
        for pair in pairs:
            options = [masks_dir / pair.rel, masks_dir / Path(pair.rel).name]
            pair.mask = next((m for m in options if m.is_file()), None)
            if pair.mask is None:
                missing.append(options[-1])
        if missing:
            raise missing_files_error(missing, "mask", masks_dir)
    unmatched = {"real": len(real) - len(common), "fake": len(fake) - len(common)}
    return pairs, unmatched


def groups_of(pairs):
    return sorted({p.group for p in pairs} - {ALL})


# --------------------------------------------------------------------------- FID / KID

class InceptionInputs(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.fromarray(read_rgb(self.paths[index]))
        size = (metrics.INCEPTION_SIZE, metrics.INCEPTION_SIZE)
        image = ImageOps.fit(image, size, method=Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def features(net, paths, args, device, workers, desc):
    loader = make_loader(InceptionInputs(paths), args.batch_size, workers, device)
    return metrics.extract_features(net, tqdm(loader, desc=desc, dynamic_ncols=True), device)


def distribution_scores(real, fake, args):
    kid_mean, kid_std = metrics.kid(real, fake, args.kid_subsets, args.kid_subset_size, args.seed)
    return {"images": len(real), "fid": metrics.fid(real, fake), "kid_mean": kid_mean, "kid_std": kid_std}


def inception_or_none(path):
    """The FID feature network, or (None, None) with a one-line note when no weights
    were given and none can be found or downloaded: the other scores need none."""
    try:
        return metrics.load_feature_extractor(path)
    except UserError as exc:
        if path:  # a file the user named must work
            raise
        print(f"note: FID/KID skipped, no Inception weights ({str(exc).split(' (')[0]}); the weight-free "
              f"scores and mask fidelity follow", file=sys.stderr)
        return None, None


def random_crops(paths, count, size, rng):
    """`count` random `size`-px crops of each image, as uint8 (N, size, size, 3)."""
    crops = []
    for path in paths:
        image = read_rgb(path)
        if min(image.shape[:2]) < size:
            raise UserError(f"{path} is smaller than --c2st-size {size}")
        for _ in range(count):
            y, x = (int(rng.integers(0, n - size + 1)) for n in image.shape[:2])
            crops.append(image[y:y + size, x:x + size])
    return np.stack(crops)


def weight_free_realism(pairs, args, device):
    """C2ST accuracy of real vs synthetic crops and, with --segmenter, the domain Fréchet
    and kernel distances in its pooled encoder features; each next to its real-vs-real
    floor (two disjoint halves of the real crops)."""
    if not args.c2st_crops:
        return None
    rng = np.random.default_rng(args.seed)
    real = random_crops([p.real for p in pairs], args.c2st_crops, args.c2st_size, rng)
    fake = random_crops([p.fake for p in pairs], args.c2st_crops, args.c2st_size, rng)
    half_a, half_b = metrics.real_vs_real_split(len(real), args.seed)
    result = {"crops": len(real), "crop_size": args.c2st_size, "c2st": {
        "synthetic": metrics.c2st(real, fake, seed=args.seed, device=device),
        "real_vs_real": metrics.c2st(real[half_a], real[half_b], seed=args.seed, device=device)}}
    if args.segmenter:
        model, _ = load_pannuke_segmenter(args.segmenter, device, args.model_mpp)
        feats = {name: segmenter_features(model, crops, device) for name, crops in (("real", real), ("fake", fake))}
        distances = {}
        for name, a, b in (("synthetic", feats["real"], feats["fake"]),
                           ("real_vs_real", feats["real"][half_a], feats["real"][half_b])):
            kd_mean, kd_std = metrics.kernel_distance(a, b, args.kid_subsets, args.kid_subset_size, args.seed)
            distances[name] = {"frechet": metrics.frechet_distance(a, b), "kernel_mean": kd_mean, "kernel_std": kd_std}
        result["domain"] = distances
    return result


# --------------------------------------------------------------------------- mask fidelity

class SegmentationInputs(torch.utils.data.Dataset):
    """(real image, synthetic image, mask labels) per pair, decoded in loader workers."""

    def __init__(self, pairs, normalizer):
        self.pairs, self.normalizer = pairs, normalizer

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        pair = self.pairs[index]
        real, fake = read_rgb(pair.real), read_rgb(pair.fake)
        if fake.shape != real.shape:
            raise UserError(f"{pair.fake} is {fake.shape[1]} x {fake.shape[0]} px but {pair.real} is "
                            f"{real.shape[1]} x {real.shape[0]} px")
        labels = read_mask(pair.mask, pair.fake, fake.shape[:2])
        if self.normalizer:
            real, fake = self.normalizer(real), self.normalizer(fake)
        return np.array(real), np.array(fake), labels  # writable copies: the loader makes tensors of them


def mask_fidelity(pairs, args, device, workers):
    model, model_mpp = load_pannuke_segmenter(args.segmenter, device, args.model_mpp)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = maybe_compile(model, args.compile)
    normalizer = StainNormalizer(args.reference) if args.stain_normalize else None
    tiling = dict(tile=args.tile, overlap=args.overlap, batch_size=args.tile_batch_size,
                  autocast=autocast_context(device, resolve_precision(args.precision, device)),
                  channels_last=args.channels_last)
    scale = args.source_mpp / model_mpp
    by_group = {}
    for pair in pairs:
        by_group.setdefault(pair.group, []).append(pair)
    chosen = [p for g in sorted(by_group) for p in by_group[g][:args.mask_images or None]]
    counts = {}  # group -> [confusion synthetic, confusion real, images]
    loader = make_loader(SegmentationInputs(chosen, normalizer), None, workers, device)
    for pair, (real, fake, labels) in zip(chosen, tqdm(loader, desc="segmenting pairs", dynamic_ncols=True)):
        entry = counts.setdefault(pair.group, [torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)] * 2 + [0])
        for k, image in enumerate((fake, real)):
            pred = segment_image(model, image.numpy(), device, scale, **tiling)
            entry[k] = entry[k] + metrics.confusion_matrix(pred, labels, NUM_CLASSES)
        entry[2] += 1

    def scores(cm_fake, cm_real, n):
        return {"images": n, "synthetic": metrics.mask_scores(cm_fake), "real": metrics.mask_scores(cm_real)}

    total = [sum(c[k] for c in counts.values()) for k in range(3)]
    result = {"overall": scores(*total), "per_class": {}}
    if groups_of(chosen):
        result["per_class"] = {g: scores(*counts[g]) for g in sorted(counts)}
    return result


# --------------------------------------------------------------------------- report

def centre_crop(array, side):
    h, w = array.shape[:2]
    side = min(side, h, w)
    y, x = (h - side) // 2, (w - side) // 2
    return array[y:y + side, x:x + side]


def class_grid(pairs, args):
    rows = []
    for pair in pairs[:args.grid_rows]:
        real, fake = read_rgb(pair.real), read_rgb(pair.fake)
        side = min(args.grid_crop, *real.shape[:2], *fake.shape[:2])
        tiles = [centre_crop(real, side), centre_crop(fake, side)]
        if pair.mask is not None:
            tiles.insert(0, centre_crop(labels_to_rgb(read_mask(pair.mask, pair.fake)), side))
        rows.append(tiles)
    return grid(rows) if rows else None


def write_report(path, result, grids, loss_curves):
    esc = html.escape
    parts = [f"<h1>Synthetic vs real H&amp;E</h1><p>real <code>{esc(result['real_dir'])}</code>, synthetic "
             f"<code>{esc(result['fake_dir'])}</code>: {result['pairs']} pairs (unmatched: "
             f"{result['unmatched']['real']} real, {result['unmatched']['fake']} synthetic).</p>"]
    extractor = result["feature_extractor"]
    if extractor is None:
        parts.append("<h2>FID and KID</h2><p class=warn>Skipped: no Inception weights were given or found.</p>")
    else:
        parts.append(f"<p>Features: {esc(extractor['network'])} ({esc(extractor['weights'])}). "
                     f"{esc(PREPROCESSING)}.</p>")
        if not extractor["comparable_to_published_fid"]:
            parts.append("<p class=warn>These features come from a randomly initialised network: the scores rank "
                         "models on the same data but are not comparable to published FID/KID values.</p>")
        groups = [("all", result["overall"])] + list(result["per_class"].items())
        parts.append("<h2>FID and KID</h2>" + table(
            ["class", "pairs", "FID", "KID (x1000)", "KID std (x1000)"],
            [[g, s["images"], fmt(s["fid"], 2), fmt(None if s["kid_mean"] is None else 1000 * s["kid_mean"]),
              fmt(None if s["kid_std"] is None else 1000 * s["kid_std"])] for g, s in groups]))
    free = result["weight_free"]
    if free:
        rows = [["C2ST accuracy (0.5 = indistinguishable)", fmt(free["c2st"]["synthetic"]["accuracy"]),
                 fmt(free["c2st"]["real_vs_real"]["accuracy"])]]
        for key, label in (("frechet", "domain Fréchet distance"), ("kernel_mean", "domain kernel distance")):
            if "domain" in free:
                rows.append([label, fmt(free["domain"]["synthetic"][key], 4), fmt(free["domain"]["real_vs_real"][key], 4)])
        parts.append(f"<h2>Realism without downloaded weights</h2><p>{free['crops']} random "
                     f"{free['crop_size']}-px crops a side; the domain distances use the segmenter's pooled encoder "
                     f"features (not FID/KID).</p>" + table(["score", "real vs synthetic", "real vs real"], rows))
    fidelity = result["mask_fidelity"]
    if fidelity:
        parts.append("<h2>Mask fidelity</h2><p>The segmenter's maps of the synthetic images against the masks they "
                     "were generated from; the real images' scores are the reference.</p>")
        o = fidelity["overall"]
        names = list(o["synthetic"]["dice"])
        parts.append(table(["nucleus class", "Dice synthetic", "Dice real", "IoU synthetic", "IoU real"],
                           [[n, fmt(o["synthetic"]["dice"][n]), fmt(o["real"]["dice"][n]),
                             fmt(o["synthetic"]["iou"][n]), fmt(o["real"]["iou"][n])] for n in names]
                           + [["mean (types)", fmt(o["synthetic"]["mean_dice_types"]), fmt(o["real"]["mean_dice_types"]),
                               fmt(o["synthetic"]["mean_iou_types"]), fmt(o["real"]["mean_iou_types"])]]))
        if fidelity["per_class"]:
            parts.append(table(["class", "pairs", "mean Dice synthetic", "mean Dice real", "Nuclei Dice synthetic",
                                "Nuclei Dice real"],
                               [[g, s["images"], fmt(s["synthetic"]["mean_dice_types"]),
                                 fmt(s["real"]["mean_dice_types"]), fmt(s["synthetic"]["dice"]["Nuclei"]),
                                 fmt(s["real"]["dice"]["Nuclei"])] for g, s in fidelity["per_class"].items()]))
    if grids:
        columns = "mask | real | synthetic" if result["masks_dir"] else "real | synthetic"
        parts.append(f"<h2>Samples ({columns}, centre crops at native resolution)</h2>")
        parts += [f"<h3>{esc(g)}</h3><img alt='{esc(g)}' src='{data_uri(array=image)}'>" for g, image in grids.items()]
    if loss_curves:
        parts.append(f"<h2>Training losses</h2><img alt='loss curves' src='{data_uri(path=loss_curves)}'>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.warn{color:#a40}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>evaluation</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    atomic_save_text(path, page)


# --------------------------------------------------------------------------- main

@run_main
def main(argv=None):
    args = parser().parse_args(argv)
    if args.segmenter and not args.masks:
        raise UserError("--segmenter scores the synthetic images against their masks: add --masks")
    config.check_segmentation_args(args)
    loss_curves = None
    if args.run_dir:
        loss_curves = Path(args.run_dir) / "loss_curves.png"
        if not loss_curves.is_file():
            raise UserError(f"--run-dir {args.run_dir} has no loss_curves.png (train_*.py writes it after each epoch)")
    masks_dir = Path(args.masks) if args.masks else None
    pairs, unmatched = match_pairs(Path(args.real), Path(args.fake), masks_dir)
    out_dir = Path(args.out_dir)
    with RunFolder.claim(out_dir, "evaluate.py", manifest_options(args), inputs=input_paths(args),
                         overwrite=args.overwrite):
        net, extractor = inception_or_none(args.inception_weights)
        device = resolve_device(args.device)
        args.channels_last = resolve_channels_last(args.channels_last, device)
        workers = loader_workers(args.workers, device)
        write_evaluation(args, out_dir, pairs, unmatched, net, extractor, device, workers, loss_curves)


def write_evaluation(args, out_dir, pairs, unmatched, net, extractor, device, workers, loss_curves):
    """Score the pairs and write OUT/metrics.json and OUT/report.html."""

    groups = groups_of(pairs)
    overall, per_class = None, {}
    if net is not None:
        real = features(net, [p.real for p in pairs], args, device, workers, "features (real)")
        fake = features(net, [p.fake for p in pairs], args, device, workers, "features (synthetic)")
        index = {g: [i for i, p in enumerate(pairs) if p.group == g] for g in groups}
        overall = distribution_scores(real, fake, args)
        per_class = {g: distribution_scores(real[index[g]], fake[index[g]], args) for g in groups}
    result = {
        "real_dir": args.real, "fake_dir": args.fake, "masks_dir": args.masks, "segmenter": args.segmenter,
        "pairs": len(pairs), "unmatched": unmatched, "preprocessing": PREPROCESSING,
        "feature_extractor": extractor, "kid": {"subsets": args.kid_subsets, "subset_size": args.kid_subset_size},
        "overall": overall, "per_class": per_class,
        "weight_free": weight_free_realism(pairs, args, device),
        "mask_fidelity": mask_fidelity(pairs, args, device, workers) if args.segmenter else None,
        "loss_curves": str(loss_curves) if loss_curves else None,
    }
    atomic_save_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    grids = {g: class_grid([p for p in pairs if p.group == g], args) for g in (groups or [ALL])}
    write_report(out_dir / "report.html", result, {g: im for g, im in grids.items() if im is not None}, loss_curves)
    scores = [f"FID {fmt(overall['fid'], 2)}, KID {fmt(overall['kid_mean'], 5)}"] if overall else []
    c2st = result["weight_free"]["c2st"] if result["weight_free"] else None
    if c2st:
        scores.append(f"C2ST {fmt(c2st['synthetic']['accuracy'])} (real vs real {fmt(c2st['real_vs_real']['accuracy'])})")
    print(f"{', '.join(scores) or 'no realism scores'} over {len(pairs)} pairs; wrote {out_dir / 'metrics.json'} "
          f"and {out_dir / 'report.html'}")


if __name__ == "__main__":
    main()
