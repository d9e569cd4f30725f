"""Synthetic LeRobot SmolVLA checkpoints: random weights at given shapes, written as LeRobot writes a
trained policy, so that benchmarks run the published model's shapes without its weights.

`write_checkpoint(out_dir, shapes, seed, dtype)` lays out the directories as the reference fixtures
(test/data/smolvla, docs/smolvla_reference.md) lay them out:

    out_dir/<shapes.name>/                        the policy, as SmolVLAPolicy.save_pretrained and
        config.json                               its processors write it; vlm_model_name is
        model.safetensors                         "../backbones/<shapes.backbone>"
        policy_preprocessor.json (+ its normaliser statistics)
        policy_postprocessor.json (+ its unnormaliser statistics)
    out_dir/backbones/<shapes.backbone>/          the SmolVLM folder: config.json and processor
                                                  configs at these shapes; the tokenizer files
                                                  copied from a fixture backbone (the loader needs
                                                  only text_config.vocab_size >= its vocabulary)

(`shapes.backbone_path` puts the backbone elsewhere, relative to the policy directory: a preset
keeps it inside, `config/presets/smolvla-tiny/backbone/`.) `save_lerobot` writes a given model
(e.g. trained: flashrt_ros/sim/imitation_vla.py) in the same layout.

Tensors carry LeRobot's names (checkpoint_smolvla.PREFIXES read backwards), including the two
LeRobot saves and no action reads (the VLM's LM head and final norm). Values come from a CPU
`torch.Generator` seeded with `seed`, in the modules' order: matrices and embeddings normal with
std 0.02, other biases too, norm weights ones and norm biases zeros; the normalisers' statistics are
random but ordered (min < q01 < mean < q99 < max, std > 0). The projections around the expert are
stored in float32 whatever `dtype` is, as the loader keeps them (checkpoint_smolvla.param_dtype).

`PUBLISHED` is SmolVLA's published model (lerobot/smolvla_base on SmolVLM2-500M-Video-Instruct,
~450 M tensors' values counting the LM head LeRobot saves); `TINY` the fixture backbone tiny-a
with the same policy fields, small enough for the CPU.

    python -m flashrt_ros.core.models.smolvla.synthetic_smolvla OUT_DIR --shapes published
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass, field

import torch
from torch import nn

from flashrt_ros.core.arena import DTYPES
from flashrt_ros.core.models.smolvla.checkpoint_smolvla import (CONFIG, PREFIXES, TOKENIZER,
                                                                UNUSED, WEIGHTS, param_dtype)
from flashrt_ros.core.models.smolvla.configuration_smolvla import (LlamaConfig, SmolVLAConfig,
                                                                   VisionConfig, from_lerobot)
from flashrt_ros.core.models.smolvla.modeling_smolvla import RMSNorm, SmolVLAModel
from flashrt_ros.core.models.smolvla.processor_smolvla import POSTPROCESSOR, PREPROCESSOR, STATS

INIT_STD = 0.02
# the fixture backbone whose tokenizer files are copied (a checkout's test data)
FIXTURE_BACKBONE = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..", "test", "data", "smolvla",
    "backbones", "tiny-a"))
# copied as they are from the fixture backbone: they belong to its tokenizer
COPIED = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json",
          "video_preprocessor_config.json")
NORMALIZER_STATS = "policy_preprocessor_step_5_normalizer_processor.safetensors"
UNNORMALIZER_STATS = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
STATE_KEY, ACTION_KEY = "observation.state", "action"


@dataclass(frozen=True)
class Shapes:
    """A synthetic checkpoint's shapes: the backbone's config and the policy's fields."""
    name: str                      # the policy directory's name
    backbone: str                  # the backbone folder's name, under backbones/
    vision: VisionConfig
    text: LlamaConfig
    text_layers: int               # the backbone's text_config.num_hidden_layers
    scale_factor: int
    cameras: tuple                 # ((camera name, (3, H, W)), ...): frames as the dataset has them
    state_dim: int
    action_dim: int
    max_state_dim: int = 32
    max_action_dim: int = 32
    chunk_size: int = 50
    n_action_steps: int = 50
    num_steps: int = 10
    num_vlm_layers: int = 16
    num_expert_layers: int = -1
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    attention_mode: str = "cross_attn"
    tokenizer_max_length: int = 48
    resize: tuple = (512, 512)
    normalization: dict = field(default_factory=lambda: {
        "VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"})
    backbone_path: str = ""        # vlm_model_name, relative to the policy directory; "" is
                                   # "../backbones/<backbone>" (the fixtures' layout)

    @property
    def vlm_model_name(self) -> str:
        return self.backbone_path or f"../backbones/{self.backbone}"


