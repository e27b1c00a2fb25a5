"""The action warp: it moves latents as documented, its fit finds the motion in data, and the world model's
output depends on the action through it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from components.models.motion_warp import ActionWarp, LatentGeometry, fit_action_warp
from components.models.world_model import ActionConditionedUNet, WorldModelConfig
from components.params import parse_params
from tests.fixtures.params import micro_params_dict

SIZE = (12, 16)
HUD_ROWS = 3


def smooth_latents(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    wide = torch.randn(count, 4, SIZE[0] * 2, SIZE[1] * 2 + 12, generator=generator)
    return torch.nn.functional.avg_pool2d(wide, 2)[..., 3 : 3 + SIZE[1]].contiguous()


def test_resample_is_the_identity_at_rest_and_moves_whole_cells() -> None:
    latent = smooth_latents(2)
    for mode in ("nearest", "linear"):
        warp = ActionWarp(2, SIZE, mode)
        assert torch.allclose(warp.resample(latent, torch.zeros(2, 3)), latent, atol=1e-6)
        moved = warp.resample(latent, torch.tensor([[2.0, 0.0, 0.0]] * 2))
        assert torch.allclose(moved[..., 2:], latent[..., :-2], atol=1e-6)  # content moved right by 2 cells
        assert torch.allclose(moved[..., :2], latent[..., :1].expand(-1, -1, -1, 2), atol=1e-6)  # edge repeated
    nearest, linear = ActionWarp(2, SIZE, "nearest"), ActionWarp(2, SIZE, "linear")
    half = torch.tensor([[1.4, 0.0, 0.0]] * 2)
    assert torch.allclose(nearest.resample(latent, half)[..., 1:], latent[..., :-1], atol=1e-6)  # whole codes
    blended = 0.6 * latent[..., 1:-1] + 0.4 * latent[..., :-2]
    assert torch.allclose(linear.resample(latent, half)[..., 2:], blended, atol=1e-5)
    zoomed = nearest.resample(latent, torch.tensor([[0.0, 0.0, 0.3]] * 2))
    assert zoomed.shape == latent.shape and not torch.allclose(zoomed, latent)


def pan_frames(count: int, pans: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [N,3,H,W] at 4 px per latent cell and the same frames panned ``pans`` [N] px, HUD rows still."""
    frames = torch.nn.functional.interpolate(smooth_latents(count, seed)[:, :3], scale_factor=4, mode="bilinear")
    frames = frames.sigmoid()
    moved = torch.stack([torch.cat([f[..., :1].expand(-1, -1, int(p)), f[..., : f.shape[-1] - int(p)]], -1)
                         if p >= 0 else torch.cat([f[..., -int(p):], f[..., -1:].expand(-1, -1, -int(p))], -1)
                         for f, p in zip(frames, pans, strict=True)])
    moved[:, :, -HUD_ROWS * 4 :] = frames[:, :, -HUD_ROWS * 4 :]
    return frames, moved


def test_fit_measures_each_action_pairs_pan_in_pixels_and_keeps_the_hud_still() -> None:
    """A turn pans 4 px when it starts (after action 0) and 8 px when held (after itself): the table learns both;
    the gate closes on the HUD rows."""
    warp = ActionWarp(4, SIZE)
    count = 240
    previous = torch.arange(count) % 2 * torch.where(torch.arange(count) % 4 < 2, 1, 2)  # 0 or the same turn
    current = torch.where(torch.arange(count) % 4 < 2, 1, 2)
    pans = torch.where(previous == 0, 4, 8) * torch.where(current == 1, 1, -1)
    frames, moved = pan_frames(count, pans)
    last = smooth_latents(count)
    cells = [warp.resample(last[i : i + 1], torch.tensor([[float(p) / 4, 0.0, 0.0]])) for i, p in enumerate(pans)]
    target = torch.cat(cells)
    target[:, :, -HUD_ROWS:] = last[:, :, -HUD_ROWS:]
    context_actions = torch.stack([torch.zeros(count, dtype=torch.long), previous, current], 1)
    fit_action_warp(warp, last, context_actions, target, frames.numpy(), moved.numpy(), LatentGeometry(4),
                    view_rows=1 - HUD_ROWS / SIZE[0])
    table = warp.motion
    assert table[0, 1, 0] == pytest.approx(1.0, abs=0.15) and table[1, 1, 0] == pytest.approx(2.0, abs=0.15)
    assert table[0, 2, 0] == pytest.approx(-1.0, abs=0.15) and table[2, 2, 0] == pytest.approx(-2.0, abs=0.15)
    assert table[3, 1, 0] == pytest.approx(1.5, abs=0.4)  # a pair never seen: the action's median over all pairs
    assert table[:, 3].abs().max() == 0  # an action never taken does not move
    assert table[..., 2].abs().max() < 0.05  # pans, no zoom
    assert set(warp.gate.unique().tolist()) <= {0.0, 1.0}
    assert warp.gate[-HUD_ROWS:].max() == 0 and warp.gate[: -HUD_ROWS - 1].mean() > 0.9
    assert warp.describe(["noop", "left", "right", "never"])["left"]["dx_cells_from_noop"] == pytest.approx(1, abs=0.15)


