#!/usr/bin/env python3
"""Writes the SmolVLA reference fixtures under test/data/smolvla with LeRobot itself.

Runs in the LeRobot venv (`bash tools/bootstrap-lerobot.sh`, then
`.venv-lerobot/bin/python tools/make_smolvla_reference.py --out test/data/smolvla`), never in the
project's venv: lerobot 0.4.4 pins torch<2.11 and transformers<5. docs/smolvla_reference.md says
what the fixtures are and what LeRobot computes at each step.

For each case of CASES it writes a LeRobot SmolVLA checkpoint directory exactly as LeRobot writes
one (`SmolVLAPolicy.save_pretrained` + the pre/post processors' `save_pretrained`), whose
`vlm_model_name` names a stand-in backbone folder (a tiny SmolVLMConfig, a SmolVLMProcessor and a
byte-level BPE tokenizer built with the `tokenizers` library) by a path relative to the checkpoint
directory, and `reference.safetensors`: inputs as a dataset gives them, the noise, and what
LeRobot's processors and policy return for them (chunks, intermediates, and an episode of
`select_action` calls with a reset).

Everything runs on the CPU in float32 on one torch thread, with weights drawn after
`torch.manual_seed(case seed)` and inputs from `numpy.random.default_rng(case seed)`, so two runs
write the same tensors. Each case is then loaded back from disk with LeRobot's own
`from_pretrained` (from the checkpoint directory, so the relative backbone path is resolved as the
fixture's users resolve it) and must reproduce its references exactly.
"""

import argparse
import contextlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers imports: the backbone is local
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import lerobot
import transformers
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
from lerobot.processor import PolicyProcessorPipeline
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)

PREFIX = "[smolvla-ref]"

# Task strings the tokenizers are trained on; every case's tasks come from here, so the
# tokenizers cover them (byte-level BPE covers any text; these make the merges meaningful).
TASKS = [
    "pick up the red cube",
    "put the red cube in the bowl",
    "open the drawer",
    "close the drawer and push it gently",
    "stack the blue block on the green block then return to the home pose",
    "fold the towel",
]

# Tolerances a float32 reimplementation is held to, as |got - ref| <= ATOL + RTOL * |ref| on the
# actions (normalised and in the dataset's units). LeRobot's own outputs repeat bit for bit across
# runs; LeRobot with its reductions reordered (2 threads instead of 1, or torch's SDPA in place of
# its eager attention) moves them by at most 4.8e-7 on these cases (|actions| <= 7): the bound
# leaves 20x that for a reimplementation's own order of operations.
ATOL = 1e-5
RTOL = 1e-5

SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "bos": "<|im_start|>",
    "eos": "<end_of_utterance>",
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
}


@dataclass(frozen=True)
class Backbone:
    """A stand-in SmolVLM backbone: dimensions of its vision tower and text model."""

    name: str
    image_size: int  # vision tower's image_size (position-embedding grid = image_size / patch_size)
    patch_size: int
    scale_factor: int  # pixel-shuffle factor of the connector
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int  # the text model has these; a case keeps its first num_vlm_layers
    text_heads: int
    text_kv_heads: int
    head_dim: int
    vocab_size: int
    bos: bool  # whether the tokenizer's post-processor prepends <|im_start|>


@dataclass(frozen=True)
class Case:
    """One fixture: a backbone, a policy config, cameras at their native sizes, and inputs."""

    name: str
    seed: int
    backbone: str
    cameras: dict  # camera name -> (H, W) as the dataset gives it
    state_dim: int
    action_dim: int
    policy: dict  # SmolVLAConfig fields
    norm: dict = field(default_factory=dict)  # normalization_mapping overrides (feature type -> mode)
    chunk_calls: int = 3
    episode_chunks: float = 2.5  # the episode has this many times n_action_steps steps, then a reset


