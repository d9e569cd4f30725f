"""Behaviour cloning of the simulated arm's scripted expert into a tiny SmolVLA (no ROS).

The policy sees what a robot with a camera sees: the frame of the camera over the arm
(`sim/camera.py`, 96x96 rgb8), the arm's joints (`observation.state`) and the task text. The target
is only in the frame, so the policy has to find it there. It is trained to give the expert's next
chunk of commands (`arm.expert_action`, a PD law toward the target) from that observation, and
written as LeRobot writes a SmolVLA policy, so `PolicyRuntime.from_pretrained` serves it like any
LeRobot checkpoint (the `smolvla-tiny` preset, `config/presets/smolvla-tiny/`).

What is trained is LeRobot's SmolVLA finetuning (`train_expert_only`, `freeze_vision_encoder`)
less the state projection: the action expert, the action in/out projections and the time MLP. The
backbone (vision tower, connector, text layers) is drawn at random and frozen: a tiny SmolVLM that
was never pretrained, so the expert learns to read the frame from random features. The state
projection stays frozen too, so a frame's whole prefix (its keys and values, from
`SmolVLAModel.prefix`) is computed once per demonstration step and each training step runs only
the expert: about three times the steps in the same CPU minutes (the state still reaches the
expert through the random projection and layers, which keep it). The loss is LeRobot's flow
matching (`VLAFlowMatching.forward`): t ~ Beta(1.5, 1) * 0.999 + 0.001, x_t = t * noise + (1 - t)
* actions, u_t = noise - actions, loss = MSE(v(x_t, t), u_t) over the action's dims (here the
unpadded ones: max_action_dim = action_dim). The network is this package's (`flow_constants` and
`velocity` at the sampled t), mapped over the batch with `torch.func.vmap` since its shapes carry
no batch axis; the runtime samples the same modules. The optimiser is LeRobot's (AdamW, betas
0.9/0.95, gradient norm clipped at 10; warm-up, then cosine decay to 1/40 of the peak), at a
higher rate and far fewer steps than LeRobot's defaults, so that it fits a few minutes of one CPU
core.

The data: episodes from random arm poses toward random targets, the expert steering with
exploration noise; each step is labelled with the chunk of commands the expert would send from
there (rolled out on a copy of the arm). Normalisation (MEAN_STD, SmolVLA's default) uses the
statistics of those episodes. Many short episodes matter more than long ones: the policy has to
have seen the target in many places.

    flashrt-ros train-vla            # or python -m flashrt_ros.sim.imitation_vla
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from flashrt_ros.core.models.smolvla.checkpoint_smolvla import is_smolvla_dir
from flashrt_ros.core.models.smolvla.configuration_smolvla import LlamaConfig, VisionConfig
from flashrt_ros.core.models.smolvla.processor_smolvla import resize_with_pad, to_unit_image
from flashrt_ros.core.models.smolvla.synthetic_smolvla import Shapes
from flashrt_ros.sim.arm import SimArm, expert_action
from flashrt_ros.sim.camera import ArmCamera
from flashrt_ros.sim.imitation import Evaluation

TASK = "reach the red target"
CAMERA = "top"                                 # observation.images.top
IMAGE_KEY, STATE_KEY, ACTION_KEY = f"observation.images.{CAMERA}", "observation.state", "action"
JOINTS = 2
DT = 1.0 / 30.0
FRAME = (96, 96)                               # what the camera publishes (height, width)
PRESET = "smolvla-tiny"

SHAPES = Shapes(
    name=PRESET, backbone="smolvlm-tiny", backbone_path="backbone",
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, patch_size=4, image_size=48, layer_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh"),
    text=LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, hidden_act="silu",
                     vocab_size=300),
    text_layers=4, scale_factor=2, cameras=((CAMERA, (3, *FRAME)),),
    state_dim=JOINTS, action_dim=JOINTS, max_state_dim=JOINTS, max_action_dim=JOINTS,
    chunk_size=10, n_action_steps=5, num_steps=5, num_vlm_layers=4, tokenizer_max_length=16,
    resize=(48, 48))
TRAINED = ("expert.", "action_in_proj.", "action_out_proj.", "action_time_mlp_in.",
           "action_time_mlp_out.")


def batch_of(arm: SimArm, camera: ArmCamera) -> dict:
    """The policy's observation of `arm`: a LeRobot batch (the dataset's keys)."""
    return {STATE_KEY: arm.q.astype(np.float32),
            IMAGE_KEY: camera.render_arm(arm), "task": TASK}


def expert_chunk(arm: SimArm, steps: int) -> np.ndarray:
    """The commands [steps, joints] the expert sends over the next `steps` steps from `arm`'s
    state (rolled out on a copy; `arm` is left as it is)."""
    sim = arm.copy()
    out = np.empty((steps, arm.action_dim), dtype=np.float32)
    for i in range(steps):
        out[i] = expert_action(sim)
        sim.apply(out[i])
    return out


def time_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float):
    """LeRobot's create_sinusoidal_pos_embedding for a time tensor of any shape -> [..., dim]
    float64 (modeling_smolvla.sinusoidal_time_embedding is the same for one float)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    x = (1.0 / period * 2 * math.pi) * t[..., None]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


