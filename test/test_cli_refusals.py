"""`flashrt-ros` refusing what it cannot do: the message alone on stderr (what was expected, what
was found, what to do), a non-zero exit status, no traceback. The commands that need no ROS
(`generate`, `info`) run in this process; one runs as the installed executable to hold the
process's own exit status and output.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from flashrt_ros.cli.main import main
from flashrt_ros.ros.process import executable


def broken_json(d):
    (d / "config.json").write_text("{not json")


def no_weights(d):
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_5_text"}))


def empty_tokenizer_prompt(d):
    """A checkpoint whose tokenizer.json turns the empty text into no tokens at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from flashrt_ros.core.models.qwen3_5 import checkpoint_qwen3_5
    from flashrt_ros.core.runtime import PolicyRuntime
    rt = PolicyRuntime()
    checkpoint_qwen3_5.save_pretrained(rt.model, str(d))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "pick": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


CASES = {
    # name: (how the model directory is made, the command after `--model DIR`, what the message
    # says)
    "generate, config.json not JSON": (broken_json, ["generate", "hello"],
                                       ["expected a JSON file", "config.json"]),
    "info, no weights": (no_weights, ["info"], ["model.safetensors", "found neither"]),
    "generate, no directory": (None, ["generate", "hello"], ["expected a checkpoint directory"]),
    "generate, too many new tokens": ("tiny", ["generate", "--max-new-tokens", "100000", "hi"],
                                      ["decode", "100000", "exceed"]),
    "generate, empty prompt": (empty_tokenizer_prompt, ["generate", ""],
                               ["expected at least one token"]),
    "generate, unknown preset": ("no-such-preset", ["generate", "hello"],
                                 ["no preset named 'no-such-preset'"]),
}


def model_arg(make, tmp_path):
    if make is None:
        return str(tmp_path / "missing")
    if isinstance(make, str):
        return make
    make(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_refusal_is_the_message_alone_and_a_non_zero_status(tmp_path, capsys, case):
    make, command, said = CASES[case]
    rc = main([command[0], "--model", model_arg(make, tmp_path), *command[1:]])
    out, err = capsys.readouterr()
    assert rc != 0
    lines = [x for x in err.splitlines() if not x.startswith("[flashrt] ")]     # progress lines
    assert len(lines) == 1 and lines[0].startswith(f"flashrt-ros {command[0]}: "), err
    for s in said:
        assert s in lines[0], err


def test_the_executable_exits_with_the_message_and_no_traceback(tmp_path):
    broken_json(tmp_path)
    r = subprocess.run([executable("flashrt-ros"), "info", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "expected a JSON file" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("flashrt-ros info: ")
