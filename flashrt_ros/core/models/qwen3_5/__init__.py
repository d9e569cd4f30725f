"""Qwen3.5 (transformers' `Qwen3_5ForCausalLM`): its modules over the state arena
(modeling_qwen3_5.py), the attention kernel of its prefill chunks (prefill_attention_qwen3_5.py),
checkpoint loading (checkpoint_qwen3_5.py), and its policy (policy_qwen3_5.py) with observation,
action and MTP heads (heads_qwen3_5.py); `core/runtime.py` serves it."""