def sample_time(n: int) -> torch.Tensor:
    """LeRobot's flow-matching time [n]: Beta(1.5, 1) * 0.999 + 0.001 (torch's global generator,
    as LeRobot's `sample_time`)."""
    beta = torch.distributions.Beta(concentration1=1.5, concentration0=1.0)
    return beta.sample((n,)) * 0.999 + 0.001


@dataclass
class Demonstrations:
    """The expert's steps, as the policy sees them and as it should act."""
    pixels: torch.Tensor       # [N, 3, S, S] in [-1, 1]: the frame prepared as the runtime does
    state: torch.Tensor        # [N, state_dim], the dataset's units
    actions: torch.Tensor      # [N, chunk_size, action_dim]: the expert's next commands

    def __len__(self) -> int:
        return len(self.state)


def prepare_frame(frame: np.ndarray, size: tuple) -> torch.Tensor:
    """A uint8 [H, W, 3] frame -> [3, S, S] in [-1, 1], as `SmolVLAPolicy.load_batch` prepares
    it (LeRobot's resize with padding)."""
    w, h = size
    return resize_with_pad(to_unit_image(frame, IMAGE_KEY), w, h) * 2.0 - 1.0


def collect(episodes: int, steps: int, seed: int, camera: ArmCamera, shapes: Shapes = SHAPES,
            explore: float = 0.3) -> Demonstrations:
    """`episodes` episodes of `steps` steps from random poses (joints uniform in +-1.5 rad, at
    rest) toward SimArm's random targets, the expert steering with Gaussian exploration noise of
    std `explore` on its commands. Every step is labelled with the expert's next chunk from
    there."""
    rng = np.random.default_rng(seed)
    pixels, states, actions = [], [], []
    for e in range(episodes):
        arm = SimArm(3 * shapes.action_dim, shapes.action_dim, DT, seed=seed + e)
        arm.q = rng.uniform(-1.5, 1.5, shapes.action_dim)
        for _ in range(steps):
            batch = batch_of(arm, camera)
            pixels.append(prepare_frame(batch[IMAGE_KEY], shapes.resize))
            states.append(batch[STATE_KEY])
            chunk = expert_chunk(arm, shapes.chunk_size)
            actions.append(chunk)
            arm.apply(chunk[0] + explore * rng.standard_normal(shapes.action_dim))
    return Demonstrations(torch.stack(pixels), torch.from_numpy(np.array(states)),
                          torch.from_numpy(np.array(actions)))


