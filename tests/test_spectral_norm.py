"""--d-spectral-norm: every convolution and linear layer of D spectrally normalised, for each kind
of D; off by default (the state dict of today's D is unchanged), recorded in the model config, and
a run with it trains, saves and resumes."""
import pytest
import torch
from torch import nn

import gan
from config import add_conic_training_data_args, training_parser
from dataset.masks import CONIC


def d_config(*flags):
    args = training_parser("CoNIC", add_conic_training_data_args, "runs/x").parse_args(["--ndf", "8", *flags])
    return gan.model_config(args, CONIC, 128)


@pytest.mark.parametrize("kind", ["patch", "multiscale", "oasis"])
def test_every_layer_of_d_is_normalised_to_spectral_norm_one(kind):
    torch.manual_seed(0)
    disc = gan.build_discriminator(d_config("--discriminator", kind, "--d-spectral-norm")).train()
    layers = [m for m in disc.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    x = torch.randn(2, CONIC.num_classes + 3, 128, 128)
    for _ in range(20):  # power iterations run in train-mode forwards
        # OASIS's D sees the image alone; the others, mask and image.
        disc(x[:, CONIC.num_classes:]) if kind == "oasis" else disc(x[:, :CONIC.num_classes], x[:, CONIC.num_classes:])
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.1), (m, float(sigma))


def test_off_by_default_and_recorded_in_the_model_config():
    default, normalised = d_config(), d_config("--d-spectral-norm")
    assert default["d_spectral_norm"] is False and normalised["d_spectral_norm"] is True
    plain = gan.build_discriminator(default)
    assert not any(nn.utils.parametrize.is_parametrized(m) for m in plain.modules())
    assert all("parametrizations" not in k for k in plain.state_dict())
    assert gan.describe(normalised).endswith("--d-spectral-norm")


def test_a_run_with_spectral_norm_trains_and_resumes(tmp_path, pannuke_folds, train_in_process, one_thread):
    out = tmp_path / "run"
    folds = dict(train_folds=(1,), test_folds=(2,))
    train_in_process(train_in_process.argv(pannuke_folds, out, "--d-spectral-norm", **folds))
    last = out / "checkpoints" / "last.pt"
    first = torch.load(last, weights_only=True)
    assert first["model_config"]["d_spectral_norm"] is True
    assert any("parametrizations" in k for k in first["discriminator"])
    train_in_process(train_in_process.argv(pannuke_folds, out, "--resume", last, epochs=2, **folds))
    resumed = torch.load(last, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["model_config"]["d_spectral_norm"] is True
