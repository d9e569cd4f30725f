"""Qwen3.5 (transformers' `Qwen3_5ForCausalLM`): its modules over the state arena, checkpoint
loading, and its policy with observation, action and MTP heads (`core/runtime.py` serves it)."""
