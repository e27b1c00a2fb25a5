"""The 1-step model (stage ``distilled_model``): the teacher's one-step sampler, then trained further.

The teacher is the world model of ``diffusion_checkpoint`` sampled as ``params.sampler`` says: DDIM with
``steps`` steps, classifier-free guidance ``cfg`` on the past frames (``components.models.sampler.guided_velocity``)
and context noise of std ``context_noise_level``.

* Student: a copy of the teacher's network (same architecture, initialised from its weights) called once, at the
  first DDIM timestep ``T``, on a noise tensor ``z`` [C,h,w] and with a context noise ``e`` [K,C,h,w] that are
  drawn once from ``distilled_model.noise_seed`` and frozen into it as buffers, and *without* guidance (one UNet
  call); its velocity becomes the one-step DDIM result ``c_x * z + c_v * v`` (plus the residual base, with
  ``world_model.predict_residual``). At initialisation it is exactly the teacher's 1-step, guidance-free sample.
  Every sample of every batch uses the same ``z`` and ``e``, so the export is deterministic and parity-testable.
* Training (``distilled_model.target``), MSE on latents over training windows:

  - ``data`` (default): the recorded next latent. At ``T`` the teacher's one-step answer is already its estimate
    of the mean next latent; this regression keeps training exactly that, on ``rollout_steps`` steps of the
    student's own rollout: after the first step its context ends with its own (detached) predictions, so it
    learns to continue from what it made (DIAMOND trains on several autoregressive steps for the same reason).
  - ``teacher``: *fixed-noise regression onto the teacher's sampler output*, the simplest form of
    consistency/progressive distillation: ``y = teacher(ctx + level * e', actions, x_T = z')``, the teacher's
    full multi-step CFG sampling as ``components.models.sampler.sample_next_latent`` computes it. With
    ``teacher_noise: fresh`` ``z'`` and ``e'`` are new for every window, so the student learns ``E[y]``, the mean
    of the teacher's samples; with ``frozen`` ``z' = z`` and ``e' = e``: it copies one sample.

  With ``adversarial_weight`` > 0 (off by default: README "Distillation") a patch critic on latents (``LatentCritic``)
  trains
  beside the student and the student also pays ``-D(its latent)``: a blurred mean that MSE accepts costs what makes
  it look unlike a real latent.

  README "Distillation" gives the measurements behind the default.
* Guidance and the context noise are thereby baked into the student: it needs one UNet call per frame,
  against ``steps * 2`` for the teacher (two per step with guidance).

The paper uses DMD/VSD (a fake-score network and a distribution-matching loss), which keeps sample
diversity; both regressions give a deterministic model per context, which the metrics below measure.

Interface::

    student = OneStepStudent.from_teacher(teacher, steps=4, cfg=1.5, context_noise_level=0.1, noise_seed=0)
    next_latent = student(context_latents [B,K,C,h,w], context_actions [B,K])   # [B,C,h,w]
    student.save(folder); student = load_student(folder)
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from components.atomic import atomic_directory, atomic_write_json, save_safetensors
from components.data.windows import LatentWindows
from components.errors import PipelineError
from components.metrics import detail_loss, pooled_psnr, weighted_mse
from components.models.sampler import guided_velocity
from components.models.world_model import (
    ActionConditionedUNet,
    Scheduler,
    WorldModelConfig,
    make_scheduler,
    noise_bucket,
)

if TYPE_CHECKING:
    from components.models.autoencoder import FrameAutoencoder


log = logging.getLogger(__name__)

STUDENT_CONFIG = "student.json"
STUDENT_WEIGHTS = "student.safetensors"
# the autoencoder whose decoder ships with the student (components.models.rollout_decoder)
STUDENT_AUTOENCODER = "autoencoder"
FORMAT = "gamengen-one-step-student/1"


@dataclass(frozen=True)
class StudentSettings:
    """How the teacher was sampled and how the student calls the network (saved as ``student.json``)."""

    teacher_steps: int
    cfg: float
    context_noise_level: float
    noise_bucket: int
    timestep: int  # the first DDIM timestep of the teacher's schedule, where the student runs
    coef_x: float  # one-step DDIM: next = coef_x * z + coef_v * v
    coef_v: float
    noise_seed: int
    target: str = "teacher"  # what the student was trained to match: the teacher's samples, or the data
    rollout_steps: int = 1  # steps of its own rollout it trained on


def one_step_coefficients(scheduler: Scheduler, timestep: int) -> tuple[float, float]:
    """``(c_x, c_v)`` with ``scheduler.step(v, t, x).prev_sample == c_x * x + c_v * v`` for a 1-step DDIM schedule.

    With v-prediction: ``x0 = a x - s v``, ``eps = s x + a v`` (``a = sqrt(alpha_bar_t)``, ``s = sqrt(1 -
    alpha_bar_t)``)
    and ``prev = a' x0 + s' eps`` with ``alpha_bar`` of the final step (``final_alpha_cumprod``).
    """
    alpha = float(scheduler.alphas_cumprod[timestep])
    alpha_prev = float(scheduler.final_alpha_cumprod)
    a, s = alpha**0.5, (1.0 - alpha) ** 0.5
    a_prev, s_prev = alpha_prev**0.5, (1.0 - alpha_prev) ** 0.5
    return a_prev * a + s_prev * s, -a_prev * s + s_prev * a


class OneStepStudent(nn.Module):
    """The distilled 1-step world model: ``(context_latents, context_actions) -> next_latent``.

    Holds a copy of the teacher's network plus the frozen noise ``target_noise`` [C,h,w] and
    ``context_eps`` [K,C,h,w]; see the module docstring.
    """

    target_noise: torch.Tensor  # buffers, registered in __init__
    context_eps: torch.Tensor

    def __init__(self, net: ActionConditionedUNet, settings: StudentSettings,
                 target_noise: torch.Tensor, context_eps: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.settings = settings
        self.register_buffer("target_noise", target_noise.float().contiguous())
        self.register_buffer("context_eps", context_eps.float().contiguous())

    @property
    def config(self) -> WorldModelConfig:
        return self.net.config

    @classmethod
    def from_teacher(cls, teacher: ActionConditionedUNet, steps: int, cfg: float, context_noise_level: float,
                     noise_seed: int, target: str = "teacher", rollout_steps: int = 1) -> OneStepStudent:
        """A student initialised from (a deep copy of) ``teacher``; the teacher itself is left untouched."""
        config = teacher.config
        scheduler = make_scheduler(config, "ddim")
        scheduler.set_timesteps(steps)
        timestep = int(scheduler.timesteps[0])
        scheduler.set_timesteps(1)
        if int(scheduler.timesteps[0]) != timestep:
            raise PipelineError(
                f"the scheduler's first timestep differs between {steps} steps ({timestep}) and 1 step "
                f"({int(scheduler.timesteps[0])}); use 'trailing' timestep spacing"
            )
        coef_x, coef_v = one_step_coefficients(scheduler, timestep)
        bucket = int(noise_bucket(context_noise_level, config.max_noise_level, config.noise_buckets).item())
        settings = StudentSettings(steps, float(cfg), float(context_noise_level), bucket, timestep, coef_x, coef_v,
                                   int(noise_seed), target, int(rollout_steps))
        target_noise, context_eps = fixed_noise(config, noise_seed)
        student = cls(copy.deepcopy(teacher), settings, target_noise, context_eps)
        student.net.requires_grad_(True)  # the teacher is usually frozen; its copy is what gets trained
        return student.train(False)

    def noisy_context(self, context_latents: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The context as the model sees it: ``ctx + level * e`` with the frozen ``e``, or with ``eps`` if given."""
        if self.settings.context_noise_level > 0:
            return context_latents + self.settings.context_noise_level * (self.context_eps if eps is None else eps)
        return context_latents

    def forward(self, context_latents: torch.Tensor, context_actions: torch.Tensor) -> torch.Tensor:
        batch = context_latents.shape[0]
        x = self.target_noise.unsqueeze(0).expand(batch, -1, -1, -1)
        t = torch.full_like(context_actions[:, 0], self.settings.timestep)
        buckets = torch.full_like(context_actions[:, 0], self.settings.noise_bucket)
        context = self.noisy_context(context_latents)
        v = self.net(x, t, context, context_actions, buckets)
        residual = self.settings.coef_x * x + self.settings.coef_v * v
        return self.net.from_residual(residual, self.net.residual_base(context, context_actions))

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None,
             autoencoder: FrameAutoencoder | None = None) -> Path:
        """``folder/student.json`` (settings + the network config) and ``student.safetensors``, and the
        autoencoder that ships with it in ``folder/autoencoder/`` when given, atomically."""

        with atomic_directory(folder) as staging:
            if autoencoder is not None:
                autoencoder.save(staging / STUDENT_AUTOENCODER)
            save_safetensors(staging / STUDENT_WEIGHTS, self.state_dict(), metadata={"format": FORMAT})
            atomic_write_json(staging / STUDENT_CONFIG, {
                "format": FORMAT,
                "settings": asdict(self.settings),
                "world_model": self.net.config.to_dict(),
                **(extra or {}),
            })
        return Path(folder)


