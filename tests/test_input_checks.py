"""User-input checks: each bad input gives one UserError line naming the file or option and
what was expected, raised before any work. Tiny data in the real on-disk formats."""
import numpy as np
import pytest

from utils import UserError


# --------------------------------------------------------------------------- PanNuke patches read later

def _colon_fold(pannuke_writer, root, n):
    """Official fold 1 of n identical Colon patches (float64, 0..255); returns (images, masks, files)."""
    image, mask, _ = pannuke_writer.patch(3)
    images = np.repeat(image[None], n, 0).astype(np.float64)
    masks = np.repeat(mask[None], n, 0).astype(np.float64)
    return images, masks, pannuke_writer.files(root, 1)


@pytest.mark.parametrize("case, change, needle", [
    ("nan", lambda a: a.__setitem__((1, 0, 0, 0), np.nan), "patch 1 has pixel values outside 0..255"),
    ("scaled-0-1", lambda a: a.__setitem__(1, a[1] / 255.0), "patch 1 holds pixel values within 0..1"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_pannuke_patch_outside_startup_sample_is_checked_on_read(tmp_path, pannuke_writer, case, change, needle):
    """Patch 1 is not among the evenly spaced start-up sample; reading it names the fold file and the patch."""
    from dataset.pannuke import SAMPLE_ITEMS, PanNukeFolds, sample_indices
    n = 4 * SAMPLE_ITEMS + 3
    images, masks, files = _colon_fold(pannuke_writer, tmp_path, n)
    assert 1 not in sample_indices(np.arange(n), check_data=False)
    change(images)
    pannuke_writer.fold(tmp_path, 1, images, masks, np.array(["Colon"] * n))
    data = PanNukeFolds(tmp_path, [1], "Colon")
    data[0]
    with pytest.raises(UserError) as err:
        data[1]
    assert needle in str(err.value) and str(files.images) in str(err.value)


def test_pannuke_mask_outside_startup_sample_is_checked_on_read(tmp_path, pannuke_writer):
    from dataset.pannuke import SAMPLE_ITEMS, PanNukeFolds
    n = 4 * SAMPLE_ITEMS + 3
    images, masks, files = _colon_fold(pannuke_writer, tmp_path, n)
    masks[1, 5, 5, 2] = np.nan
    pannuke_writer.fold(tmp_path, 1, images, masks, np.array(["Colon"] * n))
    with pytest.raises(UserError, match="patch 1 has NaN") as err:
        PanNukeFolds(tmp_path, [1], "Colon")[1]
    assert str(files.masks) in str(err.value)