CAMERAS_480P = tuple((f"camera{i}", (3, 480, 640)) for i in (1, 2, 3))

PUBLISHED = Shapes(
    name="smolvla_published", backbone="SmolVLM2-500M-Video-Instruct",
    vision=VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, patch_size=16, image_size=512,
                        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    text=LlamaConfig(hidden_size=960, intermediate_size=2560, num_attention_heads=15,
                     num_key_value_heads=5, head_dim=64, rms_norm_eps=1e-5, hidden_act="silu",
                     vocab_size=49280),
    text_layers=32, scale_factor=4, cameras=CAMERAS_480P, state_dim=6, action_dim=6)

TINY = Shapes(
    name="smolvla_tiny", backbone="tiny-a",
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, patch_size=8, image_size=32, layer_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh"),
    text=LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, hidden_act="silu",
                     vocab_size=300),
    text_layers=6, scale_factor=2, cameras=CAMERAS_480P, state_dim=6, action_dim=6,
    num_vlm_layers=4, resize=(32, 32))

SHAPES = {"published": PUBLISHED, "tiny": TINY}


# -- the JSON files, in the fixtures' structure -----------------------------------------------------
def _features(shapes: Shapes) -> tuple[dict, dict]:
    inputs = {f"observation.images.{cam}": {"type": "VISUAL", "shape": list(shape)}
              for cam, shape in shapes.cameras}
    inputs[STATE_KEY] = {"type": "STATE", "shape": [shapes.state_dim]}
    return inputs, {ACTION_KEY: {"type": "ACTION", "shape": [shapes.action_dim]}}


def backbone_config(shapes: Shapes, image_token_id: int, pad_token_id: int) -> dict:
    """The backbone's config.json (transformers' SmolVLMConfig as saved)."""
    v, t = shapes.vision, shapes.text
    text = {"attention_bias": t.attention_bias, "attention_dropout": 0.0, "head_dim": t.head_dim,
            "hidden_act": t.hidden_act, "hidden_size": t.hidden_size, "initializer_range": INIT_STD,
            "intermediate_size": t.intermediate_size, "max_position_embeddings": 8192,
            "mlp_bias": t.mlp_bias, "model_type": "llama",
            "num_attention_heads": t.num_attention_heads, "num_hidden_layers": shapes.text_layers,
            "num_key_value_heads": t.num_key_value_heads, "pad_token_id": pad_token_id,
            "pretraining_tp": 1, "rms_norm_eps": t.rms_norm_eps, "rope_scaling": None,
            "rope_theta": 10000.0, "use_cache": True, "vocab_size": t.vocab_size}
    vision = {"attention_dropout": 0.0, "hidden_act": v.hidden_act, "hidden_size": v.hidden_size,
              "image_size": v.image_size, "initializer_range": INIT_STD,
              "intermediate_size": v.intermediate_size, "layer_norm_eps": v.layer_norm_eps,
              "model_type": "smolvlm_vision", "num_attention_heads": v.num_attention_heads,
              "num_channels": v.num_channels, "num_hidden_layers": v.num_hidden_layers,
              "patch_size": v.patch_size}
    return {"image_token_id": image_token_id, "model_type": "smolvlm", "pad_token_id": pad_token_id,
            "scale_factor": shapes.scale_factor, "text_config": text, "tie_word_embeddings": False,
            "transformers_version": "4.57.6", "use_cache": True, "vision_config": vision,
            "vocab_size": t.vocab_size}


