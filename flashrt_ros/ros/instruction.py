"""The node's `~/instruction`: the task of a camera policy's next observations, or the new context
a state-vector policy prefills.

`InstructionInput` is a part of `PolicyNode` (a base class of it), as capsule_services.py is. It
reads the node's `runtime`, `store`, `late` (the prefill plans still to come, core/bringup.py) and
`inputs`, subscribes in the node's instruction group (`_instruction`) and holds the subscription
in `sub_instr`; a refused instruction goes to the node's `_reject` and changes nothing.

The subscription is latched (ros/publishing.py: an instruction published just before it matched
still comes) and raw (serialized): the text's length is read from the CDR (after the 4-byte
encapsulation header, a uint32 that counts the closing NUL), and a text of more UTF-8 bytes than
4 per character the runtime takes is refused before it is decoded (decoding 30 MB holds the GIL
about 60 ms: two control periods at 30 Hz).

Concurrency: the instruction group is its own, so capsule calls and steps go on while an
instruction waits for its prefill plans, before it takes any lock. A prefill then holds
`store.lock` and `runtime.lock` (the node's lock order) across the new context and the store's
reset: it lands at one committed boundary. A camera policy's task is set on its inputs and read
with each observation after it.
"""
from __future__ import annotations

import contextlib

from rclpy.serialization import deserialize_message
from std_msgs.msg import String

from flashrt_ros.core.exceptions import FlashRTError, InputError
from flashrt_ros.ros.publishing import LATCHED

# A VLA's task is cut to its tokenizer_max_length tokens (as LeRobot's tokenizer cuts it); a text
# longer than this many characters per kept token is refused by its length before it is decoded.
TASK_CHARS_PER_TOKEN = 100


class InstructionInput:
    """The instruction of `PolicyNode` (see the module docstring)."""

    def _subscribe_instruction(self):
        self.sub_instr = self.create_subscription(String, "~/instruction", self._on_instruction,
                                                  LATCHED, callback_group=self._instruction,
                                                  raw=True)

    def _unsubscribe_instruction(self):
        if self.sub_instr is not None:
            self.destroy_subscription(self.sub_instr)
            self.sub_instr = None

    def _on_instruction(self, raw: bytes):
        """A serialized std_msgs/String, refused by its length before it is decoded when too
        long; a VLA's is the task of the observations after it, a state-vector policy's is
        prefilled as a new context."""
        from flashrt_ros.core.vla_runtime import VLARuntime
        rt, store = self.runtime, self.store
        if rt is None:
            self.get_logger().warning("instruction ignored: the node is not configured")
            return
        self._pin_torch_threads()
        vla = isinstance(rt, VLARuntime)
        limit = TASK_CHARS_PER_TOKEN * rt.model_cfg.tokenizer_max_length if vla else \
            rt.max_instruction_chars
        try:
            nbytes = int.from_bytes(raw[4:8], "little" if raw[1] & 1 else "big") - 1
            if nbytes > 4 * limit:
                raise InputError(f"instruction: expected at most {limit} characters (the "
                                 f"{'task' if vla else 'context'}'s tokens; at most "
                                 f"{4 * limit} bytes of UTF-8), found {nbytes} bytes; shorten "
                                 f"the instruction")
            text = deserialize_message(raw, String).data
            if vla:
                if len(text) > limit:
                    raise InputError(f"instruction: expected at most {limit} characters (the "
                                     f"task's tokens), found {len(text)}; shorten the instruction")
                self.inputs.task = text
                self.get_logger().info(f"task of the next observations: {text[:80]!r}"
                                       f"{' ...' if len(text) > 80 else ''}")
                return
            tokens = rt.instruction_tokens(text)     # refused now, not after a wait
            late = self.late
            if late is not None:      # before any lock: steps go on while it waits
                late.wait_for_instruction(len(tokens), say=self.get_logger().info)
            with late.kernels(say=self.get_logger().info) if late is not None else \
                    contextlib.nullcontext(), store.lock, rt.lock:
                n = rt.set_instruction(tokens)
                store.on_reset()
            self.get_logger().info(f"instruction prefilled: {n} tokens, episode {rt.episode}")
        except FlashRTError as e:
            self._reject(f"instruction refused: {e}")