BACKBONES = {
    b.name: b
    for b in [
        # 4x4 patches, 2x2 shuffle: 4 tokens per camera; GQA 4 heads over 2 kv heads; no BOS.
        Backbone("tiny-a", image_size=32, patch_size=8, scale_factor=2, vision_hidden=16,
                 vision_layers=2, vision_heads=2, text_hidden=32, text_layers=6, text_heads=4,
                 text_kv_heads=2, head_dim=8, vocab_size=300, bos=False),
        # 6x6 patches, 3x3 shuffle: 4 tokens per camera; 3 heads over 1 kv head with head_dim 24
        # (3 x 16 = 48 != hidden 24); a BOS template in the tokenizer's post-processor.
        Backbone("tiny-b", image_size=48, patch_size=8, scale_factor=3, vision_hidden=12,
                 vision_layers=1, vision_heads=3, text_hidden=24, text_layers=8, text_heads=3,
                 text_kv_heads=1, head_dim=16, vocab_size=300, bos=True),
    ]
}

CASES = [
    # The defaults' structure at tiny size: one non-square camera (resize-with-pad pads on top),
    # all layers with an expert layer, self-attention every 2nd, MEAN_STD, language unpadded.
    Case("one_cam", seed=1, backbone="tiny-a", cameras={"top": (40, 56)}, state_dim=6, action_dim=6,
         policy=dict(num_vlm_layers=4, num_expert_layers=-1, self_attn_every_n_layers=2,
                     expert_width_multiplier=0.75, chunk_size=10, n_action_steps=5, num_steps=10,
                     max_state_dim=8, max_action_dim=8, tokenizer_max_length=48,
                     resize_imgs_with_padding=(32, 32))),
    # Two cameras (one tall: padded on the left; one small: enlarged), image special tokens,
    # language padded to max_length, MIN_MAX state and action, every layer self-attention,
    # n_action_steps == chunk_size.
    Case("two_cams_min_max", seed=2, backbone="tiny-a", cameras={"front": (48, 32), "wrist": (24, 24)},
         state_dim=5, action_dim=4, norm={"STATE": "MIN_MAX", "ACTION": "MIN_MAX"},
         policy=dict(num_vlm_layers=2, num_expert_layers=-1, self_attn_every_n_layers=1,
                     expert_width_multiplier=0.5, chunk_size=6, n_action_steps=6, num_steps=4,
                     max_state_dim=8, max_action_dim=6, tokenizer_max_length=16,
                     pad_language_to="max_length", add_image_special_tokens=True,
                     resize_imgs_with_padding=(32, 32))),
    # Three cameras, half as many expert layers as VLM layers (VLM layers 1, 3 have none),
    # self-attention only at layer 0, a wider-than-VLM expert, state/action well below the padding,
    # a BOS-adding tokenizer.
    Case("three_cams_half_expert", seed=3, backbone="tiny-b",
         cameras={"left": (48, 48), "right": (36, 60), "wrist": (30, 30)}, state_dim=7, action_dim=3,
         policy=dict(num_vlm_layers=4, num_expert_layers=2, self_attn_every_n_layers=4,
                     expert_width_multiplier=1.5, chunk_size=8, n_action_steps=3, num_steps=3,
                     max_state_dim=12, max_action_dim=10, tokenizer_max_length=32,
                     resize_imgs_with_padding=(48, 48))),
    # Cross-attention in every layer (self_attn_every_n_layers <= 0), 3 expert layers for 6 of the
    # text model's 8 layers, QUANTILES actions, MIN_MAX state, every task longer than
    # tokenizer_max_length (truncated, the newline with it), state as wide as max_state_dim.
    Case("all_cross_truncated", seed=4, backbone="tiny-b", cameras={"top": (64, 48)}, state_dim=4,
         action_dim=4, norm={"STATE": "MIN_MAX", "ACTION": "QUANTILES"},
         policy=dict(num_vlm_layers=6, num_expert_layers=3, self_attn_every_n_layers=-1,
                     expert_width_multiplier=0.75, chunk_size=5, n_action_steps=2, num_steps=5,
                     max_state_dim=4, max_action_dim=6, tokenizer_max_length=6,
                     resize_imgs_with_padding=(48, 48))),
    # Images resized to 48x48 for a 32x32 tower: 6x6 patches on a 4x4 position table (transformers'
    # bucketized position ids), 9 tokens per camera; state/action dims equal to the padded ones.
    Case("resize_above_tower", seed=5, backbone="tiny-a", cameras={"top": (30, 40), "side": (40, 40)},
         state_dim=8, action_dim=8,
         policy=dict(num_vlm_layers=6, num_expert_layers=-1, self_attn_every_n_layers=3,
                     expert_width_multiplier=0.5, chunk_size=4, n_action_steps=4, num_steps=2,
                     max_state_dim=8, max_action_dim=8, tokenizer_max_length=48,
                     resize_imgs_with_padding=(48, 48))),
]


