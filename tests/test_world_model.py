"""The diffusion world model: conditioning is used, training learns, sampling and loading work.

A short real training run (about 200 steps on synthetic latents whose next frame depends on the action,
tests/fixtures/stores.py) is shared by the tests in this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from components.errors import PipelineError
from components.evaluation.actions import action_kinds, action_loss_weights
from components.metrics import weighted_mse
from components.models.sampler import Sampler, make_scheduler, rollout, sample_next_latent
from components.models.world_model import ActionConditionedUNet, load_world_model, noise_bucket
from components.models.world_model_training import Batch, WindowStream, diffusion_loss, open_latents, train
from components.params import ParamsError, parse_params
from tests.fixtures.models import tiny_autoencoder
from tests.fixtures.params import micro_params_dict
from tests.fixtures.stores import LATENT_SHAPE, next_latent, write_synthetic_latents

TRAIN = {"steps": 200, "batch_size": 16, "learning_rate": 0.003, "log_every": 20, "checkpoint_every": 100}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("world_model")
    params = parse_params(micro_params_dict(diffusion_checkpoint=TRAIN))
    latents = write_synthetic_latents(root / "latents", len(params.environment.actions), frames_root=root / "frames")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; one thread is the fastest under contention
    try:
        run = train(params, latents, cache_root=root / "cache", live_dir=root / "dvclive",
                    frames_root=root / "frames")
    finally:
        torch.set_num_threads(threads)
    store = open_latents(latents, params.world_model.context, len(params.environment.actions))
    batch = WindowStream(store, params.world_model.context, "heldout", 0).read(list(range(8)))
    return {"root": root, "params": params, "result": run.result, "world_model": run.world_model, "batch": batch,
            "autoencoder": tiny_autoencoder(folder=root / "autoencoder", norm_groups=8)}


def _sample(world_model: ActionConditionedUNet, batch: Any, action: int | None = None, cfg: float = 1.5,
            bucket: int | None = None, noise_level: float = 0.0) -> torch.Tensor:
    actions = batch.context_actions.clone()
    if action is not None:
        actions[:, -1] = action
    return sample_next_latent(world_model, make_scheduler(world_model.config), batch.context_latents, actions,
                              steps=4, cfg=cfg, context_noise_level=noise_level,
                              generator=torch.Generator().manual_seed(0), noise_bucket_override=bucket)


def test_loss_goes_down_and_dvclive_logs(trained: dict[str, Any]) -> None:
    losses = [loss for _, loss in trained["result"].losses]
    assert trained["result"].steps == TRAIN["steps"]
    assert losses[-1] < 0.7 * losses[0], losses
    metrics = (trained["root"] / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(metrics) == 2 + TRAIN["steps"] // TRAIN["log_every"]  # the header, the first step, every log_every


def _training_timesteps(world_model: ActionConditionedUNet, batch: Any, terminal_share: float,
                        seed: int) -> tuple[torch.Tensor, float]:
    """The timesteps one ``diffusion_loss`` call trains at (read by a forward pre-hook), and the loss."""
    seen: list[torch.Tensor] = []
    hook = world_model.register_forward_pre_hook(lambda _module, args: seen.append(args[1].clone()))
    try:
        loss = diffusion_loss(world_model, make_scheduler(world_model.config, "ddpm"), batch, world_model.config,
                              0.0, torch.Generator().manual_seed(seed), terminal_share)
    finally:
        hook.remove()
    return seen[0], loss.item()


def test_terminal_share_trains_where_the_one_step_student_runs(trained: dict[str, Any]) -> None:
    """diffusion_checkpoint.terminal_share: that share of the examples is trained at the last timestep (the first
    DDIM step, where the student runs); at 0 the draws are the uniform ones of a run without it."""
    world_model, batch = trained["world_model"], trained["batch"]
    last = world_model.config.num_train_timesteps - 1
    ddim = make_scheduler(world_model.config)
    ddim.set_timesteps(1)
    assert int(ddim.timesteps[0]) == last
    with torch.no_grad():
        uniform, uniform_loss = _training_timesteps(world_model, batch, 0.0, seed=3)
        terminal, _ = _training_timesteps(world_model, batch, 0.999, seed=3)
        large = Batch(batch.context_latents.repeat(40, 1, 1, 1, 1), batch.context_actions.repeat(40, 1),
                      batch.target.repeat(40, 1, 1, 1))
        mixed, _ = _training_timesteps(world_model, large, 0.5, seed=3)
        plain = diffusion_loss(world_model, make_scheduler(world_model.config, "ddpm"), batch, world_model.config,
                               0.0, torch.Generator().manual_seed(3))
    assert (uniform < last).all() and len(set(uniform.tolist())) > 1
    assert plain.item() == uniform_loss  # no extra random draw at 0
    assert (terminal == last).all()
    share = (mixed == last).float().mean().item()
    assert 0.35 < share < 0.65, share  # 320 draws of p = 0.5


def test_moving_weight_counts_a_moving_window_as_that_many_copies(trained: dict[str, Any]) -> None:
    """diffusion_checkpoint.moving_weight: a window whose last action moves weighs as much as that many copies of it
    (the loss of a batch where it is repeated), the others 1; at 1 the loss is the plain mean."""
    world_model, batch, params = trained["world_model"], trained["batch"], trained["params"]
    actions = params.environment.actions
    moving = [i for i, kind in enumerate(action_kinds(actions)) if kind == "moving"]
    weights = action_loss_weights(actions, 3.0)
    assert weights is not None and action_loss_weights(actions, 1.0) is None
    assert weights.tolist() == [3.0 if i in moving else 1.0 for i in range(len(actions))]
    two = Batch(batch.context_latents[:2], batch.context_actions[:2].clone(), batch.target[:2])
    two.context_actions[:, -1] = torch.tensor([moving[0], 0])
    copies = Batch(two.context_latents[[0, 0, 0, 1]], two.context_actions[[0, 0, 0, 1]], two.target[[0, 0, 0, 1]])

    def loss(of: Batch, action_weights: torch.Tensor | None) -> float:  # no noise or dropout draws: same inputs
        with torch.no_grad():
            timesteps = torch.full((len(of.target),), 500)
            scheduler = make_scheduler(world_model.config, "ddpm")
            target = world_model.to_residual(of.target, world_model.residual_base(of.context_latents,
                                                                                  of.context_actions))
            noise = torch.ones_like(target)
            predicted = world_model(scheduler.add_noise(target, noise, timesteps), timesteps, of.context_latents,
                                    of.context_actions, torch.zeros(len(of.target), dtype=torch.long))
            return weighted_mse(predicted, scheduler.get_velocity(target, noise, timesteps),
                                of.context_actions[:, -1], action_weights).item()

    assert loss(two, weights) == pytest.approx(loss(copies, None), rel=1e-5)
    assert loss(two, weights) != pytest.approx(loss(two, None), rel=1e-3)
    with torch.no_grad():  # and the stage's loss takes them
        weighted = diffusion_loss(world_model, make_scheduler(world_model.config, "ddpm"), two, world_model.config,
                                  0.0, torch.Generator().manual_seed(3), 0.0, weights)
        plain = diffusion_loss(world_model, make_scheduler(world_model.config, "ddpm"), two, world_model.config,
                               0.0, torch.Generator().manual_seed(3))
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-4)


def test_actions_give_different_next_frames(trained: dict[str, Any]) -> None:
    """Each action's prediction is nearest to that action's true next latent, and the frames differ."""
    world_model, batch = trained["world_model"], trained["batch"]
    last = batch.context_latents[:, -1].numpy()
    truths = {a: torch.from_numpy(np.stack([next_latent(x, a) for x in last])) for a in (0, 1, 2)}
    predictions = {a: _sample(world_model, batch, action=a) for a in (0, 1, 2)}
    for a, predicted in predictions.items():
        errors = {b: (predicted - truth).pow(2).mean().item() for b, truth in truths.items()}
        assert min(errors, key=errors.get) == a, (a, errors)
    assert (predictions[0] - predictions[2]).abs().mean() > 0.2

    sampler = Sampler(world_model, trained["autoencoder"], steps=4, cfg=1.5, context_noise_level=0.0, seed=0)
    frames = []
    for action in (0, 2):
        sampler.reset(batch.context_latents[0], batch.context_actions[0, :-1])
        sampler.generator.manual_seed(0)
        frames.append(sampler.step(action))
    assert frames[0].shape == (3, 24, 32)
    assert (frames[0] - frames[1]).abs().mean() > 1e-3


def test_a_one_frame_context_trains_and_its_actions_steer_the_sampler(tmp_path: Path) -> None:
    """The paper's context ablation down to K = 1 (`make ablations`' `context-1`): the warp is fitted, one context
    latent trains, and the sampled next latent depends on the action."""
    params = parse_params(micro_params_dict(world_model={"context": 1}, diffusion_checkpoint={**TRAIN, "steps": 20}))
    num_actions = len(params.environment.actions)
    latents = write_synthetic_latents(tmp_path / "latents", num_actions, frames_root=tmp_path / "frames")
    run = train(params, latents, cache_root=tmp_path / "cache", frames_root=tmp_path / "frames")
    assert run.result.steps == 20 and all(np.isfinite(loss) for _, loss in run.result.losses)
    warp = run.world_model.action_warp
    assert warp is not None and warp.motion.abs().sum() > 0  # measured on the frames, not left at zero
    batch = WindowStream(open_latents(latents, 1, num_actions), 1, "heldout", 0).read(list(range(4)))
    assert tuple(batch.context_latents.shape[:2]) == (4, 1)
    predictions = {a: _sample(run.world_model, batch, action=a) for a in (0, 2)}
    assert predictions[0].shape == batch.target.shape
    assert (predictions[0] - predictions[2]).abs().mean() > 1e-3


def test_cfg_changes_the_output(trained: dict[str, Any]) -> None:
    world_model, batch = trained["world_model"], trained["batch"]
    plain, guided = _sample(world_model, batch, cfg=1.0), _sample(world_model, batch, cfg=1.5)
    assert (plain - guided).abs().mean() > 1e-3
    assert torch.equal(guided, _sample(world_model, batch, cfg=1.5))  # same seed, same draw


def test_noise_buckets_change_the_output(trained: dict[str, Any]) -> None:
    world_model, batch = trained["world_model"], trained["batch"]
    buckets = world_model.config.noise_buckets
    x = torch.randn(len(batch.target), *LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    t = torch.full((len(x),), 500)
    with torch.no_grad():
        low = world_model(x, t, batch.context_latents, batch.context_actions, torch.zeros(len(x), dtype=torch.long))
        high = world_model(x, t, batch.context_latents, batch.context_actions, torch.full((len(x),), buckets - 1))
    assert (low - high).abs().mean() > 1e-3
    assert (_sample(world_model, batch, bucket=0) - _sample(world_model, batch, bucket=buckets - 1)).abs().mean() > 1e-3
    assert noise_bucket(torch.tensor([0.0, 0.069, 0.07, 0.69, 0.7, 5.0]), 0.7, 10).tolist() == [0, 0, 1, 9, 9, 9]


def test_rollout_is_autoregressive_and_reproducible(trained: dict[str, Any]) -> None:
    world_model, batch, autoencoder = trained["world_model"], trained["batch"], trained["autoencoder"]
    start = batch.context_latents[0]
    actions = [2, 2, 0, 1]
    frames, latents = rollout(world_model, start, batch.context_actions[0, :-1], actions, autoencoder=autoencoder,
                              steps=2, seed=3)
    assert frames.shape == (4, 3, 24, 32) and latents.shape == (4, *LATENT_SHAPE)
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    again, latents_again = rollout(world_model, start, batch.context_actions[0, :-1], actions,
                                   autoencoder=autoencoder, steps=2, seed=3)
    assert torch.equal(latents, latents_again)
    # the model moves the bar right twice, then left: its column follows the actions
    columns = [int(latent[1].mean(0).argmax()) for latent in latents]
    first = int(start[-1][1].mean(0).argmax())
    assert columns[:2] == [(first + 1) % 8, (first + 2) % 8], (first, columns)

    sampler = Sampler(world_model, autoencoder, steps=2, cfg=1.5)
    sampler.reset(autoencoder.decode(start), batch.context_actions[0, :-1])  # frames in, encoded
    assert sampler.latents.shape == (world_model.config.context, *LATENT_SHAPE)
    sampler.reset(start[-1:], [])  # fewer frames than K: the oldest repeats
    assert sampler.latents.shape == (world_model.config.context, *LATENT_SHAPE) and sampler.actions.tolist() == [0]
    with pytest.raises(ValueError, match="context actions"):
        sampler.reset(start, [1, 2, 3])


def test_save_and_load(trained: dict[str, Any], tmp_path: Path) -> None:
    world_model, batch = trained["world_model"], trained["batch"]
    world_model.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json", "model.safetensors", "scheduler_config.json"]
    loaded = load_world_model(tmp_path / "model")
    assert loaded.config == world_model.config
    assert torch.equal(_sample(world_model, batch), _sample(loaded, batch))
    with pytest.raises(PipelineError, match="no world model"):
        load_world_model(tmp_path / "missing")


def test_pretrained_unet_folder_widens_conv_in(tmp_path: Path) -> None:
    """A local UNet saved with save_pretrained: conv_in widened to C*(K+2) (K context latents and the warped
    one), the extra weights start at zero."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    pretrained = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    )
    pretrained.save_pretrained(tmp_path / "unet")
    overrides = {"pretrained_unet": str(tmp_path / "unet"), "context": 3}
    sampler = parse_params(micro_params_dict(world_model=overrides)).world_model
    world_model = ActionConditionedUNet.from_params(sampler, 4, (8, 8), num_actions=5)
    weight = world_model.unet.conv_in.weight
    assert weight.shape[1] == 4 * (3 + 2)
    assert torch.equal(weight[:, :4], pretrained.conv_in.weight)
    assert torch.count_nonzero(weight[:, 4:]) == 0
    assert world_model.config.cross_attention_dim == 24  # the action tokens take the pretrained width

    # at the start the context is ignored and the model is the pretrained UNet, whatever the bucket
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    actions = torch.tensor([[1, 2, 3], [4, 0, 1]])
    with torch.no_grad():
        ours = world_model(x, t, torch.randn(2, 3, 4, 8, 8), actions, torch.tensor([0, 9]))
        theirs = pretrained(x, t, encoder_hidden_states=world_model.action_tokens(actions)).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    wm_bad = parse_params(micro_params_dict(world_model={"pretrained_unet": str(tmp_path / "nothing")})).world_model
    with pytest.raises(PipelineError, match="not a diffusers UNet folder"):
        ActionConditionedUNet.from_params(wm_bad, 4, (8, 8), num_actions=5)


