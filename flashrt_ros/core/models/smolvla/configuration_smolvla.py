"""SmolVLAConfig: the shapes of a LeRobot SmolVLA policy, read from its checkpoint directory.

A LeRobot SmolVLA directory names its backbone in `vlm_model_name`; the policy's shapes come from
both files:

* the policy's `config.json` (`"type": "smolvla"`): the features (cameras, state, action), the
  padded `max_state_dim` / `max_action_dim`, `chunk_size`, `n_action_steps`, `num_steps`, the
  image size of `resize_imgs_with_padding`, the language length, and how the action expert is cut
  (`num_vlm_layers`, `num_expert_layers`, `self_attn_every_n_layers`, `expert_width_multiplier`);
* the backbone's `config.json` (a SmolVLM: a `smolvlm_vision` tower and a `llama` text model):
  widths, heads, norms, `scale_factor` of the pixel-shuffle connector.

Derived as LeRobot derives them (lerobot/policies/smolvla/smolvlm_with_expert.py): the expert is the
text model's config with `hidden_size * expert_width_multiplier` and an MLP width of
`get_intermediate_size`; its heads and head width are the text model's. The prefix the expert
attends to has a fixed length here: every camera's image tokens (with the image special tokens when
`add_image_special_tokens`), the language tokens padded to `tokenizer_max_length` (padding is masked
out, which leaves LeRobot's result as it is: see modeling_smolvla.py), and one state token.
"""
from __future__ import annotations

from dataclasses import dataclass

from flashrt_ros.core.exceptions import ConfigError

ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")


def get_intermediate_size(hidden_dim: int, ffn_dim_multiplier: int = 4, multiple_of: int = 256) -> int:
    """The action expert's MLP width: 2/3 of 4x the width, rounded up to a multiple of 256."""
    hidden_dim = int(2 * hidden_dim / 3)
    hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    layer_norm_eps: float
    hidden_act: str
    num_channels: int = 3

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class LlamaConfig:
    """The text model's fields the prefix and the expert read (a transformers `llama` config)."""
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    vocab_size: int
    attention_bias: bool = False
    mlp_bias: bool = False


@dataclass(frozen=True)
class Feature:
    key: str                 # e.g. observation.images.top
    type: str                # VISUAL, STATE, ACTION
    shape: tuple


@dataclass(frozen=True)
class SmolVLAConfig:
    name: str
    vision: VisionConfig
    text: LlamaConfig
    expert: LlamaConfig
    scale_factor: int
    num_vlm_layers: int            # text layers used (the first ones)
    num_expert_layers: int
    self_attn_every_n_layers: int
    attention_mode: str
    cameras: tuple                 # image feature keys, in the config's order
    camera_shapes: tuple           # (3, H, W) each, as the dataset gives them
    state_dim: int
    action_dim: int
    max_state_dim: int
    max_action_dim: int
    chunk_size: int
    n_action_steps: int
    num_steps: int
    resize: tuple                  # (width, height) of resize_imgs_with_padding
    tokenizer_max_length: int
    add_image_special_tokens: bool
    fake_image_token_id: int
    global_image_token_id: int
    min_period: float
    max_period: float
    normalization: dict            # feature type -> mode
    dtype: str = "float32"

    # -- derived shapes ---------------------------------------------------------------------
    @property
    def image_grid(self) -> int:
        """Patches per side of an image resized to `resize` (the tower's own grid when the sizes
        agree, as at SmolVLA's published shapes)."""
        return self.resize[0] // self.vision.patch_size

    @property
    def image_tokens(self) -> int:
        """Tokens one image gives after the pixel shuffle."""
        return self.image_grid ** 2 // self.scale_factor ** 2

    @property
    def tokens_per_camera(self) -> int:
        return self.image_tokens + (3 if self.add_image_special_tokens else 0)

    @property
    def lang_offset(self) -> int:
        return len(self.cameras) * self.tokens_per_camera

    @property
    def prefix_len(self) -> int:
        return self.lang_offset + self.tokenizer_max_length + 1

    @property
    def max_context(self) -> int:
        """The arena's KV rows: the prefix (the runtime's `position` after an observation)."""
        return self.prefix_len

    def expert_layer_of(self, vlm_layer: int) -> int | None:
        """The expert layer that runs beside VLM layer `vlm_layer`, if any (LeRobot's
        get_model_layers: with fewer expert layers, every `multiple_of`-th VLM layer has one)."""
        multiple_of = self.num_vlm_layers // self.num_expert_layers
        if multiple_of > 0 and vlm_layer > 0 and vlm_layer % multiple_of != 0:
            return None
        return vlm_layer // multiple_of if multiple_of > 0 else vlm_layer

    def self_attends(self, layer: int) -> bool:
        """Whether layer `layer` attends to itself (self-attention over prefix + actions) rather
        than cross-attending to the prefix's keys and values. LeRobot asks this of the VLM layer
        index when it runs a layer and of the expert layer index when it shapes its k/v
        projections; both are passed here."""
        return "cross" not in self.attention_mode or (
            self.self_attn_every_n_layers > 0 and layer % self.self_attn_every_n_layers == 0)


