"""The PPO agent that plays the game for data collection: training, pickle-free snapshots, batched replay.

Training uses Stable-Baselines3 PPO with a Mnih-style CNN (``DoomCNN``, padded so it also fits tiny frames)
and 2-layer MLP heads, as in the paper (which also feeds the automap and the last 32 actions; this agent sees
only the frame). Snapshots are written as

    <name>.safetensors   the SB3 policy's ``state_dict``
    <name>.json          ``PolicySpec``: everything needed to rebuild the policy module (no pickle)

and ``load_policy`` turns one back into a ``PolicyRunner``: a callable on a batch of ``uint8 [B, H, W, 3]``
observations that returns ``int64 [B]`` action ids.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.policies import ActorCriticCnnPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import nn
from tqdm import tqdm

from components.atomic import atomic_write_json, file_sha256, save_safetensors
from components.errors import PipelineError
from components.game.environment import DoomEnv, action_names
from components.params import Params
from components.training import CHECKPOINT_FILE, Runtime, load_checkpoint, resolve_device, run_folder, save_checkpoint

if TYPE_CHECKING:
    from stable_baselines3.common.policies import ActorCriticPolicy

log = logging.getLogger(__name__)

SPEC_FORMAT = "gamengen-sb3-actor-critic-cnn-v1"
CHECKPOINT_INDEX = "checkpoints.json"


# --------------------------------------------------------------------------- network


class DoomCNN(nn.Module):
    """Mnih et al. (2015) convolutions with padding (so 32x24 frames work too), then a linear layer.

    Subclasses SB3's ``BaseFeaturesExtractor`` interface: ``features_dim`` attribute, ``[B, 3, H, W]`` input
    already scaled to [0, 1] by the policy.
    """

    def __init__(
        self, observation_space: gym.spaces.Box, features_dim: int = 256, channels: tuple[int, ...] = (32, 64, 64)
    ) -> None:
        super().__init__()
        self._observation_space = observation_space
        self._features_dim = features_dim
        c0, (c1, c2, c3) = observation_space.shape[0], channels
        self.cnn = nn.Sequential(
            nn.Conv2d(c0, c1, kernel_size=8, stride=4, padding=2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c3, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(flat, features_dim), nn.ReLU())

    @property
    def features_dim(self) -> int:
        return self._features_dim

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(observations))


def _features_extractor_class() -> type:
    """``DoomCNN`` as a real SB3 ``BaseFeaturesExtractor`` subclass (SB3 checks the type)."""

    class DoomCNNExtractor(BaseFeaturesExtractor):
        def __init__(
            self, observation_space: gym.spaces.Box, features_dim: int = 256, channels: tuple[int, ...] = (32, 64, 64)
        ) -> None:
            super().__init__(observation_space, features_dim)
            net = DoomCNN(observation_space, features_dim, channels)
            self.cnn, self.linear = net.cnn, net.linear

        def forward(self, observations: torch.Tensor) -> torch.Tensor:
            return self.linear(self.cnn(observations))

    return DoomCNNExtractor


@dataclass
class PolicySpec:
    """What ``load_policy`` needs to rebuild a saved policy, written as JSON beside its safetensors."""

    observation_shape: list[int]  # [3, H, W], channels first as the policy sees it
    n_actions: int
    features_dim: int
    hidden_sizes: list[int]
    cnn_channels: list[int]
    action_names: list[str]
    timesteps: int
    name: str
    format: str = SPEC_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)


def policy_kwargs(features_dim: int, hidden_sizes: list[int], cnn_channels: list[int]) -> dict[str, Any]:
    return {
        "features_extractor_class": _features_extractor_class(),
        "features_extractor_kwargs": {"features_dim": features_dim, "channels": tuple(cnn_channels)},
        "net_arch": {"pi": list(hidden_sizes), "vf": list(hidden_sizes)},
        "normalize_images": True,
    }


def build_policy(spec: PolicySpec) -> ActorCriticPolicy:
    """An untrained SB3 ``ActorCriticCnnPolicy`` with the architecture of ``spec``."""

    observation_space = gym.spaces.Box(0, 255, tuple(spec.observation_shape), dtype=np.uint8)
    return ActorCriticCnnPolicy(
        observation_space,
        gym.spaces.Discrete(spec.n_actions),
        lr_schedule=lambda _: 0.0,
        **policy_kwargs(spec.features_dim, spec.hidden_sizes, spec.cnn_channels),
    )


# --------------------------------------------------------------------------- snapshots


def save_policy(stem: Path, policy: nn.Module, spec: PolicySpec) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; returns the JSON path."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(stem.parent / f"{stem.name}.safetensors", _unique_state(policy), {"format": SPEC_FORMAT})
    atomic_write_json(stem.parent / f"{stem.name}.json", asdict(spec))
    return stem.parent / f"{stem.name}.json"


# With a shared features extractor, SB3 registers the same module under these aliases too.
_ALIASES = ("pi_features_extractor.", "vf_features_extractor.")


def _unique_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's state_dict without the aliases of the shared extractor (safetensors refuses shared memory)."""
    return {k: v for k, v in policy.state_dict().items() if not k.startswith(_ALIASES)}