def say(msg):
    print(f"{PREFIX} {msg}", flush=True)


def check_layer_rules(case: Case, backbone: Backbone):
    """Refuses combinations of layer counts that LeRobot 0.4.4 cannot run or runs inconsistently.

    LeRobot decides self- vs cross-attention per VLM layer i (i % n == 0) but replaces the k/v
    projections per expert layer j (j % n != 0); VLM layer i has expert layer i // m when
    i % m == 0 (m = num_vlm_layers // num_expert_layers). The fixtures keep the two rules equal.
    """
    p = case.policy
    n_vlm = min(p["num_vlm_layers"], backbone.text_layers)
    n_exp = p["num_expert_layers"] if p["num_expert_layers"] > 0 else n_vlm
    n = p["self_attn_every_n_layers"]
    if n_vlm % n_exp:
        raise SystemExit(f"case {case.name}: {n_vlm} VLM layers is not a multiple of {n_exp} expert layers")
    m = n_vlm // n_exp

    def self_attn(i):
        return n > 0 and i % n == 0

    for i in range(n_vlm):
        if self_attn(i) and i % m:
            raise SystemExit(f"case {case.name}: VLM layer {i} is a self-attention layer without an "
                             f"expert layer (LeRobot fails: torch.cat of an empty list); change "
                             f"self_attn_every_n_layers or num_expert_layers")
        if i % m == 0 and self_attn(i) != self_attn(i // m):
            raise SystemExit(f"case {case.name}: VLM layer {i} runs as "
                             f"{'self' if self_attn(i) else 'cross'}-attention but its expert layer "
                             f"{i // m} was built for the other kind; change self_attn_every_n_layers")


def build_tokenizer(backbone: Backbone) -> PreTrainedTokenizerFast:
    """A byte-level BPE (as SmolVLM's) trained on TASKS, with the special tokens SmolVLA reads."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    trainer = trainers.BpeTrainer(
        vocab_size=backbone.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t + "\n" for t in TASKS] * 4, trainer)
    if backbone.bos:
        bos = SPECIAL_TOKENS["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        extra_special_tokens={
            "fake_image_token": SPECIAL_TOKENS["fake_image_token"],
            "image_token": SPECIAL_TOKENS["image_token"],
            "global_image_token": SPECIAL_TOKENS["global_image_token"],
            "end_of_utterance_token": SPECIAL_TOKENS["eos"],
        },
        model_input_names=["input_ids", "attention_mask"],
    )


def write_backbone(backbone: Backbone, folder: Path):
    """Saves the backbone's SmolVLMConfig, SmolVLMProcessor and tokenizer into `folder`."""
    tokenizer = build_tokenizer(backbone)
    vocab = len(tokenizer)
    config = SmolVLMConfig(
        vision_config=dict(
            model_type="smolvlm_vision",
            hidden_size=backbone.vision_hidden,
            intermediate_size=2 * backbone.vision_hidden,
            num_hidden_layers=backbone.vision_layers,
            num_attention_heads=backbone.vision_heads,
            image_size=backbone.image_size,
            patch_size=backbone.patch_size,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=backbone.text_hidden,
            intermediate_size=2 * backbone.text_hidden,
            num_hidden_layers=backbone.text_layers,
            num_attention_heads=backbone.text_heads,
            num_key_value_heads=backbone.text_kv_heads,
            head_dim=backbone.head_dim,
            vocab_size=vocab,
            pad_token_id=tokenizer.pad_token_id,
            rms_norm_eps=1e-5,
            max_position_embeddings=256,
        ),
        scale_factor=backbone.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image_token"]),
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
    )
    grid = backbone.image_size // backbone.patch_size
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(
            size={"longest_edge": backbone.image_size},
            max_image_size={"longest_edge": backbone.image_size},
            do_image_splitting=False,
        ),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=grid * grid // backbone.scale_factor**2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)


def dataset_stats(case: Case, rng: np.random.Generator) -> dict:
    """Random but fixed statistics for state and action (mean/std, min/max, quantiles)."""
    stats = {}
    for key, dim in (("observation.state", case.state_dim), ("action", case.action_dim)):
        mean = rng.normal(0.0, 1.0, dim)
        std = rng.uniform(0.2, 2.0, dim)
        lo = mean - rng.uniform(1.0, 3.0, dim)
        hi = mean + rng.uniform(1.0, 3.0, dim)
        q01 = lo + 0.1 * (hi - lo)
        q99 = hi - 0.1 * (hi - lo)
        stats[key] = {
            k: torch.tensor(v, dtype=torch.float32)
            for k, v in dict(mean=mean, std=std, min=lo, max=hi, q01=q01, q99=q99).items()
        }
    return stats


def make_config(case: Case, backbone_dir: Path) -> SmolVLAConfig:
    norm = {"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD}
    norm.update({k: NormalizationMode[v] for k, v in case.norm.items()})
    inputs = {f"observation.images.{cam}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, h, w))
              for cam, (h, w) in case.cameras.items()}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(case.state_dim,))
    return SmolVLAConfig(
        device="cpu",
        push_to_hub=False,
        vlm_model_name=str(backbone_dir),
        load_vlm_weights=False,
        input_features=inputs,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(case.action_dim,))},
        normalization_mapping=norm,
        **case.policy,
    )