def processor_configs(shapes: Shapes) -> dict:
    """The backbone's image processor files: {file name: JSON object}."""
    v = shapes.vision
    edge = {"longest_edge": v.image_size}
    image_seq_len = (v.image_size // v.patch_size) ** 2 // shapes.scale_factor ** 2
    return {
        "preprocessor_config.json": {
            "do_convert_rgb": True, "do_image_splitting": False, "do_normalize": True,
            "do_pad": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
            "image_processor_type": "SmolVLMImageProcessor", "image_std": [0.5] * 3,
            "max_image_size": edge, "processor_class": "SmolVLMProcessor", "resample": 1,
            "rescale_factor": 1 / 255, "size": edge},
        "processor_config.json": {"image_seq_len": image_seq_len,
                                  "processor_class": "SmolVLMProcessor"},
    }


def policy_config(shapes: Shapes) -> dict:
    """The policy's config.json (LeRobot 0.4.4's SmolVLAConfig as saved)."""
    inputs, outputs = _features(shapes)
    return {
        "type": "smolvla", "n_obs_steps": 1, "input_features": inputs, "output_features": outputs,
        "device": "cpu", "use_amp": False, "use_peft": False, "push_to_hub": False,
        "repo_id": None, "private": None, "tags": None, "license": None, "pretrained_path": None,
        "chunk_size": shapes.chunk_size, "n_action_steps": shapes.n_action_steps,
        "normalization_mapping": dict(shapes.normalization),
        "max_state_dim": shapes.max_state_dim, "max_action_dim": shapes.max_action_dim,
        "resize_imgs_with_padding": list(shapes.resize), "empty_cameras": 0,
        "adapt_to_pi_aloha": False, "use_delta_joint_actions_aloha": False,
        "tokenizer_max_length": shapes.tokenizer_max_length, "num_steps": shapes.num_steps,
        "use_cache": True, "freeze_vision_encoder": True, "train_expert_only": True,
        "train_state_proj": True, "optimizer_lr": 0.0001, "optimizer_betas": [0.9, 0.95],
        "optimizer_eps": 1e-08, "optimizer_weight_decay": 1e-10, "optimizer_grad_clip_norm": 10,
        "scheduler_warmup_steps": 1000, "scheduler_decay_steps": 30000,
        "scheduler_decay_lr": 2.5e-06, "vlm_model_name": shapes.vlm_model_name,
        "load_vlm_weights": False, "add_image_special_tokens": False,
        "attention_mode": shapes.attention_mode, "prefix_length": -1,
        "pad_language_to": "longest", "num_expert_layers": shapes.num_expert_layers,
        "num_vlm_layers": shapes.num_vlm_layers,
        "self_attn_every_n_layers": shapes.self_attn_every_n_layers,
        "expert_width_multiplier": shapes.expert_width_multiplier, "min_period": 0.004,
        "max_period": 4.0, "rtc_config": None, "compile_model": False,
        "compile_mode": "max-autotune"}


def processor_files(shapes: Shapes) -> dict:
    """policy_preprocessor.json and policy_postprocessor.json: {file name: JSON object}."""
    inputs, outputs = _features(shapes)
    norm = dict(shapes.normalization)
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {"registry_name": "tokenizer_processor", "config": {
            "max_length": shapes.tokenizer_max_length, "task_key": "task",
            "padding_side": "right", "padding": "longest", "truncation": True,
            "tokenizer_name": shapes.vlm_model_name}},
        device,
        {"registry_name": "normalizer_processor", "config": {
            "eps": 1e-08, "features": {**inputs, **outputs}, "norm_map": norm},
         "state_file": NORMALIZER_STATS}]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {
            "eps": 1e-08, "features": outputs, "norm_map": norm},
         "state_file": UNNORMALIZER_STATS},
        device]}
    return {PREPROCESSOR: pre, POSTPROCESSOR: post}


# -- the tensors --------------------------------------------------------------------------------
def lerobot_name(ours: str) -> str:
    """Our parameter name -> LeRobot's tensor name (checkpoint_smolvla.PREFIXES backwards; its
    last entry, "model." -> "", takes every name the others do not)."""
    for prefix, mine in PREFIXES:
        if ours.startswith(mine):
            return prefix + ours[len(mine):]
    raise AssertionError(f"PREFIXES ends with a catch-all entry; {ours!r} matched none")


def model_config(shapes: Shapes, tokens: dict | None = None) -> SmolVLAConfig:
    """The config the loader derives from this checkpoint's files (`tokens`: the tokenizer's
    fake_image_token_id and global_image_token_id; unused at add_image_special_tokens false)."""
    return from_lerobot(policy_config(shapes), backbone_config(shapes, 0, 0), tokens or {},
                        name=shapes.name, where=f"synthetic {shapes.name}")