def statistics(demos: Demonstrations) -> dict:
    """LeRobot's statistics of the state and the action, as its normaliser files key them."""
    out = {}
    actions = demos.actions.reshape(-1, demos.actions.shape[-1])
    for key, x in ((STATE_KEY, demos.state), (ACTION_KEY, actions)):
        x = x.double()
        q = torch.quantile(x, torch.tensor([0.01, 0.99], dtype=torch.float64), dim=0)
        out.update({f"{key}.mean": x.mean(0), f"{key}.std": x.std(0, unbiased=False),
                    f"{key}.min": x.min(0).values, f"{key}.max": x.max(0).values,
                    f"{key}.q01": q[0], f"{key}.q99": q[1]})
    return {k: v.float() for k, v in out.items()}


class FlowMatching:
    """LeRobot's flow-matching loss of a `SmolVLAModel` whose VLM and state projection are frozen.

    With those frozen, a frame's prefix (its keys and values, written by `SmolVLAModel.prefix`)
    is the same at every step, so `frozen_prefix` computes it once per demonstration step; each
    training step then runs only the expert (`flow_constants`, `velocity` at the sampled t). The
    model's functions take one sample (no batch axis); `torch.func.vmap` maps them over the
    batch."""

    def __init__(self, model, task_ids: torch.Tensor, task_mask: torch.Tensor, device="cpu"):
        cfg = model.cfg
        self.model, self.cfg, self.device = model, cfg, torch.device(device)
        self.consts = model.constants(self.device)
        self.ids, self.mask = task_ids.to(self.device), task_mask.to(self.device)
        self.kv_shape = (cfg.prefix_len, cfg.num_vlm_layers, 2, cfg.text.num_key_value_heads,
                         cfg.text.head_dim)
        self._loss = torch.func.vmap(self._one)

    def frozen_prefix(self, pixels: torch.Tensor, state: torch.Tensor, chunk: int = 256):
        """pixels [N, 3, S, S] in [-1, 1], state [N, max_state_dim] (normalised, padded) ->
        (kv [N, P, layers, 2, kv_heads, head_dim], mask [P] bool)."""
        m = self.model

        def one(px, st, kv):
            return m.prefix(px[None], self.ids, self.mask, st, kv, self.consts)
        kvs = []
        with torch.no_grad(), warnings.catch_warnings():
            # vmap runs the vision tower's attention one frame at a time (no batching rule on
            # the CPU) and says so; the result is the same
            warnings.filterwarnings("ignore", message="There is a performance drop")
            for i in range(0, len(pixels), chunk):
                px = pixels[i:i + chunk].to(self.device)
                kv = torch.zeros(len(px), *self.kv_shape, device=self.device)
                masks = torch.func.vmap(one)(px, state[i:i + chunk].to(self.device), kv)
                kvs.append(kv)
        return torch.cat(kvs), masks[0]

    def _one(self, kv, mask, actions, noise, t):
        """One sample: its prefix `kv` and `mask`, actions [chunk, max_action_dim] normalised,
        noise like actions, t [] -> the mean squared error []."""
        m, c = self.model, self.cfg
        x_t = t * noise + (1 - t) * actions
        emb = time_embedding(t, c.expert.hidden_size, c.min_period, c.max_period)
        consts = dict(self.consts, time_emb=emb.to(self.consts["time_emb"].dtype)[None])
        v_t = m.velocity(x_t, 0, kv, m.flow_constants(kv, mask, consts), consts)
        return ((v_t - (noise - actions)) ** 2).mean()

    def __call__(self, kv, mask, actions, noise=None, t=None) -> torch.Tensor:
        """The batch's mean loss (kv [B, ...] and mask [P] from `frozen_prefix`); `noise` and `t`
        are drawn as LeRobot draws them when not given."""
        n = len(actions)
        noise = torch.randn(actions.shape).to(self.device) if noise is None else noise
        t = sample_time(n).to(self.device) if t is None else t
        return self._loss(kv, mask[None].expand(n, -1), actions, noise, t).mean()