def _get(d: dict, key: str, kind, where: str, default=None):
    if key not in d:
        if default is None:
            raise ConfigError(f"{where}: expected a {key!r} entry, found none")
        return default
    v = d[key]
    ok = isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v, ok = float(v), True
    if not ok:
        raise ConfigError(f"{where}: {key!r}: expected {kind.__name__}, found {v!r}")
    return v


def _vision(d: dict, where: str) -> VisionConfig:
    where = f"{where} vision_config"
    cfg = VisionConfig(
        hidden_size=_get(d, "hidden_size", int, where, 768),
        intermediate_size=_get(d, "intermediate_size", int, where, 3072),
        num_hidden_layers=_get(d, "num_hidden_layers", int, where, 12),
        num_attention_heads=_get(d, "num_attention_heads", int, where, 12),
        patch_size=_get(d, "patch_size", int, where, 32),
        image_size=_get(d, "image_size", int, where, 224),
        layer_norm_eps=_get(d, "layer_norm_eps", float, where, 1e-6),
        hidden_act=_get(d, "hidden_act", str, where, "gelu_pytorch_tanh"),
        num_channels=_get(d, "num_channels", int, where, 3))
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_act: expected one of {ACTIVATIONS}, found {cfg.hidden_act!r}")
    if cfg.num_channels != 3 or cfg.image_size % cfg.patch_size or \
            cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{where}: expected 3 channels, image_size a multiple of patch_size and "
                          f"hidden_size a multiple of num_attention_heads, found {cfg}")
    return cfg


def _llama(d: dict, where: str) -> LlamaConfig:
    where = f"{where} text_config"
    if d.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where}: model_type: expected 'llama' (SmolVLM's text model), found "
                          f"{d.get('model_type')!r}")
    hidden = _get(d, "hidden_size", int, where)
    heads = _get(d, "num_attention_heads", int, where)
    head_dim = d.get("head_dim") or hidden // heads
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=_get(d, "intermediate_size", int, where),
        num_attention_heads=heads,
        num_key_value_heads=_get(d, "num_key_value_heads", int, where, heads),
        head_dim=int(head_dim),
        rms_norm_eps=_get(d, "rms_norm_eps", float, where, 1e-6),
        hidden_act=_get(d, "hidden_act", str, where, "silu"),
        vocab_size=_get(d, "vocab_size", int, where),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)))
    if cfg.hidden_act not in ACTIVATIONS or heads % cfg.num_key_value_heads or head_dim % 2:
        raise ConfigError(f"{where}: expected hidden_act in {ACTIVATIONS}, num_attention_heads a "
                          f"multiple of num_key_value_heads and an even head_dim, found {cfg}")
    return cfg


def _features(policy: dict, key: str, where: str) -> dict:
    feats = policy.get(key)
    if not isinstance(feats, dict):
        raise ConfigError(f"{where}: {key!r}: expected an object of features, found {feats!r}")
    out = {}
    for name, f in feats.items():
        if not isinstance(f, dict) or not isinstance(f.get("shape"), (list, tuple)) or \
                not all(isinstance(s, int) and s > 0 for s in f["shape"]):
            raise ConfigError(f"{where}: {key}.{name}: expected {{'type': ..., 'shape': [...]}}, "
                              f"found {f!r}")
        out[name] = Feature(name, str(f.get("type")), tuple(f["shape"]))
    return out