def tensor_specs(shapes: Shapes, dtype: torch.dtype = torch.float32) -> dict:
    """{LeRobot tensor name: (shape, init, stored dtype)} in the order the values are drawn; init
    is "normal", "ones" or "zeros". Built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = SmolVLAModel(model_config(shapes))
    norms = {name for name, m in model.named_modules() if isinstance(m, (RMSNorm, nn.LayerNorm))}
    specs = {}
    for name, p in model.named_parameters():
        module, leaf = name.rpartition(".")[::2]
        init = ("ones" if leaf == "weight" else "zeros") if module in norms else "normal"
        specs[lerobot_name(name)] = (tuple(p.shape), init, param_dtype(name, dtype))
    # saved by LeRobot, read by no action: the VLM's LM head and the text model's final norm
    lm_head, final_norm = UNUSED
    specs[lm_head + "weight"] = ((shapes.text.vocab_size, shapes.text.hidden_size), "normal", dtype)
    specs[final_norm + "weight"] = ((shapes.text.hidden_size,), "ones", dtype)
    return specs


def parameter_count(shapes: Shapes) -> tuple[int, int]:
    """(values in the checkpoint, values the loader reads): the difference is the LM head and
    final norm, which no action reads."""
    specs = tensor_specs(shapes)
    total = sum(torch.Size(s).numel() for s, _, _ in specs.values())
    unread = sum(torch.Size(s).numel() for k, (s, _, _) in specs.items() if k.startswith(UNUSED))
    return total, total - unread


def _draw(shape: tuple, init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "normal":
        return torch.randn(shape, generator=gen) * INIT_STD
    return torch.ones(shape) if init == "ones" else torch.zeros(shape)


def random_weights(shapes: Shapes, gen: torch.Generator, dtype: torch.dtype) -> dict:
    return {name: _draw(shape, init, gen).to(stored)
            for name, (shape, init, stored) in tensor_specs(shapes, dtype).items()}


def random_stats(shapes: Shapes, gen: torch.Generator) -> dict:
    """Normaliser statistics of the state and the action, as LeRobot's files key them."""
    out = {}
    for key, dim in ((ACTION_KEY, shapes.action_dim), (STATE_KEY, shapes.state_dim)):
        mean = torch.randn(dim, generator=gen)
        std = 0.5 + torch.rand(dim, generator=gen)
        out.update({f"{key}.mean": mean, f"{key}.std": std,
                    f"{key}.min": mean - 3 * std, f"{key}.max": mean + 3 * std,
                    f"{key}.q01": mean - 2.3 * std, f"{key}.q99": mean + 2.3 * std})
    return out


def _write_json(path: str, data: dict, indent: int = 2) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)


def write_checkpoint(out_dir: str, shapes: Shapes = PUBLISHED, seed: int = 0,
                     dtype: str = "float32", tokenizer_dir: str = FIXTURE_BACKBONE) -> str:
    """Write a LeRobot SmolVLA checkpoint with random weights at `shapes` under `out_dir` (layout
    in the module docstring); `dtype` ("float32", "bfloat16") is the stored dtype of the network's
    tensors. Returns the policy directory, ready for `PolicyRuntime.from_pretrained`."""
    from safetensors.torch import save_file
    stored = _stored_dtype(dtype)
    policy_dir = _write_files(out_dir, shapes, tokenizer_dir)
    gen = torch.Generator().manual_seed(seed)
    save_file(random_weights(shapes, gen, stored), os.path.join(policy_dir, WEIGHTS))
    _write_stats(policy_dir, random_stats(shapes, gen))
    return policy_dir


