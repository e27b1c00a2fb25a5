"""The frame autoencoder: padding and shapes, save/load, local from_pretrained, and the two training stages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.models.autoencoder import (
    AutoencoderError,
    FrameAutoencoder,
    build_vae,
    load_autoencoder,
    load_pretrained_vae,
    padding_for,
    training_loss,
)
from tests.fixtures.models import tiny_vae
from tests.fixtures.params import write_micro_params
from tests.fixtures.processes import run
from tests.fixtures.stores import write_synthetic_trajectories

# --------------------------------------------------------------------------- geometry


def test_padding_makes_latents_divisible() -> None:
    # 80x60 with 4x downsampling and multiple 4: 60 rows -> 64 (2 on top, 2 below), latents 16x20
    assert padding_for((60, 80), 4, 4) == (0, 0, 2, 2)
    autoencoder = FrameAutoencoder(tiny_vae(3), (60, 80), 0.5, latent_multiple=4)
    assert autoencoder.padded_size == (64, 80)
    assert autoencoder.latent_shape == (4, 16, 20)
    # the paper's 320x240 with SD's 8x downsampling pads 240 -> 256
    assert padding_for((240, 320), 8, 4) == (0, 0, 8, 8)


@pytest.mark.parametrize("pad_mode", ["replicate", "constant"])
def test_encode_decode_shapes_and_range(pad_mode: str) -> None:
    autoencoder = FrameAutoencoder(tiny_vae(3), (60, 80), 0.5, latent_multiple=4, pad_mode=pad_mode).eval()
    frames = torch.rand(2, 3, 60, 80)
    with torch.no_grad():
        latents = autoencoder.encode(frames)
        decoded = autoencoder.decode(latents)
    assert latents.shape == (2, *autoencoder.latent_shape)
    assert decoded.shape == frames.shape
    assert decoded.min() >= 0.0 and decoded.max() <= 1.0
    with torch.no_grad():  # scaling: encode is the unscaled posterior mean times the factor
        torch.testing.assert_close(latents, autoencoder.encode_unscaled(frames) * 0.5)


def test_replicate_padding_copies_edges() -> None:
    autoencoder = FrameAutoencoder(tiny_vae(3), (60, 80), 1.0, latent_multiple=4, pad_mode="replicate")
    frames = torch.rand(1, 3, 60, 80)
    padded = autoencoder.pad(frames)
    assert padded.shape == (1, 3, 64, 80)
    torch.testing.assert_close(padded[:, :, 0], padded[:, :, 2])  # top rows repeat the first frame row
    torch.testing.assert_close(autoencoder.crop(padded), frames)  # crop undoes pad


def test_wrong_frame_size_is_refused() -> None:
    autoencoder = FrameAutoencoder(tiny_vae(2), (24, 32), 1.0)
    with pytest.raises(ValueError, match="frames of size"):
        autoencoder.encode(torch.rand(1, 3, 32, 32))


def test_bf16_training_loss_matches_float32_and_trains() -> None:
    """``autoencoder.mixed_precision: bf16``: the same loss to bf16 precision, float32 gradients on every weight."""
    vae = tiny_vae(2)
    x = torch.rand(4, 3, 24, 32) * 2 - 1
    torch.manual_seed(1)
    full = training_loss(vae, x, 1e-6, "no")
    torch.manual_seed(1)
    half = training_loss(vae, x, 1e-6, "bf16")
    assert full.dtype == half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05) and half.item() != full.item()
    half.backward()
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- save / load


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    autoencoder = FrameAutoencoder(tiny_vae(3), (60, 80), 0.37, latent_multiple=4).eval()
    autoencoder.save(tmp_path / "ae")
    assert (tmp_path / "ae" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_autoencoder(tmp_path / "ae")
    assert loaded.frame_size == (60, 80)
    assert loaded.latent_shape == autoencoder.latent_shape
    assert loaded.scaling_factor == pytest.approx(0.37)
    frames = torch.rand(2, 3, 60, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(frames), autoencoder.encode(frames))
        latents = autoencoder.encode(frames)
        torch.testing.assert_close(loaded.decode(latents), autoencoder.decode(latents))


def test_a_decoder_of_its_own_widths_round_trips(tmp_path: Path) -> None:
    """``autoencoder.decoder_block_out_channels``: the decoder is built narrower than the encoder, and a saved folder
    (whose config.json diffusers alone cannot load) comes back with the same decoder and the same frames."""
    torch.manual_seed(0)
    vae = build_vae([8, 16, 16], 4, 1, 4, False, decoder_block_out_channels=[8, 8, 16])
    assert vae.decoder.up_blocks[1].resnets[0].conv1.out_channels == 8  # 16 in the encoder's mirror image
    mirrored = build_vae([8, 16, 16], 4, 1, 4, False).decoder
    assert sum(p.numel() for p in vae.decoder.parameters()) < sum(p.numel() for p in mirrored.parameters())
    autoencoder = FrameAutoencoder(vae, (60, 80), 0.37, latent_multiple=4).eval()
    autoencoder.save(tmp_path / "ae")
    loaded = load_autoencoder(tmp_path / "ae")
    for (name, a), (_, b) in zip(vae.state_dict().items(), loaded.vae.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    frames = torch.rand(2, 3, 60, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(frames), autoencoder.reconstruct(frames))
    with pytest.raises(ValueError, match="needs 3 widths"):
        build_vae([8, 16, 16], 4, 1, 4, False, decoder_block_out_channels=[8, 16])
    (tmp_path / "ae" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(AutoencoderError, match="cannot load the AutoencoderKL"):
        load_autoencoder(tmp_path / "ae")


def test_onnx_encoder_matches_pytorch_and_refuses_a_mismatch(tmp_path: Path) -> None:
    """validated_latents' onnxruntime engine: the exported encoder gives PyTorch's latents, checked before use."""
    from components.runtime.export import ExportError, onnx_encoder

    autoencoder = FrameAutoencoder(tiny_vae(3), (60, 80), 0.37, latent_multiple=4).eval()
    frames = torch.rand(5, 3, 60, 80, generator=torch.Generator().manual_seed(0)).numpy()
    encode = onnx_encoder(autoencoder, tmp_path / "ok", max_batch=8, threads=1, check_frames=frames[:2])
    with torch.no_grad():
        expected = autoencoder.encode(torch.from_numpy(frames)).numpy()
    np.testing.assert_allclose(encode(frames), expected, atol=1e-4)
    with pytest.raises(ExportError, match="engine: torch"):
        onnx_encoder(autoencoder, tmp_path / "strict", max_batch=8, threads=1, check_frames=frames[:2], tolerance=1e-12)


def test_load_autoencoder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(AutoencoderError, match="no such autoencoder folder.*Run its DVC stage"):
        load_autoencoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutoencoderError, match="autoencoder.json: missing"):
        load_autoencoder(tmp_path / "empty")
    FrameAutoencoder(tiny_vae(2), (24, 32), 1.0).save(tmp_path / "broken")
    (tmp_path / "broken" / "autoencoder.json").write_text("{not json")
    with pytest.raises(AutoencoderError, match="malformed"):
        load_autoencoder(tmp_path / "broken")


def test_from_pretrained_local_path(tmp_path: Path) -> None:
    """An SD-style checkout (root/vae/ written by save_pretrained) loads through the project's code path."""
    vae = tiny_vae(3)
    vae.save_pretrained(tmp_path / "sd-v1-4" / "vae", safe_serialization=True)
    for path in (tmp_path / "sd-v1-4", tmp_path / "sd-v1-4" / "vae"):
        loaded = load_pretrained_vae(path)
        for (name, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, msg=name)