def fixed_noise(config: WorldModelConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target noise [C,h,w] and context noise [K,C,h,w] drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    shape = (config.latent_channels, *config.latent_size)
    target = torch.randn(shape, generator=generator)
    context = torch.randn((config.context, *shape), generator=generator)
    return target, context


def load_student(folder: str | Path) -> OneStepStudent:
    """Load a student written by ``OneStepStudent.save`` (stage ``distilled_model``), in eval mode."""

    folder = Path(folder)
    config_path, weights_path = folder / STUDENT_CONFIG, folder / STUDENT_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise PipelineError(f"{folder}: no distilled model there (expected {STUDENT_CONFIG} and {STUDENT_WEIGHTS}); "
                            "run `dvc repro distilled_model` first")
    try:
        data = json.loads(config_path.read_text())
        if data.get("format") != FORMAT:
            raise PipelineError(f"{config_path}: format {data.get('format')!r} is not {FORMAT}; re-run the stage")
        settings = StudentSettings(**data["settings"])
        config = WorldModelConfig.from_dict(data["world_model"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PipelineError(f"{config_path}: corrupt ({error!r}); re-run `dvc repro distilled_model`") from None
    shape = (config.latent_channels, *config.latent_size)
    student = OneStepStudent(ActionConditionedUNet(config), settings, torch.zeros(shape),
                             torch.zeros((config.context, *shape)))
    try:
        student.load_state_dict(load_file(str(weights_path)))
    except Exception as error:  # safetensors / shape mismatch
        raise PipelineError(f"{weights_path}: unreadable or mismatched weights ({error}); re-run the stage") from None
    return student.eval()


# --------------------------------------------------------------------------- the teacher's output


@torch.no_grad()
def teacher_sample(teacher: ActionConditionedUNet, scheduler: Scheduler, student: OneStepStudent,
                   context_latents: torch.Tensor, context_actions: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The teacher's multi-step CFG sample: the distillation target.

    Same loop as ``components.models.sampler.sample_next_latent`` (eta 0). Without ``generator`` it starts from the
    student's frozen noise (``x_T = z``, context noise ``e``); with one, from new noise for every window.
    """
    s = student.settings
    batch, device = context_latents.shape[0], context_latents.device
    if generator is None:
        x = student.target_noise.unsqueeze(0).expand(batch, -1, -1, -1)
        context = student.noisy_context(context_latents)
    else:
        x = torch.randn((batch, *student.target_noise.shape), generator=generator).to(device)
        eps = torch.randn(context_latents.shape, generator=generator).to(device)
        context = student.noisy_context(context_latents, eps)
    buckets = torch.full((batch,), s.noise_bucket, dtype=torch.long, device=device)
    scheduler.set_timesteps(s.teacher_steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        timesteps = torch.full((batch,), int(t), dtype=torch.long, device=device)
        v = guided_velocity(teacher, x, timesteps, context, context_actions, buckets, s.cfg)
        x = scheduler.step(v, t, x, eta=0.0).prev_sample
    return teacher.from_residual(x, teacher.residual_base(context, context_actions))


# --------------------------------------------------------------------------- windows


def context_and_future(windows: LatentWindows, rows: np.ndarray, context: int, device: torch.device | str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows at ``rows`` split at ``context``: (context latents [B,K,C,h,w], the actions from the first
    context row on [B,L-1], the latents that follow [B,L-K,C,h,w])."""
    latents, actions = windows.read(rows, device)
    return latents[:, :context], actions[:, :-1], latents[:, context:]


# --------------------------------------------------------------------------- metrics


def distillation_metrics(student: OneStepStudent, teacher: ActionConditionedUNet, autoencoder: FrameAutoencoder,
                         windows: LatentWindows, picks: np.ndarray, batch_size: int = 16,
                         with_teacher: bool = True) -> dict[str, float]:
    """Next-frame PSNR on ``picks`` (rows of held-out windows of K + 1 rows), all decoded to frames.

    * ``student_psnr`` / ``teacher_psnr``: the decoded 1-step / multi-step prediction against the ground
      truth, the decoded true next latent (the autoencoder's reconstruction, the best a latent model can do);
    * ``student_vs_teacher_psnr``: the student's frames against the teacher's;
    * ``copy_last_psnr``: the baseline that decodes the last context latent (no dynamics).
    """
    scheduler = make_scheduler(teacher.config, "ddim")
    was_training = student.training
    student.eval()
    outs: dict[str, list[torch.Tensor]] = {"student": [], "teacher": [], "truth": [], "copy_last": []}
    k, device = student.config.context, student.target_noise.device
    for start in range(0, len(picks), batch_size):
        context, actions, future = context_and_future(windows, picks[start : start + batch_size], k, device)
        target = future[:, 0]
        outs["student"].append(autoencoder.decode(student(context, actions)))
        outs["truth"].append(autoencoder.decode(target))
        outs["copy_last"].append(autoencoder.decode(context[:, -1]))
        if with_teacher:
            outs["teacher"].append(autoencoder.decode(teacher_sample(teacher, scheduler, student, context, actions)))
    student.train(was_training)
    frames = {k: torch.cat(v) for k, v in outs.items() if v}
    metrics = {
        "student_psnr": pooled_psnr(frames["student"], frames["truth"]),
        "copy_last_psnr": pooled_psnr(frames["copy_last"], frames["truth"]),
        "windows": float(len(picks)),
    }
    if with_teacher:
        metrics["teacher_psnr"] = pooled_psnr(frames["teacher"], frames["truth"])
        metrics["student_vs_teacher_psnr"] = pooled_psnr(frames["student"], frames["teacher"])
    return metrics


# --------------------------------------------------------------------------- adversarial term


class LatentCritic(nn.Module):
    """A patch critic for the adversarial term: per latent cell, does ``next`` look like the latent that really
    follows ``last`` under ``action``? Spectral-normalised convolutions over [last, next, one-hot action]."""

    def __init__(self, channels: int, num_actions: int, width: int = 64) -> None:
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm
        self.num_actions = num_actions
        self.layers = nn.Sequential(
            norm(nn.Conv2d(2 * channels + num_actions, width, 3, padding=1)), nn.LeakyReLU(0.2),
            norm(nn.Conv2d(width, width, 3, padding=1)), nn.LeakyReLU(0.2),
            norm(nn.Conv2d(width, width, 3, padding=2, dilation=2)), nn.LeakyReLU(0.2),
            norm(nn.Conv2d(width, 1, 3, padding=1)),
        )

    def forward(self, last: torch.Tensor, next_latent: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Logits [B,1,h,w]: high means real."""
        onehot = F.one_hot(action, self.num_actions).to(last.dtype)[:, :, None, None]
        return self.layers(torch.cat([last, next_latent, onehot.expand(-1, -1, *last.shape[-2:])], dim=1))


class StudentAndCritic(nn.Module):
    """What trains when ``adversarial_weight`` > 0: the student and its critic, one optimizer and one checkpoint."""

    def __init__(self, student: OneStepStudent, critic: LatentCritic) -> None:
        super().__init__()
        self.student, self.critic = student, critic


def adversarial_terms(critic: LatentCritic, last: torch.Tensor, predicted: torch.Tensor, real: torch.Tensor,
                      action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's term, the critic's hinge loss). The student's term ``-D(predicted)`` reaches the student
    only: the critic is called with detached weights there. The critic's loss sees ``predicted`` detached."""
    frozen = {name: value.detach() for name, value in critic.named_parameters()}
    student_term = -torch.func.functional_call(critic, frozen, (last, predicted, action)).mean()
    critic_loss = (F.relu(1.0 - critic(last, real, action)).mean()
                   + F.relu(1.0 + critic(last, predicted.detach(), action)).mean())
    return student_term, critic_loss


def distillation_loss(student: OneStepStudent, teacher: ActionConditionedUNet, scheduler: Scheduler,
                      windows: LatentWindows, batch_size: int, rng: np.random.Generator,
                      generator: torch.Generator | None = None, target: str = "teacher",
                      rollout_steps: int = 1, detail_weight: float = 0.0, detail_patch: int = 1,
                      critic: LatentCritic | None = None, adversarial_weight: float = 0.0,
                      action_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The student's loss on a random batch of ``windows`` (training windows of K + ``rollout_steps`` rows), over
    ``rollout_steps`` steps of its own rollout.

    Step 1 starts from real context latents; each later step's context ends with the student's own (detached)
    predictions, so it learns to continue from what it made. At every step the student's latent is compared
    (MSE) with ``target``: ``teacher``, the teacher's multi-step CFG sample from the same context (``generator``
    draws fresh noise, ``teacher_noise: fresh``; None uses the student's frozen noise), or ``data``, the real
    latent that followed (regression onto the recorded play). With ``detail_weight`` > 0 each step also pays
    ``detail_weight * detail_loss``: a blurred prediction that MSE alone would accept costs what it lacks in detail.
    With a ``critic`` each step also pays ``adversarial_weight * -D(predicted)`` and the critic learns to tell the
    recorded next latent from the student's (:func:`adversarial_terms`, conditioned on the real previous latent and
    the action), so a blurred mean that MSE accepts is pushed towards latents that look like real ones.
    ``action_weights`` (per action id) weigh each window's MSE at each step by the action taken there.
    """
    k = student.config.context
    rows = rng.integers(0, len(windows), batch_size)
    context, actions, future = context_and_future(windows, rows, k, student.target_noise.device)
    real_last = context[:, -1]
    total = torch.zeros((), device=context.device)
    for step in range(rollout_steps):
        step_actions = actions[:, step : step + k]
        predicted = student(context, step_actions)
        if target == "data":
            goal = future[:, step]
        else:
            goal = teacher_sample(teacher, scheduler, student, context, step_actions, generator)
        total = total + weighted_mse(predicted, goal, step_actions[:, -1], action_weights)
        if detail_weight > 0:
            total = total + detail_weight * detail_loss(predicted, goal, detail_patch)
        if critic is not None:
            student_term, critic_loss = adversarial_terms(critic, real_last, predicted, future[:, step],
                                                          step_actions[:, -1])
            total = total + adversarial_weight * student_term + critic_loss
        real_last = future[:, step]
        context = torch.cat([context[:, 1:], predicted.detach()[:, None]], dim=1)
    return total / rollout_steps