def save_lerobot(model: SmolVLAModel, shapes: Shapes, out_dir: str, stats: dict, seed: int = 0,
                 dtype: str = "float32", tokenizer_dir: str = FIXTURE_BACKBONE) -> str:
    """Write `model` (a `SmolVLAModel` of `model_config(shapes)`, e.g. trained) as a LeRobot
    SmolVLA checkpoint under `out_dir`, in `write_checkpoint`'s layout, with the normalisers'
    statistics `stats` (LeRobot's keys: "observation.state.mean", "action.std", ...; those of
    each feature's mode in `shapes.normalization` are required). The two tensors LeRobot saves
    and no action reads (the LM head and the final norm; the model has neither) are drawn from
    `seed` (normal with std INIT_STD; the norm ones). Returns the policy directory."""
    from safetensors.torch import save_file
    specs = tensor_specs(shapes, _stored_dtype(dtype))
    ours = {lerobot_name(n): p.detach() for n, p in model.named_parameters()}
    expected = {k: shape for k, (shape, _, _) in specs.items() if not k.startswith(UNUSED)}
    found = {k: tuple(t.shape) for k, t in ours.items()}
    if found != expected:
        wrong = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise ValueError(f"save_lerobot: expected a SmolVLAModel of model_config(shapes) "
                         f"({shapes.name}), found other tensors or shapes: {wrong[:5]}")
    needed = [f"{key}.{stat}" for key, ftype in ((STATE_KEY, "STATE"), (ACTION_KEY, "ACTION"))
              for stat in STATS.get(shapes.normalization.get(ftype, "IDENTITY"), ())]
    dims = {STATE_KEY: shapes.state_dim, ACTION_KEY: shapes.action_dim}
    bad = [k for k in needed if k not in stats or
           tuple(torch.as_tensor(stats[k]).shape) != (dims[k.rsplit(".", 1)[0]],)]
    if bad:
        raise ValueError(f"save_lerobot: stats: expected {needed} of the state's "
                         f"{shapes.state_dim} and the action's {shapes.action_dim} values, "
                         f"missing or misshapen {bad}")
    policy_dir = _write_files(out_dir, shapes, tokenizer_dir)
    gen = torch.Generator().manual_seed(seed)
    weights = {name: (ours[name] if name in ours else _draw(shape, init, gen)).to(stored)
               .contiguous() for name, (shape, init, stored) in specs.items()}
    save_file(weights, os.path.join(policy_dir, WEIGHTS))
    _write_stats(policy_dir, {k: torch.as_tensor(v, dtype=torch.float32).contiguous()
                              for k, v in stats.items()})
    return policy_dir


def _write_stats(policy_dir: str, stats: dict) -> None:
    """The normaliser's and the unnormaliser's statistics files (the same values)."""
    from safetensors.torch import save_file
    save_file(stats, os.path.join(policy_dir, NORMALIZER_STATS))
    save_file(stats, os.path.join(policy_dir, UNNORMALIZER_STATS))


def _stored_dtype(dtype: str) -> torch.dtype:
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, found {dtype!r}")
    return DTYPES[dtype]


def _write_files(out_dir: str, shapes: Shapes, tokenizer_dir: str) -> str:
    """Everything but the tensors: the policy's JSON files, the backbone folder. Returns the
    policy directory."""
    from tokenizers import Tokenizer
    missing = [f for f in COPIED if not os.path.isfile(os.path.join(tokenizer_dir, f))]
    if missing:
        raise FileNotFoundError(f"tokenizer_dir: expected {', '.join(COPIED)} in {tokenizer_dir} "
                                f"(a SmolVLM backbone folder such as the fixture "
                                f"test/data/smolvla/backbones/tiny-a of a checkout), missing "
                                f"{missing}")
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, TOKENIZER))
    if tok.get_vocab_size() > shapes.text.vocab_size:
        raise ValueError(f"shapes.text.vocab_size: expected at least the tokenizer's "
                         f"{tok.get_vocab_size()} tokens, found {shapes.text.vocab_size}")
    policy_dir = os.path.join(out_dir, shapes.name)
    backbone_dir = os.path.normpath(os.path.join(policy_dir, shapes.vlm_model_name))
    os.makedirs(policy_dir, exist_ok=True)
    os.makedirs(backbone_dir, exist_ok=True)

    for name in COPIED:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(backbone_dir, name))
    pad = tok.token_to_id("<|pad|>")
    _write_json(os.path.join(backbone_dir, CONFIG),
                backbone_config(shapes, tok.token_to_id("<image>"), 0 if pad is None else pad))
    for name, data in processor_configs(shapes).items():
        _write_json(os.path.join(backbone_dir, name), data)

    _write_json(os.path.join(policy_dir, CONFIG), policy_config(shapes), indent=4)
    for name, data in processor_files(shapes).items():
        _write_json(os.path.join(policy_dir, name), data)
    return policy_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a LeRobot SmolVLA checkpoint with random "
                                            "weights (layout: this module's docstring).")
    p.add_argument("out_dir")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="published")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = p.parse_args(argv)
    path = write_checkpoint(args.out_dir, SHAPES[args.shapes], args.seed, args.dtype)
    total, read = parameter_count(SHAPES[args.shapes])
    print(f"{path}: {total / 1e6:.1f} M values ({read / 1e6:.1f} M read by the loader)")


if __name__ == "__main__":
    main()