def _load_unique_state(policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = policy.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_ALIASES)]
    if missing or result.unexpected_keys:
        raise ValueError(f"missing keys {missing}, unexpected keys {result.unexpected_keys}")


class _Logits(nn.Module):
    """uint8 ``[B, H, W, 3]`` observations -> action logits: the actor half of an SB3 policy, as one module."""

    def __init__(self, policy: ActorCriticPolicy) -> None:
        super().__init__()
        self.features = policy.features_extractor
        self.actor = policy.mlp_extractor.policy_net
        self.head = policy.action_net

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        scaled = observations.permute(0, 3, 1, 2).float() / 255.0  # as SB3's preprocess_obs in training
        return self.head(self.actor(self.features(scaled)))


def _onnx_session(module: nn.Module, shape: tuple[int, int, int]) -> Any:
    """An in-memory ONNX Runtime session of ``module`` with a dynamic batch axis, one thread."""


    buffer = io.BytesIO()
    example = torch.zeros((2, *shape), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter writes to a file object too; its annotation names paths only
        torch.onnx.export(module, (example,), buffer,  # type: ignore[arg-type]
                          dynamo=False, input_names=["observations"], output_names=["logits"],
                          dynamic_axes={"observations": {0: "batch"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


class PolicyRunner:
    """A loaded policy: ``runner(obs_uint8_BHW3, rng=None, deterministic=False) -> int64 [B]`` action ids.

    Without ``deterministic`` it samples from the policy's action distribution (Gumbel-max with ``rng``,
    so runs are reproducible given the numpy generator). ``backend="onnxruntime"`` (the default of
    ``load_policy``) runs the actor through ONNX Runtime, about 4x less CPU than eager PyTorch at the small
    batches of data collection; ``"torch"`` runs the PyTorch module. Both give the same logits (to ~1e-6).
    """

    def __init__(self, policy: ActorCriticPolicy, spec: PolicySpec, path: Path, backend: str = "torch") -> None:
        self.policy, self.spec, self.path = policy.eval(), spec, path
        self.actor = _Logits(self.policy).eval()
        self.backend = backend
        self._session = _onnx_session(self.actor, self.expected_shape) if backend == "onnxruntime" else None

    @property
    def name(self) -> str:
        return self.spec.name

    def logits(self, observations: np.ndarray) -> np.ndarray:
        observations = np.ascontiguousarray(observations, dtype=np.uint8)
        if self._session is not None:
            return self._session.run(None, {"observations": observations})[0]
        if not observations.flags.writeable:  # e.g. a read-only memmap of a shard
            observations = np.array(observations)
        with torch.inference_mode():
            return self.actor(torch.from_numpy(observations)).numpy()

    def __call__(
        self, observations: np.ndarray, rng: np.random.Generator | None = None, deterministic: bool = False
    ) -> np.ndarray:
        if observations.ndim != 4 or tuple(observations.shape[1:]) != tuple(self.expected_shape):
            raise ValueError(f"{self.path}: expected observations [B, *{self.expected_shape}], "
                             f"got {observations.shape}")
        logits = self.logits(observations)
        if not deterministic:
            rng = rng or np.random.default_rng()
            logits = logits + rng.gumbel(size=logits.shape)
        return logits.argmax(axis=1).astype(np.int64)

    @property
    def expected_shape(self) -> tuple[int, int, int]:
        c, h, w = self.spec.observation_shape
        return (h, w, c)


def load_policy(path: str | Path, backend: str = "onnxruntime") -> PolicyRunner:
    """Rebuild a policy saved by ``save_policy`` from its ``.json`` (or ``.safetensors``) path.

    ``backend``: ``"onnxruntime"`` (fast batched inference for recording) or ``"torch"``.
    """

    spec_path = Path(path).with_suffix(".json")
    weights_path = spec_path.with_suffix(".safetensors")
    for file in (spec_path, weights_path):
        if not file.is_file():
            raise PipelineError(f"{file}: policy snapshot missing; run `dvc repro rl_agent` first")
    raw = json.loads(spec_path.read_text())
    if raw.get("format") != SPEC_FORMAT:
        raise PipelineError(f"{spec_path}: format {raw.get('format')!r} is not {SPEC_FORMAT!r}; retrain rl_agent")
    try:
        spec = PolicySpec(**raw)
    except TypeError as error:
        raise PipelineError(f"{spec_path}: not a policy spec of this version ({error}); retrain rl_agent") from None
    policy = build_policy(spec)
    try:
        _load_unique_state(policy, load_file(str(weights_path)))
    except Exception as error:
        raise PipelineError(f"{weights_path}: cannot load policy weights ({error}); retrain rl_agent") from None
    return PolicyRunner(policy, spec, spec_path, backend)


def list_checkpoints(agent_dir: str | Path) -> list[dict[str, Any]]:
    """The snapshots of an ``rl_agent`` output folder, from least to most trained (the last is final)."""
    index = Path(agent_dir) / CHECKPOINT_INDEX
    if not index.is_file():
        raise PipelineError(f"{index}: missing; run `dvc repro rl_agent` first")
    return json.loads(index.read_text())


# --------------------------------------------------------------------------- training


def resume_folder(params: Params, cache_dir: Path) -> Path:
    """The run's folder under ``cache_dir``, keyed like every trainer's (``training.run_folder``) by everything
    the run depends on (params sections and the agent's source), so a stale state is never resumed."""

    payload = {s: getattr(params, s).model_dump(mode="json") for s in ("environment", "reward", "rl_agent")}
    sources = [file_sha256(Path(__file__).with_name(n)) for n in ("agent.py", "environment.py", "reward.py")]
    folder = run_folder(cache_dir, Runtime(torch.device("cpu")), payload, sources)
    assert folder is not None
    return folder


def checkpoint_steps(total_timesteps: int, checkpoints: int) -> list[int]:
    """Timesteps at which snapshots are taken: evenly spaced, the last one at the end of training."""
    return sorted({max(1, round(total_timesteps * k / checkpoints)) for k in range(1, checkpoints + 1)})


@dataclass
class TrainingResult:
    timesteps: int
    episodes: int
    episode_rewards: list[float]
    episode_lengths: list[int]
    seconds: float
    checkpoints: list[dict[str, Any]]
    resumed_from_step: int


def train(
    params: Params,
    out_dir: Path,
    cache_dir: Path,
    on_episode: Callable[[int, float, int, int], None] | None = None,
    on_update: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainingResult:
    """Train PPO per ``params.rl_agent``; snapshots go to ``out_dir`` (index in ``checkpoints.json``).

    Resumable: at each snapshot the policy and optimizer state are saved under ``cache_dir/<key>/`` (``key``
    hashes params and code), and a new run with the same key continues from the last one.
    ``on_episode(index, reward, length, timesteps)`` is called for every finished episode and
    ``on_update(timesteps, statistics)`` after every policy update with SB3's ``train/*`` statistics.
    """


    config, ppo = params.rl_agent, params.rl_agent.ppo
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    if ppo.batch_size > ppo.n_steps * ppo.n_envs:
        raise PipelineError(
            f"rl_agent.ppo.batch_size: must be <= n_steps * n_envs = {ppo.n_steps * ppo.n_envs}, got {ppo.batch_size}"
        )
    names = action_names(params.environment.actions)
    env = DummyVecEnv([lambda: Monitor(DoomEnv(params.environment, params.reward)) for _ in range(ppo.n_envs)])
    model = PPO(
        "CnnPolicy",
        env,
        learning_rate=ppo.learning_rate,
        n_steps=ppo.n_steps,
        batch_size=ppo.batch_size,
        n_epochs=ppo.n_epochs,
        gamma=ppo.gamma,
        gae_lambda=ppo.gae_lambda,
        ent_coef=ppo.ent_coef,
        clip_range=ppo.clip_range,
        policy_kwargs=policy_kwargs(ppo.features_dim, list(ppo.hidden_sizes), list(ppo.cnn_channels)),
        seed=config.seed,
        device=str(resolve_device(params.device)),
        verbose=0,
    )
    resume_dir = resume_folder(params, cache_dir)
    state_file = resume_dir / CHECKPOINT_FILE
    checkpoints: list[dict[str, Any]] = []
    resumed_from = 0
    if state_file.is_file():
        state = load_checkpoint(state_file)
        _load_unique_state(model.policy, state.model)
        model.policy.optimizer.load_state_dict(state.optimizer)
        model.num_timesteps = resumed_from = int(state.counters["step"])
        checkpoints = json.loads((resume_dir / CHECKPOINT_INDEX).read_text())
        for entry in checkpoints:
            for suffix in (".json", ".safetensors"):
                target = out_dir / (entry["file"] + suffix)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(resume_dir / (entry["file"] + suffix), target)
        log.info("resuming rl_agent from %d timesteps (%s)", resumed_from, resume_dir)
    assert model.policy.observation_space.shape is not None  # a Box space: the recorded frames
    observation_shape = list(model.policy.observation_space.shape)
    rewards: list[float] = []
    lengths: list[int] = []
    started = time.monotonic()

    def snapshot(name: str, timesteps: int, file: str) -> None:
        spec = PolicySpec(observation_shape, len(names), ppo.features_dim, list(ppo.hidden_sizes),
                          list(ppo.cnn_channels), names, timesteps, name)
        save_policy(out_dir / file, model.policy, spec)
        checkpoints.append({"name": name, "timesteps": timesteps, "file": file})
        atomic_write_json(out_dir / CHECKPOINT_INDEX, checkpoints)

    def save_resume_state() -> None:
        resume_dir.mkdir(parents=True, exist_ok=True)
        for entry in checkpoints:
            for suffix in (".json", ".safetensors"):
                target = resume_dir / (entry["file"] + suffix)
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(out_dir / (entry["file"] + suffix), target)
        atomic_write_json(resume_dir / CHECKPOINT_INDEX, checkpoints)
        save_checkpoint(state_file, _unique_state(model.policy), model.policy.optimizer, None,
                        {"step": model.num_timesteps})

    targets = [s for s in checkpoint_steps(config.total_timesteps, config.checkpoints) if s > resumed_from]

    remaining = config.total_timesteps - resumed_from
    progress = tqdm(total=max(remaining, 0), desc="rl_agent", unit="step", dynamic_ncols=True)

    def report_update() -> None:  # SB3's statistics of the last policy update (train/approx_kl, value_loss, ...)
        statistics = {k: float(v) for k, v in model.logger.name_to_value.items() if k.startswith("train/")}
        if statistics and on_update is not None:
            on_update(int(model.num_timesteps), statistics)

    class Callback(BaseCallback):
        def _on_rollout_start(self) -> None:
            report_update()

        def _on_step(self) -> bool:
            progress.update(ppo.n_envs)
            for info in self.locals["infos"]:
                if "episode" in info:
                    rewards.append(float(info["episode"]["r"]))
                    lengths.append(int(info["episode"]["l"]))
                    if on_episode is not None:
                        on_episode(len(rewards) - 1, rewards[-1], lengths[-1], self.num_timesteps)
            # the final snapshot is taken after learn() returns
            while len(targets) > 1 and self.num_timesteps >= targets[0]:
                step = targets.pop(0)
                snapshot(f"step-{step:09d}", step, f"checkpoints/step-{step:09d}")
                save_resume_state()
            return True

    if remaining > 0:
        model.learn(total_timesteps=remaining, callback=Callback(), reset_num_timesteps=resumed_from == 0)
        report_update()
    progress.close()
    final = int(model.num_timesteps)  # PPO rounds up to whole rollouts
    snapshot("final", final, "policy")
    env.close()
    shutil.rmtree(resume_dir, ignore_errors=True)  # finished: nothing left to resume
    return TrainingResult(
        timesteps=int(model.num_timesteps),
        episodes=len(rewards),
        episode_rewards=rewards,
        episode_lengths=lengths,
        seconds=time.monotonic() - started,
        checkpoints=checkpoints,
        resumed_from_step=resumed_from,
    )