def random_observation(case: Case, rng: np.random.Generator, task: str) -> tuple[dict, dict]:
    """One observation as a LeRobot dataset gives it: float32 state, float32 [3, H, W] images in
    [0, 1], a task string; and the uint8 [H, W, 3] camera frames the images are made from
    (`frame.permute(2, 0, 1).float() / 255`, so `round(img * 255)` gives the frame back)."""
    obs = {"observation.state": torch.tensor(rng.normal(0.0, 1.5, case.state_dim), dtype=torch.float32)}
    frames = {}
    for cam, (h, w) in case.cameras.items():
        frames[cam] = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        obs[f"observation.images.{cam}"] = frames[cam].permute(2, 0, 1).float() / 255
    obs["task"] = task
    return obs, frames


def random_noise(case: Case, rng: np.random.Generator) -> torch.Tensor:
    shape = (1, case.policy["chunk_size"], case.policy["max_action_dim"])
    return torch.tensor(rng.standard_normal(shape), dtype=torch.float32)


class Recorder:
    """Records LeRobot's intermediates of one predict_action_chunk call by wrapping its methods
    on the instance (what they compute is unchanged)."""

    def __init__(self, policy: SmolVLAPolicy):
        self.policy = policy
        self.values = {}

    @contextlib.contextmanager
    def recording(self):
        model = self.policy.model
        steps = []

        def embed_prefix(*args, **kwargs):
            embs, pad, att = type(model).embed_prefix(model, *args, **kwargs)
            self.values["prefix_embs"] = embs[0].clone()
            self.values["prefix_pad_mask"] = pad[0].to(torch.uint8)
            self.values["prefix_att_mask"] = att[0].to(torch.uint8)
            return embs, pad, att

        def denoise_step(*args, **kwargs):
            steps.append(kwargs["x_t"][0].clone())
            return type(model).denoise_step(model, *args, **kwargs)

        def sample_actions(*args, **kwargs):
            out = type(model).sample_actions(model, *args, **kwargs)
            self.values["x_t"] = torch.stack(steps + [out[0].clone()])
            return out

        model.embed_prefix, model.denoise_step, model.sample_actions = embed_prefix, denoise_step, sample_actions
        try:
            yield self.values
        finally:
            del model.embed_prefix, model.denoise_step, model.sample_actions


