"""Instance edge maps (dataset.masks.instance_edges) and PanNuke's instance maps."""
import numpy as np
import pytest
from conftest import fold_files

from dataset.masks import instance_edges, pannuke_to_instances, pannuke_to_labels


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