def test_from_pretrained_wrong_path_is_clear(tmp_path: Path) -> None:
    expected = "does not exist; expected a local folder holding a diffusers AutoencoderKL"
    with pytest.raises(AutoencoderError, match=expected):
        load_pretrained_vae(tmp_path / "nowhere")
    (tmp_path / "not-a-vae").mkdir()
    (tmp_path / "not-a-vae" / "weights.txt").write_text("x")
    with pytest.raises(AutoencoderError, match="has no config.json"):
        load_pretrained_vae(tmp_path / "not-a-vae")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')  # no weights file
    with pytest.raises(AutoencoderError, match="cannot load"):
        load_pretrained_vae(tmp_path / "bad")


# --------------------------------------------------------------------------- the stages on a micro set


@pytest.fixture(scope="module")
def micro_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("micro")
    episodes = [[(40, "train"), (30, "train"), (20, "heldout")], [(40, "train"), (20, "heldout")]]
    return write_synthetic_trajectories(root / "raw", episodes, size=(24, 32))


def test_pretrained_path_through_the_stage(tmp_path: Path, micro_set: Path) -> None:
    """base_autoencoder with autoencoder.pretrained: loads the local VAE unchanged and measures its scaling."""
    from components.stages import base_autoencoder

    vae = tiny_vae(2)
    vae.save_pretrained(tmp_path / "sd" / "vae", safe_serialization=True)
    params = write_micro_params(tmp_path, autoencoder={"pretrained": str(tmp_path / "sd")})
    args = argparse.Namespace(
        params=str(params), trajectories=str(micro_set), out=str(tmp_path / "base"),
        metrics=str(tmp_path / "metrics.json"), curve=str(tmp_path / "curve.json"), plots=str(tmp_path / "curves"),
        cache="",
    )
    base_autoencoder.main(args)
    autoencoder = load_autoencoder(tmp_path / "base")
    for (name, a), (_, b) in zip(vae.state_dict().items(), autoencoder.vae.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["source"] == "pretrained" and metrics["scaling_factor"] == pytest.approx(autoencoder.scaling_factor)
    assert autoencoder.scaling_factor > 0


def test_stages_train_and_finetuned_decoder_beats_base(tmp_path: Path, micro_set: Path) -> None:
    """base_autoencoder -> validated_latents -> finetuned_vae on a micro set; the fine-tune raises held-out PSNR."""
    from components.stages import base_autoencoder, finetuned_vae, validated_latents

    params = str(write_micro_params(tmp_path))
    base = tmp_path / "data" / "base_autoencoder"
    base_autoencoder.main(argparse.Namespace(
        params=params, trajectories=str(micro_set), out=str(base), metrics=str(tmp_path / "m_base.json"),
        curve=str(tmp_path / "curve.json"), plots=str(tmp_path / "curves"),
        cache=str(tmp_path / ".cache" / "base_autoencoder"),
    ))
    autoencoder = load_autoencoder(base)
    metrics = json.loads((tmp_path / "m_base.json").read_text())
    assert metrics["steps"] == 60 and metrics["eval_split"] == "heldout"
    assert autoencoder.latent_shape == (4, 12, 16)

    latents = tmp_path / "data" / "validated_latents"
    validated_latents.main(argparse.Namespace(
        params=params, trajectories=str(micro_set), autoencoder=str(base), out=str(latents),
        report=str(tmp_path / "report.json"),
    ))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["success"]
    # the stored latents are what the autoencoder's encode returns, and have roughly unit scale
    from components.data.trajectory_store import TrajectoryStore

    store = TrajectoryStore(latents)
    first = torch.from_numpy(np.array(TrajectoryStore(micro_set).shards[0].array("frames")[:4]))
    with torch.no_grad():
        expected = autoencoder.encode(first.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(torch.from_numpy(np.array(store.shards[0].array("latents")[:4])).float(), expected,
                               atol=2e-2, rtol=2e-2)
    assert 0.5 < float(np.std(np.array(store.shards[0].array("latents"), np.float32))) < 2.0

    out = tmp_path / "data" / "finetuned_vae"
    finetuned_vae.main(argparse.Namespace(
        params=params, trajectories=str(micro_set), latents=str(latents), autoencoder=str(base), out=str(out),
        metrics=str(tmp_path / "m_ft.json"), plots=str(tmp_path / "plots"),
        cache=str(tmp_path / ".cache" / "finetuned_vae"),
    ))
    result = json.loads((tmp_path / "m_ft.json").read_text())
    assert result["eval_split"] == "heldout"
    assert result["psnr_after"] > result["psnr_before"], result
    assert (tmp_path / "plots" / "reconstructions.png").is_file()
    tuned = load_autoencoder(out)
    assert tuned.scaling_factor == autoencoder.scaling_factor
    for name, weight in autoencoder.vae.encoder.state_dict().items():  # the encoder is frozen
        torch.testing.assert_close(tuned.vae.encoder.state_dict()[name], weight, msg=name)
    decoder_changed = any(
        not torch.equal(tuned.vae.decoder.state_dict()[n], w) for n, w in autoencoder.vae.decoder.state_dict().items()
    )
    assert decoder_changed
    assert 0.0 < result["sharpness_before"] < 2.0 and 0.0 < result["sharpness_after"] < 2.0

    # the detail term: the same fine-tune with it keeps more of the real frames' Laplacian energy than MSE alone
    detailed = tmp_path / "data" / "finetuned_vae_detail"
    finetuned_vae.main(argparse.Namespace(
        params=str(write_micro_params(tmp_path, finetuned_vae={"detail_weight": 10.0, "detail_patch": 4})),
        trajectories=str(micro_set), latents=str(latents), autoencoder=str(base), out=str(detailed),
        metrics=str(tmp_path / "m_detail.json"), plots=str(tmp_path / "plots_detail"), cache="",
    ))
    with_detail = json.loads((tmp_path / "m_detail.json").read_text())
    assert with_detail["detail_weight"] == 10.0
    assert with_detail["sharpness_after"] > result["sharpness_after"] + 0.05, (with_detail, result)


@pytest.mark.slow
def test_the_micro_pipeline_reaches_finetuned_vae_and_reruns_nothing(micro_pipeline: Path) -> None:
    """The real micro pipeline (the shared `dvc repro`): rl_agent -> raw_trajectories -> ... -> finetuned_vae; asked
    again for finetuned_vae, DVC finds every stage up to it unchanged and runs none."""
    autoencoder = load_autoencoder(micro_pipeline / "data" / "finetuned_vae")
    assert autoencoder.frame_size == (24, 32)
    report = json.loads((micro_pipeline / "reports" / "validated_latents.json").read_text())
    assert report["success"] is True
    metrics = json.loads((micro_pipeline / "metrics" / "finetuned_vae.json").read_text())
    assert {"psnr_before", "psnr_after", "ssim_before", "ssim_after"} <= set(metrics)
    assert (micro_pipeline / "plots" / "finetuned_vae" / "reconstructions.png").is_file()
    again = run(["dvc", "repro", "finetuned_vae"], micro_pipeline)
    assert "Running stage" not in again.stdout and "didn't change" in again.stdout, again.stdout