def run_case(policy, pre, post, case: Case, rng: np.random.Generator, record: bool):
    """Drives LeRobot through the case's chunk calls and episode; returns tensors and tasks."""
    tensors, tasks = {}, {}
    chunk = {k: [] for k in ("state", "images", "noise", "action", "action_normalized",
                             "state_normalized", "images_model_input", "x_t")}
    for k in range(case.chunk_calls):
        task = TASKS[(case.seed + k) % len(TASKS)]
        obs, _ = random_observation(case, rng, task)
        noise = random_noise(case, rng)
        batch = pre(dict(obs))
        recorder = Recorder(policy)
        with recorder.recording() as seen:
            normalized = policy.predict_action_chunk(dict(batch), noise=noise)
        action = post(normalized)
        tasks[f"chunk.{k}"] = task
        chunk["state"].append(obs["observation.state"])
        chunk["images"].append({cam: obs[f"observation.images.{cam}"] for cam in case.cameras})
        chunk["noise"].append(noise[0])
        chunk["action"].append(action[0])
        chunk["action_normalized"].append(normalized[0])
        chunk["state_normalized"].append(batch["observation.state"][0])
        model_images, _ = policy.prepare_images(batch)
        chunk["images_model_input"].append({cam: img[0] for cam, img in zip(case.cameras, model_images)})
        chunk["x_t"].append(seen["x_t"])
        tensors[f"chunk.{k}.language.tokens"] = batch["observation.language.tokens"][0]
        tensors[f"chunk.{k}.language.attention_mask"] = batch["observation.language.attention_mask"][0].to(torch.uint8)
        if record:
            for name in ("prefix_embs", "prefix_pad_mask", "prefix_att_mask"):
                tensors[f"chunk.{k}.{name}"] = seen[name]
    tensors["chunk.observation.state"] = torch.stack(chunk["state"])
    for cam in case.cameras:
        tensors[f"chunk.observation.images.{cam}"] = torch.stack([i[cam] for i in chunk["images"]])
        tensors[f"chunk.images_model_input.{cam}"] = torch.stack([i[cam] for i in chunk["images_model_input"]])
    for name in ("noise", "action", "action_normalized", "state_normalized", "x_t"):
        tensors[f"chunk.{name}"] = torch.stack(chunk[name])

    n_steps = int(case.episode_chunks * case.policy["n_action_steps"])
    task = TASKS[(case.seed + case.chunk_calls) % len(TASKS)]
    tasks["episode"] = task
    policy.reset()
    episode = {k: [] for k in ("state", "images", "noise", "action")}
    for t in range(n_steps + 1):
        if t == n_steps:
            policy.reset()
        obs, frames = random_observation(case, rng, task)
        noise = random_noise(case, rng)
        action = post(policy.select_action(pre(dict(obs)), noise=noise))
        episode["state"].append(obs["observation.state"])
        episode["images"].append(frames)
        episode["noise"].append(noise[0])
        episode["action"].append(action[0])
    tensors["episode.observation.state"] = torch.stack(episode["state"])
    for cam in case.cameras:
        tensors[f"episode.observation.images.{cam}"] = torch.stack([i[cam] for i in episode["images"]])
    tensors["episode.noise"] = torch.stack(episode["noise"])
    tensors["episode.action"] = torch.stack(episode["action"])
    return {k: v.contiguous() for k, v in tensors.items()}, tasks, n_steps


def relocate_backbone_path(case_dir: Path, relative: str):
    """Makes the saved config and the preprocessor's tokenizer step name the backbone by a path
    relative to the checkpoint directory (LeRobot writes the path it was given)."""
    config_path = case_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["vlm_model_name"] = relative
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    pre_path = case_dir / "policy_preprocessor.json"
    pre = json.loads(pre_path.read_text())
    steps = [s for s in pre["steps"] if s.get("registry_name") == "tokenizer_processor"]
    if len(steps) != 1:
        raise SystemExit(f"{pre_path}: expected one tokenizer_processor step, found {len(steps)}")
    steps[0]["config"]["tokenizer_name"] = relative
    pre_path.write_text(json.dumps(pre, indent=2) + "\n")


@contextlib.contextmanager
def cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def load_back(case_dir: Path):
    """The checkpoint as a user loads it with LeRobot, from inside its directory so the relative
    `vlm_model_name` resolves against it."""
    with cwd(case_dir):
        policy = SmolVLAPolicy.from_pretrained(".")
        policy.eval()
        pre = PolicyProcessorPipeline.from_pretrained(".", config_filename="policy_preprocessor.json")
        post = PolicyProcessorPipeline.from_pretrained(
            ".", config_filename="policy_postprocessor.json",
            to_transition=policy_action_to_transition, to_output=transition_to_policy_action,
        )
    return policy, pre, post