def test_bad_model_params_name_the_key() -> None:
    sampler = parse_params(micro_params_dict(world_model={"block_out_channels": [16, 32, 64]})).world_model
    with pytest.raises(ParamsError, match="world_model.down_block_types"):
        ActionConditionedUNet.from_params(sampler, 4, (8, 8), num_actions=5)
    with pytest.raises(ParamsError, match="diffusion_checkpoint.optimizer"):
        parse_params(micro_params_dict(diffusion_checkpoint={"optimizer": "sgd"}))


def test_adafactor_option_trains(tmp_path: Path) -> None:
    params = parse_params(micro_params_dict(diffusion_checkpoint={"optimizer": "adafactor", "steps": 3,
                                                                  "log_every": 1, "ema_decay": 0.9}))
    latents = write_synthetic_latents(tmp_path / "latents", len(params.environment.actions), shards=1, episodes=2,
                                      frames_root=tmp_path / "frames")
    result = train(params, latents, cache_root=tmp_path / "cache", live_dir=None,
                   frames_root=tmp_path / "frames").result
    assert result.steps == 3 and all(np.isfinite(loss) for _, loss in result.losses)


def test_time_budget_fixes_the_step_count_once(tmp_path: Path) -> None:
    """With train_minutes, the step count is planned after timing the first steps and kept on resume."""
    from components.training import PLAN_AT, load_checkpoint

    params = parse_params(micro_params_dict(diffusion_checkpoint={"train_minutes": 1e-4, "steps": 500,
                                                                  "checkpoint_every": 1000}))
    latents = write_synthetic_latents(tmp_path / "latents", len(params.environment.actions), shards=1, episodes=2,
                                      frames_root=tmp_path / "frames")
    first = train(params, latents, cache_root=tmp_path / "cache", live_dir=None, frames_root=tmp_path / "frames").result
    assert first.planned_steps == first.steps == PLAN_AT  # the budget is spent: stop as soon as it is measured
    (checkpoint,) = (tmp_path / "cache").glob("*/checkpoint.safetensors")
    counters = load_checkpoint(checkpoint).counters
    assert counters["step"] == counters["planned"] == PLAN_AT
    again = train(params, latents, cache_root=tmp_path / "cache", live_dir=None, frames_root=tmp_path / "frames").result
    assert again.resumed_from_step == again.steps == PLAN_AT
