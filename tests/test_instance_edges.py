"""Instance edge maps (dataset.masks.instance_edges), PanNuke's instance maps, and --instance-edges:
the loaders mark the edges in the class maps, G and D read them as one more channel, test.py and
the study paint with them."""
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import fold_files
from conic_fixtures import make_conic

from dataset.conic import CoNIC, open_conic
from dataset.masks import (CONIC, EDGE_BIT, instance_edges, labels_to_onehot, labels_to_rgb, mark_edges,
                           pannuke_to_instances, pannuke_to_labels)
from dataset.pannuke import build_pannuke
from quality.stages import paint


def edges_by_loops(ids):
    """The definition, pixel by pixel: 1 where a 4-neighbour has another id."""
    h, w = ids.shape
    out = np.zeros((h, w), dtype=np.uint8)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and ids[ny, nx] != ids[y, x]:
                    out[y, x] = 1
    return out


def touching_disks(size=24, radius=6):
    """Two disks of one class whose areas overlap; each pixel goes to the nearer centre."""
    yy, xx = np.mgrid[:size, :size]
    centres = [(12, 7), (12, 16)]
    dist = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])
    instances = np.where(dist.min(0) <= radius, dist.argmin(0) + 1, 0).astype(np.int32)
    classes = np.where(instances > 0, 3, 0).astype(np.uint8)
    return instances, classes, centres


def test_the_border_between_touching_nuclei_of_one_class_is_marked():
    instances, classes, centres = touching_disks()
    edges = instance_edges(instances)
    assert edges.dtype == np.uint8 and edges.shape == instances.shape
    np.testing.assert_array_equal(edges, edges_by_loops(instances))
    # Every pixel of one disk with a 4-neighbour in the other is marked, on both sides.
    left, right = instances == 1, instances == 2
    border = (left[:, :-1] & right[:, 1:])
    assert border.sum() >= 5
    assert edges[:, :-1][border].all() and edges[:, 1:][border].all()
    # The class map alone sees one region there (away from the outline); centres and far background are unmarked.
    nucleus = instances > 0
    surrounded = np.zeros_like(nucleus)
    surrounded[1:-1, 1:-1] = (nucleus[1:-1, 1:-1] & nucleus[:-2, 1:-1] & nucleus[2:, 1:-1]
                              & nucleus[1:-1, :-2] & nucleus[1:-1, 2:])
    inner_border = border & surrounded[:, :-1]
    assert inner_border.sum() >= 3
    assert not instance_edges(classes)[:, :-1][inner_border].any()
    assert not any(edges[c] for c in centres) and edges[0, 0] == 0


def test_random_maps_match_the_definition():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, (9, 11)) * (rng.random((9, 11)) < 0.7)
    np.testing.assert_array_equal(instance_edges(ids), edges_by_loops(ids))
    with pytest.raises(ValueError, match="instance map"):
        instance_edges(ids[None])


def test_pannuke_instances_are_unique_across_class_channels():
    mask = np.zeros((6, 6, 6))
    mask[0:2, 0:2, 0] = 1          # nucleus 1 of channel 0
    mask[0:2, 3:5, 0] = 2          # nucleus 2 of channel 0, touching nothing
    mask[3:5, 0:2, 2] = 1          # nucleus 1 of channel 2: same id as in channel 0, another nucleus
    mask[3:5, 2:4, 2] = 2          # touches the one before, same class
    mask[4, 1, 4] = 1              # also set in channel 4: the lower channel (2) wins, as for the classes
    instances = pannuke_to_instances(mask)
    labels = pannuke_to_labels(mask)
    assert instances.dtype == np.int32
    assert len(np.unique(instances[instances > 0])) == 4
    np.testing.assert_array_equal(instances > 0, labels != 5)
    for c in range(5):
        for i in np.unique(mask[..., c][labels == c]):
            if i:
                # One pannuke nucleus is one instance id.
                assert len(np.unique(instances[(mask[..., c] == i) & (labels == c)])) == 1
    assert instance_edges(instances)[3:5, 1:3].all()  # the border inside the two touching class-2 nuclei


def test_real_pannuke_masks(pannuke_tiny_real):
    for k in (1, 2, 3):
        mask = np.load(fold_files(pannuke_tiny_real, k).masks)[0]
        instances = pannuke_to_instances(mask)
        labels = pannuke_to_labels(mask)
        np.testing.assert_array_equal(instances > 0, labels != 5)
        nuclei = sum(len(np.unique(mask[..., c][mask[..., c] > 0])) for c in range(5))
        assert len(np.unique(instances[instances > 0])) == nuclei > 0
        np.testing.assert_array_equal(instance_edges(instances), edges_by_loops(instances))


# --------------------------------------------------------------------------- --instance-edges, end to end

def marked_map(seed=0, size=32):
    """A class map (CoNIC ids) with touching nuclei, its instance map, and the two marked together."""
    rng = np.random.default_rng(seed)
    instances = rng.integers(0, 5, (size, size)).repeat(2, 0).repeat(2, 1)[:size, :size].astype(np.int32)
    classes = np.where(instances > 0, 1 + instances % 3, 0).astype(np.uint8)
    return classes, instances, mark_edges(classes, instances)