def write_case(case: Case, out: Path, command: str):
    backbone = BACKBONES[case.backbone]
    check_layer_rules(case, backbone)
    backbone_dir = (out / "backbones" / backbone.name).resolve()
    case_dir = out / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(backbone_dir, case_dir.resolve())

    started = time.monotonic()
    config = make_config(case, backbone_dir)
    rng = np.random.default_rng(case.seed)
    stats = dataset_stats(case, rng)
    torch.manual_seed(case.seed)
    with contextlib.redirect_stdout(sys.stderr):  # LeRobot prints "Reducing the number of VLM layers"
        policy = SmolVLAPolicy(config)
    policy.eval()
    pre, post = make_smolvla_pre_post_processors(config, dataset_stats=stats)
    tensors, tasks, n_steps = run_case(policy, pre, post, case, rng, record=True)

    policy.save_pretrained(case_dir)
    pre.save_pretrained(case_dir)
    post.save_pretrained(case_dir)
    relocate_backbone_path(case_dir, relative)
    (case_dir / "README.md").unlink(missing_ok=True)  # a model card template, not part of the fixture

    # Loaded back from disk with LeRobot, the fixture must give the same tensors.
    with contextlib.redirect_stdout(sys.stderr):
        policy2, pre2, post2 = load_back(case_dir)
    rng2 = np.random.default_rng(case.seed)
    dataset_stats(case, rng2)  # the same draws as above, so the inputs repeat
    again, _, _ = run_case(policy2, pre2, post2, case, rng2, record=False)
    reload_diff = max(float((again[k].double() - tensors[k].double()).abs().max()) for k in again)
    if reload_diff != 0.0:
        raise SystemExit(f"case {case.name}: the checkpoint loaded back from {case_dir} gives other "
                         f"outputs (max abs difference {reload_diff}); its reference.safetensors is not written")

    n_vlm = min(case.policy["num_vlm_layers"], backbone.text_layers)
    meta = {
        "case": case.name,
        "seed": case.seed,
        "backbone": backbone.name,
        "vlm_model_name": relative,
        "cameras": list(case.cameras),
        "image_sizes": {cam: [3, h, w] for cam, (h, w) in case.cameras.items()},
        "state_dim": case.state_dim,
        "action_dim": case.action_dim,
        "policy": {k: list(v) if isinstance(v, tuple) else v for k, v in case.policy.items()},
        "num_vlm_layers_kept": n_vlm,
        "normalization_mapping": {k: v.value for k, v in config.normalization_mapping.items()},
        "tasks": tasks,
        "chunk_calls": case.chunk_calls,
        "episode_steps": n_steps + 1,
        "episode_reset_before": [n_steps],
        "images": "chunk.observation.images.<cam>: float32 [K, 3, H, W] in [0, 1] as LeRobot got them; "
                  "episode.observation.images.<cam>: the uint8 [T, H, W, 3] camera frames, given to "
                  "LeRobot as frame.permute(2, 0, 1).float() / 255 (float32 division)",
        "tolerances": {"atol": ATOL, "rtol": RTOL, "reload_max_abs_diff": reload_diff},
        "versions": {"lerobot": lerobot.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "command": command,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "dtype": "float32",
    }
    save_file(tensors, case_dir / "reference.safetensors", metadata={"smolvla_reference": json.dumps(meta)})
    size = sum(f.stat().st_size for f in case_dir.iterdir())
    say(f"{case.name}: {len(tensors)} tensors, {size / 1024:.0f} KiB, "
        f"{time.monotonic() - started:.1f} s (loaded back: equal)")


def main():
    parser = argparse.ArgumentParser(
        description="Write SmolVLA reference fixtures (LeRobot checkpoint directories, stand-in "
                    "backbones and reference.safetensors) with LeRobot 0.4.4. Run it with "
                    ".venv-lerobot/bin/python (bash tools/bootstrap-lerobot.sh builds it).")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. test/data/smolvla")
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES],
                        help="write only this case (repeatable; default: all)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    command = "python tools/make_smolvla_reference.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    say(f"lerobot {lerobot.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    cases = [c for c in CASES if not args.case or c.name in args.case]
    for name in sorted({c.backbone for c in cases}):
        write_backbone(BACKBONES[name], args.out / "backbones" / name)
        say(f"backbone {name} -> {args.out / 'backbones' / name}")
    for case in cases:
        say(f"case {case.name} ...")
        write_case(case, args.out, command)
    say(f"done: {len(cases)} cases under {args.out}")


if __name__ == "__main__":
    main()