def micro_net(action_warp: bool = True) -> ActionConditionedUNet:
    params = parse_params(micro_params_dict(world_model={"action_warp": action_warp}))
    torch.manual_seed(0)
    return ActionConditionedUNet.from_params(params.world_model, 4, (8, 8), 3)


def test_the_action_reaches_the_output_through_the_warp() -> None:
    """With identical action tokens (cross-attention cannot tell the actions apart) the prediction still depends
    on the action, because each action warps the last latent differently; without a warp it does not."""
    for action_warp in (True, False):
        net = micro_net(action_warp).eval()
        with torch.no_grad():
            net.action_embedding.weight.zero_()
            torch.nn.init.normal_(net.unet.conv_in.weight, std=0.3)  # the untrained context channels start small
            if action_warp:
                net.action_warp.motion[:, 1, 0] = 2.0  # action 1 pans the view 2 cells
        context = smooth_latents(2)[:, :, :8, :8].unsqueeze(1).expand(-1, 2, -1, -1, -1).contiguous()
        x, t, buckets = torch.randn(2, 4, 8, 8), torch.full((2,), 500), torch.zeros(2, dtype=torch.long)
        with torch.no_grad():
            outputs = [net(x, t, context, torch.tensor([[0, a], [0, a]]), buckets) for a in (0, 1)]
        differ = (outputs[0] - outputs[1]).abs().mean().item()
        assert (differ > 1e-3) if action_warp else (differ < 1e-6), (action_warp, differ)


def test_the_warp_is_part_of_the_model_and_old_configs_load_without_it() -> None:
    net = micro_net()
    assert net.unet.conv_in.in_channels == 4 * (2 + 2)  # target, K = 2 context latents, the warped one
    assert {"action_warp.motion", "action_warp.gate", "action_warp.centre"} <= set(net.state_dict())
    assert not [name for name, _ in net.named_parameters() if name.startswith("action_warp")]  # fitted, not trained

    old = net.config.to_dict()
    old.pop("action_warp")
    old.pop("warp_resampling")
    old["unet"] = {**old["unet"], "in_channels": 4 * 3}
    plain = ActionConditionedUNet(WorldModelConfig.from_dict(old))
    assert plain.action_warp is None and not dataclasses.asdict(plain.config)["action_warp"]


def test_a_residual_model_that_predicts_nothing_copies_the_moved_last_latent() -> None:
    """predict_residual: the diffused quantity is (next - base) / scale, so a UNet whose output is zero samples
    the base itself, the last latent moved by its action (the paper's parametrisation would sample a blank)."""
    from components.models.distillation import OneStepStudent
    from components.models.sampler import sample_next_latent
    from components.models.world_model import make_scheduler

    net = micro_net().eval()
    with torch.no_grad():
        net.action_warp.motion[:, 1, 0] = 2.0
        net.residual_scale.fill_(0.5)
        net.unet.conv_out.weight.zero_()
        net.unet.conv_out.bias.zero_()
    context = smooth_latents(2)[:, :, :8, :8].unsqueeze(1).expand(-1, 2, -1, -1, -1).contiguous()
    actions = torch.tensor([[0, 1], [0, 0]])
    base = net.residual_base(context, actions)
    assert torch.allclose(base[1], context[1, -1]) and not torch.allclose(base[0], context[0, -1])
    target = smooth_latents(2, seed=5)[:, :, :8, :8]
    assert torch.allclose(net.from_residual(net.to_residual(target, base), base), target, atol=1e-6)
    sampled = sample_next_latent(net, make_scheduler(net.config), context, actions, steps=1, cfg=1.0,
                                 generator=torch.Generator().manual_seed(0))
    assert (sampled - base).abs().max() < 0.1  # the last DDIM step keeps sqrt(1 - alpha_bar_0) of the noise
    student = OneStepStudent.from_teacher(net, steps=1, cfg=1.0, context_noise_level=0.0, noise_seed=0)
    with torch.no_grad():
        assert (student(context, actions) - base).abs().max() < 0.1

    plain = micro_net()
    plain.config.predict_residual = False  # the paper's parametrisation: no base
    assert plain.residual_base(context, actions) is None and plain.to_residual(target, None) is target