def learning_rate(step: int, steps: int, peak: float) -> float:
    """LeRobot's cosine decay with warm-up, over `steps`: linear from 0 to `peak` over the first
    5%, then a cosine down to peak / 40 (2.5e-6 from 1e-4, as LeRobot's SmolVLA defaults)."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    low = peak / 40
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))


def fit(model, demos: Demonstrations, normalizer, task: tuple, steps: int, batch: int,
        lr: float, say=print, device="cpu") -> list:
    """Train `model`'s expert, action projections and time MLP in place (the rest frozen) on
    `device` (the model comes back to the CPU); returns the loss of every step. The frames are
    dropped from `demos` once their prefixes are computed (the largest part of the memory)."""
    cfg = model.cfg
    t0 = time.perf_counter()
    model.to(device)
    loss_fn = FlowMatching(model, *task, device=device)
    state = _padded(normalizer.normalize(STATE_KEY, demos.state), cfg.max_state_dim)
    kv, mask = loss_fn.frozen_prefix(demos.pixels, state)
    demos.pixels = demos.pixels[:0]
    say(f"prefix of {len(demos)} frames in {time.perf_counter() - t0:.0f} s")
    actions = _padded(normalizer.normalize(ACTION_KEY, demos.actions), cfg.max_action_dim)
    actions = actions.to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINED))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-10)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, steps, lr)
        idx = torch.randint(len(demos), (batch,)).to(device)
        loss = loss_fn(kv[idx], mask, actions[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            say(f"step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.to("cpu")
    return losses


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-padded on the last axis to `width` (LeRobot's pad_vector)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def evaluate(rt, camera: ArmCamera, episodes: int = 3, steps: int = 240, seed: int = 1000,
             who=("policy", "idle", "expert")) -> Evaluation:
    """Mean arm error over the second half of `episodes` episodes (the arm at rest at zero, as
    the demo starts it) for the policy (`rt.select_action` on the camera frame and the joints),
    for zero commands and for the expert; the same seeds for all three, NaN for those not in
    `who`."""
    out = {w: float("nan") for w in ("policy", "idle", "expert")}
    action_dim = rt.model_cfg.action_dim
    for w in who:
        errors = []
        for e in range(episodes):
            arm = SimArm(3 * action_dim, action_dim, DT, seed=seed + e)
            if w == "policy":
                rt.reset()
            for t in range(steps):
                if w == "policy":
                    arm.apply(rt.select_action(batch_of(arm, camera)))
                elif w == "expert":
                    arm.apply(expert_action(arm))
                else:
                    arm.apply(np.zeros(action_dim))
                if t >= steps // 2:
                    errors.append(arm.error())
        out[w] = float(np.mean(errors))
    return Evaluation(**out)


@dataclass(frozen=True)
class TrainConfig:
    episodes: int = 500            # demonstration episodes (random start, random target)
    steps: int = 60                # steps per episode
    train_steps: int = 3000        # optimiser steps
    batch: int = 64
    lr: float = 3e-3               # peak learning rate
    explore: float = 0.3           # std of the noise on the expert's commands while collecting
    eval_episodes: int = 3         # held-out episodes of the evaluation
    seed: int = 0


def train(out_dir: str, cfg: TrainConfig = TrainConfig(), shapes: Shapes = SHAPES, say=print,
          device="cpu") -> tuple[str, Evaluation]:
    """Collect the expert's demonstrations, train a tiny SmolVLA on them and write it as
    `out_dir/<shapes.name>/` (LeRobot's layout, the backbone inside: `backbone/`); the written
    directory is loaded back with `PolicyRuntime.from_pretrained` and evaluated. Returns (the
    policy directory, the evaluation)."""
    from flashrt_ros.core.config import RuntimeConfig
    from flashrt_ros.core.models.smolvla.checkpoint_smolvla import load_weights, read_smolvla_dir
    from flashrt_ros.core.models.smolvla.modeling_smolvla import SmolVLAModel
    from flashrt_ros.core.models.smolvla.processor_smolvla import Normalizer
    from flashrt_ros.core.models.smolvla.synthetic_smolvla import save_lerobot, write_checkpoint
    from flashrt_ros.core.runtime import PolicyRuntime
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    camera = ArmCamera(width=FRAME[1], height=FRAME[0])
    demos = collect(cfg.episodes, cfg.steps, cfg.seed, camera, shapes, cfg.explore)
    stats = statistics(demos)
    say(f"{len(demos)} demonstration steps ({cfg.episodes} episodes x {cfg.steps}) in "
        f"{time.perf_counter() - t0:.0f} s")
    with tempfile.TemporaryDirectory() as tmp:
        # the backbone and the untrained expert, drawn from the seed as a synthetic checkpoint
        src = read_smolvla_dir(write_checkpoint(tmp, shapes, cfg.seed))
        model = SmolVLAModel(src.cfg)
        load_weights(model, src.weights)
    normalizer = Normalizer({STATE_KEY: shapes.normalization["STATE"],
                             ACTION_KEY: shapes.normalization["ACTION"]},
                            {key: {k.rsplit(".", 1)[1]: v for k, v in stats.items()
                                   if k.startswith(key + ".")} for key in (STATE_KEY, ACTION_KEY)},
                            eps=1e-8)
    task = tuple(torch.from_numpy(x) for x in src.tokenizer(TASK))
    fit(model, demos, normalizer, task, cfg.train_steps, cfg.batch, cfg.lr, say=say, device=device)
    say(f"trained in {time.perf_counter() - t0:.0f} s")
    policy_dir = save_lerobot(model, shapes, out_dir, stats, seed=cfg.seed)
    rt = PolicyRuntime.from_pretrained(policy_dir, RuntimeConfig(device="cpu", rollback_depth=0))
    return policy_dir, evaluate(rt, camera, episodes=cfg.eval_episodes)


def preset_dir() -> str:
    """Where the `smolvla-tiny` preset lives: the first preset directory that holds it, else the
    first preset directory (the source checkout's config/presets, as `flashrt-ros train-heads`
    writes beside a preset's YAML)."""
    from flashrt_ros.core.config import preset_dirs
    dirs = preset_dirs()
    for d in dirs:
        if os.path.isdir(os.path.join(d, PRESET)):
            return os.path.join(d, PRESET)
    return os.path.join(dirs[0], PRESET)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flashrt-ros train-vla",
                                description="Train the smolvla-tiny preset by behaviour cloning "
                                            "of the simulated arm's expert (CPU, one thread).")
    p.add_argument("--out", default="", help=f"output directory (default: the {PRESET} preset's, "
                                             f"{preset_dir()})")
    d = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(d, f.name)),
                       default=getattr(d, f.name))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    out = os.path.abspath(args.out or preset_dir())
    if os.path.lexists(out) and not is_smolvla_dir(out):
        print(f"[flashrt] --out {out}: expected a new directory or a SmolVLA checkpoint to replace, "
              f"found something else; name another directory", file=sys.stderr)
        return 2
    say = (lambda m: print(f"[flashrt] {m}", flush=True))
    say(f"behaviour cloning of the simulated arm's expert into {PRESET}: {cfg}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir, ev = train(tmp, cfg, say=say)
        say(f"mean arm error over evaluation episodes: policy {ev.policy:.3f}, no command "
            f"{ev.idle:.3f}, expert {ev.expert:.3f} ({time.perf_counter() - t0:.0f} s in all)")
        if not ev.policy < 0.5 * ev.idle:
            print("[flashrt] the trained policy does not halve the error of sending no command; "
                  "not written", file=sys.stderr)
            return 1
        if os.path.lexists(out):
            shutil.rmtree(out)
        shutil.copytree(policy_dir, out)
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