def from_lerobot(policy: dict, backbone: dict, tokens: dict, *, name: str, where: str,
                 dtype: str = "float32") -> SmolVLAConfig:
    """The config of a LeRobot SmolVLA directory: its `config.json` (`policy`), the backbone's
    `config.json` (`backbone`) and the image token ids of the backbone's tokenizer (`tokens`:
    fake_image_token_id, global_image_token_id)."""
    if policy.get("type") != "smolvla":
        raise ConfigError(f"{where}: type: expected 'smolvla', found {policy.get('type')!r}")
    vision = _vision(backbone.get("vision_config") or {}, f"{where} backbone")
    text_cfg = backbone.get("text_config")
    if not isinstance(text_cfg, dict):
        raise ConfigError(f"{where} backbone: expected a 'text_config' object (a SmolVLM config), "
                          f"found {type(text_cfg).__name__}")
    text = _llama(text_cfg, f"{where} backbone")
    text_layers = _get(text_cfg, "num_hidden_layers", int, f"{where} backbone text_config")

    inputs = _features(policy, "input_features", where)
    outputs = _features(policy, "output_features", where)
    cameras = [f for f in inputs.values() if f.type == "VISUAL"]
    states = [f for f in inputs.values() if f.type == "STATE"]
    actions = [f for f in outputs.values() if f.type == "ACTION"]
    if not cameras or len(states) != 1 or len(actions) != 1:
        raise ConfigError(f"{where}: expected at least one VISUAL input feature, one STATE input "
                          f"and one ACTION output, found inputs {sorted(inputs)} and outputs "
                          f"{sorted(outputs)}")
    if policy.get("empty_cameras", 0):
        raise ConfigError(f"{where}: empty_cameras: expected 0 (padding cameras is not served "
                          f"here), found {policy['empty_cameras']}")
    if policy.get("adapt_to_pi_aloha") or policy.get("use_delta_joint_actions_aloha"):
        raise ConfigError(f"{where}: adapt_to_pi_aloha / use_delta_joint_actions_aloha: expected "
                          f"false (Aloha's joint conversions are not served here)")
    if policy.get("prefix_length", -1) > 0:
        raise ConfigError(f"{where}: prefix_length: expected -1 (no padded prefix), found "
                          f"{policy['prefix_length']}")
    if policy.get("rtc_config"):
        raise ConfigError(f"{where}: rtc_config: expected none (real-time chunking is not served "
                          f"here), found {policy['rtc_config']!r}")

    num_vlm = _get(policy, "num_vlm_layers", int, where, 16)
    num_vlm = min(num_vlm, text_layers) if num_vlm > 0 else text_layers
    num_expert = _get(policy, "num_expert_layers", int, where, -1)
    num_expert = num_expert if num_expert > 0 else num_vlm
    if num_vlm % num_expert:
        raise ConfigError(f"{where}: num_expert_layers: expected a divisor of the {num_vlm} VLM "
                          f"layers used, found {num_expert}")
    mult = _get(policy, "expert_width_multiplier", float, where, 0.75)
    expert_hidden = int(text.hidden_size * mult)
    expert = LlamaConfig(**{**text.__dict__, "hidden_size": expert_hidden,
                            "intermediate_size": get_intermediate_size(expert_hidden)})
    resize = policy.get("resize_imgs_with_padding") or (vision.image_size, vision.image_size)
    scale = _get(backbone, "scale_factor", int, f"{where} backbone", 2)
    if not (isinstance(resize, (list, tuple)) and len(resize) == 2 and resize[0] == resize[1]
            and isinstance(resize[0], int) and resize[0] % (vision.patch_size * scale) == 0):
        # the pixel shuffle takes a square grid of patches whose side the scale divides
        raise ConfigError(f"{where}: resize_imgs_with_padding: expected [S, S] with S a multiple "
                          f"of patch_size * scale_factor = {vision.patch_size * scale} (SmolVLA's "
                          f"published [512, 512]), found {resize!r}")
    norm = policy.get("normalization_mapping") or {}
    norm = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD", **norm}
    bad = {k: v for k, v in norm.items() if v not in NORM_MODES}
    if bad:
        raise ConfigError(f"{where}: normalization_mapping: expected modes in {NORM_MODES}, found {bad}")
    mode = policy.get("attention_mode", "cross_attn")
    if (mode != "cross_attn" and "cross" in mode) or mode not in ("cross_attn", "self_attn"):
        raise ConfigError(f"{where}: attention_mode: expected 'cross_attn' or 'self_attn', found {mode!r}")

    cfg = SmolVLAConfig(
        name=name, vision=vision, text=text, expert=expert, scale_factor=scale,
        num_vlm_layers=num_vlm, num_expert_layers=num_expert,
        self_attn_every_n_layers=_get(policy, "self_attn_every_n_layers", int, where, 2),
        attention_mode=mode,
        cameras=tuple(f.key for f in cameras), camera_shapes=tuple(f.shape for f in cameras),
        state_dim=states[0].shape[-1], action_dim=actions[0].shape[-1],
        max_state_dim=_get(policy, "max_state_dim", int, where, 32),
        max_action_dim=_get(policy, "max_action_dim", int, where, 32),
        chunk_size=_get(policy, "chunk_size", int, where, 50),
        n_action_steps=_get(policy, "n_action_steps", int, where, 50),
        num_steps=_get(policy, "num_steps", int, where, 10),
        resize=tuple(resize),
        tokenizer_max_length=_get(policy, "tokenizer_max_length", int, where, 48),
        add_image_special_tokens=bool(policy.get("add_image_special_tokens", False)),
        fake_image_token_id=int(tokens.get("fake_image_token_id", -1)),
        global_image_token_id=int(tokens.get("global_image_token_id", -1)),
        min_period=_get(policy, "min_period", float, where, 4e-3),
        max_period=_get(policy, "max_period", float, where, 4.0),
        normalization=norm, dtype=dtype)
    checks = [
        (cfg.state_dim <= cfg.max_state_dim, "the state", "max_state_dim", cfg.state_dim),
        (cfg.action_dim <= cfg.max_action_dim, "the action", "max_action_dim", cfg.action_dim),
        (0 < cfg.n_action_steps <= cfg.chunk_size, "n_action_steps", "chunk_size", cfg.n_action_steps),
    ]
    for ok, what, bound, found in checks:
        if not ok:
            raise ConfigError(f"{where}: expected {what} to fit {bound}, found {found}")
    if cfg.num_steps < 1 or cfg.tokenizer_max_length < 1 or expert_hidden % 2:
        raise ConfigError(f"{where}: expected num_steps >= 1, tokenizer_max_length >= 1 and an even "
                          f"expert width, found {cfg.num_steps}, {cfg.tokenizer_max_length}, "
                          f"{expert_hidden}")
    if cfg.add_image_special_tokens and min(cfg.fake_image_token_id, cfg.global_image_token_id) < 0:
        raise ConfigError(f"{where}: add_image_special_tokens needs the tokenizer's "
                          f"fake_image_token and global_image_token; the backbone's tokenizer "
                          f"has {tokens}")
    for i in range(num_vlm):
        j = cfg.expert_layer_of(i)
        # LeRobot decides self- or cross-attention by the VLM layer index when it runs a layer
        # and by the expert layer index when it shapes the layer's k/v; where they disagree it
        # fails (torch.cat of an empty list, or a shape error)
        if (j is None and cfg.self_attends(i)) or \
                (j is not None and cfg.self_attends(i) != cfg.self_attends(j)):
            raise ConfigError(f"{where}: VLM layer {i} and its expert layer {j} disagree on "
                              f"self- or cross-attention ({num_vlm} VLM layers, {num_expert} "
                              f"expert layers, self-attention every "
                              f"{cfg.self_attn_every_n_layers}); LeRobot cannot run this "
                              f"combination either: choose num_expert_layers = num_vlm_layers "
                              f"or a self_attn_every_n_layers the layer counts agree on")
    return cfg
