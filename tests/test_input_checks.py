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


# --------------------------------------------------------------------------- UniToPatho CSV

UTP_HEADER = ",image_id,top_label_name,top_label,type_name,type,grade_name,grade,wsi,roi,mpp,x,y,w,h\n"


def _utp_row(index, name, label="TA.HG", codes="2,TA,2,HG,1"):
    """One row of the official UniToPatho 800 CSV (an unnamed index column first; names with commas quoted)."""
    return f'{index},"{name}",{label},{codes},CASO 10,12,0.44,61530,11677,1812,1812\n'


def test_utp_duplicate_image_id_names_csv_and_both_lines(tmp_path):
    """Masks are stored by image_id: a second row with the same image_id would overwrite the first's mask."""
    from dataset.unitopatho import read_split
    dup = "TA.HG CASO 10 - 2019-03-04 09.24.36.ndpi_ROI__mpp0.44_reg012_crop_sk00053_(61530,11677,1812,1812).png"
    rows = [_utp_row(0, dup), _utp_row(1, "other_(1,2,1812,1812).png"),
            _utp_row(2, dup, label="HP", codes="0,HP,0,,-1")]
    (tmp_path / "train.csv").write_text(UTP_HEADER + "".join(rows))
    with pytest.raises(UserError) as err:
        read_split(tmp_path, "train")
    message = str(err.value)
    assert str(tmp_path / "train.csv") in message and dup in message
    assert "lines 2 and 4" in message and "\n" not in message