def test_marked_maps_give_the_class_onehot_and_one_edge_channel():
    classes, instances, marked = marked_map()
    assert ((marked % EDGE_BIT) == classes).all() and ((marked >= EDGE_BIT) == instance_edges(instances)).all()
    onehot = labels_to_onehot(torch.from_numpy(marked), CONIC.num_classes, edges=True)
    assert onehot.shape == (CONIC.num_classes + 1, 32, 32)
    assert torch.equal(onehot[:-1], labels_to_onehot(torch.from_numpy(classes), CONIC.num_classes))
    assert torch.equal(onehot[-1], torch.from_numpy(instance_edges(instances)).float())
    # A model without the edge channel reads a marked map as its classes, and so do the grids.
    assert torch.equal(labels_to_onehot(torch.from_numpy(marked), CONIC.num_classes),
                       labels_to_onehot(torch.from_numpy(classes), CONIC.num_classes))
    assert (labels_to_rgb(marked, CONIC) == labels_to_rgb(classes, CONIC)).all()


def dihedral(a):
    """The 8 flips and 90-degree rotations of an (H, W) map."""
    return [np.rot90(b, k) for b in (a, a[::-1]) for k in range(4)]


def test_conic_items_carry_the_edges_through_augmentation(tmp_path):
    root, _, labels = make_conic(tmp_path / "conic", size=32, n_nuclei=12)
    plain, marked = CoNIC(root, augment=True), CoNIC(root, augment=True, edges=True)
    for item in [(i, 100 + i) for i in range(4)]:
        seen, _ = marked[item]
        classes, edges = seen.numpy() % EDGE_BIT, seen.numpy() >= EDGE_BIT
        assert (classes == plain[item][0].numpy()).all()
        # The one transform that took the raw classes to the item's took the raw edges to its edges.
        raw = labels[item[0]]
        moves = [k for k, c in enumerate(dihedral(raw[..., 1])) if (c == classes).all()]
        assert moves and all((dihedral(instance_edges(raw[..., 0]))[k] == edges).all() for k in moves)
        assert edges.any()


def test_pannuke_items_carry_their_instance_edges(pannuke_folds):
    items = build_pannuke(pannuke_folds, [3], "all", augment=False, split="test", edges=True)
    masks = np.load(fold_files(pannuke_folds, 3).masks)
    for i in range(len(items)):
        labels = items[i][0].numpy()
        assert ((labels % EDGE_BIT) == pannuke_to_labels(masks[i])).all()
        assert ((labels >= EDGE_BIT) == instance_edges(pannuke_to_instances(masks[i]))).all()


def edges_argv(data_dir, out_dir, *extra):
    return ["--data-dir", data_dir, "--out-dir", out_dir, "--epochs", 1, "--batch-size", 4, "--ngf", 8, "--ndf", 8,
            "--workers", 0, "--precision", "fp32", "--device", "cpu", "--wandb", "disabled", "--num-samples", 2,
            "--save-every", 0, "--test-fraction", 0.3, "--instance-edges", *extra]


@pytest.fixture(scope="module")
def edges_run(tmp_path_factory, train_conic_in_process):
    data = make_conic(tmp_path_factory.mktemp("conic") / "data", size=128, n_nuclei=20)[0]
    out = tmp_path_factory.mktemp("edges_run")
    train_conic_in_process(edges_argv(data, out))
    return data, out / "checkpoints" / "last.pt"


def test_g_and_d_read_the_edge_channel_and_test_py_paints_with_it(edges_run, run_script, tmp_path):
    data, last = edges_run
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["model_config"]["instance_edges"] is True
    assert ckpt["generator"]["downs.0.block.0.weight"].shape[1] == CONIC.num_classes + 1
    first_d = [v for k, v in ckpt["discriminator"].items() if k.endswith("weight") and v.dim() == 4][0]
    assert first_d.shape[1] == CONIC.num_classes + 1 + 3
    res = run_script("test.py", "--checkpoint", last, "--out-dir", tmp_path / "synthetic", "--device", "cpu",
                     "--precision", "fp32", "--grids", 0)
    assert res.returncode == 0, res.stderr[-3000:]
    images, _, names = open_conic(tmp_path / "synthetic", check_data=True)
    assert len(names) and images.shape[1:] == (128, 128, 3)


def test_the_edges_change_the_painting(edges_run):
    """The study paints from class and instance maps: the same classes with the nuclei's edges
    and without any (all one instance) must give other tiles."""
    data, last = edges_run
    tiles = CoNIC(data)
    classes = np.stack([tiles.classes(i) for i in range(2)])
    instances = np.stack([tiles.instances(i) for i in range(2)])
    study = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext())
    with_edges = paint(study, last, classes, instances)
    without = paint(study, last, classes, np.zeros_like(instances))
    assert with_edges.shape == (2, 128, 128, 3) and with_edges.dtype == np.uint8
    assert (with_edges != without).any()


def test_the_oasis_discriminator_trains_with_edges(tmp_path, train_conic_in_process):
    data = make_conic(tmp_path / "data", size=128, n_nuclei=20)[0]
    out = tmp_path / "run"
    train_conic_in_process(edges_argv(data, out, "--discriminator", "oasis", "--l1-lambda", 0))
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_config"]["instance_edges"] and np.isfinite(ckpt["history"][-1]["loss_d"])


def test_unitopatho_checkpoints_and_masks_are_refused(edges_run, run_script, tmp_path):
    _, last = edges_run
    res = run_script("test.py", "--checkpoint", last, "--dataset", "unitopatho", "--data-dir", tmp_path,
                     "--out-dir", tmp_path / "out", "--device", "cpu")
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and "instance edges" in err[0] and "unitopatho" in err[0], res.stderr
    assert not (tmp_path / "out").exists()
