"""A frame -> the policy's image buffer (flashrt_ros/inputs/preprocess.py).

On the CPU: `prepare_frame` is LeRobot's preparation bit for bit: the operations
`SmolVLAPolicy.load_batch` ran inline before (to_unit_image, resize_with_pad, * 2 - 1) on every
frame of the SmolVLA fixtures, and a frame's views (bgr8, rgba8, mono8, padded rows) give the bytes
of their copies. On CUDA (marker gpu): the CuPy kernel equals the torch reference within
KERNEL_ATOL (1e-6 per value in [-1, 1]) over 640x480, 1280x720, 24x24, non-square frames and
buffers, upscaling and downscaling, host and device frames, and runs on torch's current stream.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from flashrt_ros.core.exceptions import InputError
from flashrt_ros.core.models.smolvla.processor_smolvla import resize_with_pad, to_unit_image
from flashrt_ros.inputs import preprocess
from flashrt_ros.inputs.images import image_to_frame, to_image_msg_fields
from flashrt_ros.inputs.preprocess import (KERNEL_ATOL, byte_span, check_frame, fitted_size,
                                           prepare_frame, prepare_frame_cuda,
                                           prepare_frame_reference, prepare_path)

DATA = os.path.join(os.path.dirname(__file__), "data", "smolvla")
# (height, width) of the frame, (height, width) of the buffer
SIZES = [((480, 640), (512, 512)), ((720, 1280), (512, 512)), ((24, 24), (512, 512)),
         ((300, 200), (512, 512)), ((100, 37), (64, 64)), ((720, 1280), (96, 128)),
         ((24, 24), (16, 16)), ((512, 512), (512, 512)), ((33, 517), (224, 224))]


def frame(height, width, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)


def inline_load_batch(img, out: torch.Tensor) -> torch.Tensor:
    """What SmolVLAPolicy.load_batch computed inline before it called prepare_frame."""
    height, width = out.shape[1:]
    return resize_with_pad(to_unit_image(img, "x").to(out.device), width, height) * 2.0 - 1.0


def views(rgb: np.ndarray) -> dict:
    """The frame as image_to_frame gives it for each encoding, rows padded (grey for mono8)."""
    out = {}
    for enc in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8"):
        src = np.repeat(rgb[..., :1], 3, axis=2) if enc == "mono8" else rgb
        h, w, e, step, data = to_image_msg_fields(src, enc, step=rgb.shape[1] * 4 + 3)
        msg = type("Image", (), dict(height=h, width=w, encoding=e, step=step,
                                     data=bytearray(data)))()
        out[enc] = (image_to_frame(msg), src)
    return out


def fixture_frames():
    """(name, image, resize) of every camera image the SmolVLA fixtures hold: float [3, H, W]
    dataset images and uint8 [H, W, 3] camera frames."""
    for case in sorted(os.listdir(DATA)):
        ref = os.path.join(DATA, case, "reference.safetensors")
        if not os.path.isfile(ref):
            continue
        cfg = json.load(open(os.path.join(DATA, case, "config.json")))
        resize = cfg.get("resize_imgs_with_padding") or [512, 512]
        with safe_open(ref, "pt") as f:
            for key in f.keys():
                if ".observation.images." in key:
                    images = f.get_tensor(key)
                    for i in range(images.shape[0]):
                        yield f"{case}/{key}[{i}]", images[i].numpy(), resize


def test_the_fixtures_hold_both_kinds_of_image():
    kinds = {img.dtype for _, img, _ in fixture_frames()}
    assert kinds == {np.dtype(np.float32), np.dtype(np.uint8)}


def test_prepare_frame_is_load_batchs_former_inline_code_bit_for_bit_on_the_fixtures():
    n = 0
    for name, img, (width, height) in fixture_frames():
        out = torch.full((3, height, width), 7.0)
        prepare_frame(img, out, name)
        expected = inline_load_batch(img, out)
        assert out.numpy().tobytes() == expected.numpy().tobytes(), name
        n += 1
    assert n >= 10


@pytest.mark.parametrize("size,out_size", SIZES)
def test_the_reference_is_lerobots_preparation_on_the_cpu(size, out_size):
    rgb = frame(*size)
    out = torch.full((3, *out_size), 7.0)
    prepare_frame(rgb, out)
    assert prepare_path(rgb, out) == "torch"
    assert out.numpy().tobytes() == inline_load_batch(rgb, out).numpy().tobytes()
    h, w = fitted_size(*size, *out_size)
    top, left = out_size[0] - h, out_size[1] - w
    assert (top == 0) or (left == 0)                 # fitted: one side fills the buffer
    assert (out[:, :top] == -1).all() and (out[:, :, :left] == -1).all()
    assert out[:, top:, left:].min() >= -1 and out[:, top:, left:].max() <= 1


def test_a_frame_of_the_buffers_size_is_only_normalised():
    rgb = frame(64, 48)
    out = torch.zeros(3, 64, 48)
    prepare_frame(rgb, out)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 * 2.0 - 1.0
    assert torch.equal(out, expected)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_a_messages_view_gives_the_bytes_of_its_copy(encoding):
    view, src = views(frame(37, 53))[encoding]
    assert not view.flags.c_contiguous
    a, b = torch.zeros(3, 32, 32), torch.zeros(3, 32, 32)
    prepare_frame(view, a)
    prepare_frame(src.copy(), b)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    read_only = np.frombuffer(src.tobytes(), np.uint8).reshape(src.shape)   # as Pillow gives it
    prepare_frame(read_only, b)
    assert a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_the_bytes_a_view_spans_hold_every_pixel_where_its_strides_say(encoding):
    """What the CUDA path uploads: the span's bytes, read through the view's strides."""
    view, src = views(frame(9, 11))[encoding]
    import ctypes
    address, size, first = byte_span(view)
    span = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address)).copy()
    y, x, c = np.meshgrid(*(np.arange(n) for n in view.shape), indexing="ij")
    sy, sx, sc = view.strides
    offsets = first + y * sy + x * sx + c * sc
    assert offsets.min() == 0 and offsets.max() == size - 1     # no byte outside the span
    assert span[offsets].tobytes() == src.tobytes()


@pytest.mark.parametrize("bad,what", [
    (np.zeros((5, 5)), r"float64 \(5, 5\)"),
    (np.zeros((4, 4, 3), np.uint16), "uint16"),
    (np.zeros((4, 4, 4), np.uint8), r"uint8 \(4, 4, 4\)"),
    (np.zeros((3, 4, 4), np.uint8), r"uint8 \(3, 4, 4\)"),
    (np.zeros((1, 600, 3), np.uint8), "600x1 frame fitted into 32x32 is 32x0 pixels"),
])
def test_a_frame_that_cannot_be_prepared_is_refused_and_nothing_is_written(bad, what):
    out = torch.full((3, 32, 32), 7.0)
    with pytest.raises(InputError, match=what):
        prepare_frame(bad, out, "observation.images.top")
    with pytest.raises(InputError, match="observation.images.top"):
        check_frame(bad, out, "observation.images.top")
    assert (out == 7.0).all()


def test_a_buffer_that_is_no_image_buffer_is_refused():
    for out in (torch.zeros(3, 8, 8, dtype=torch.float64), torch.zeros(4, 8, 8), torch.zeros(8, 8)):
        with pytest.raises(ValueError, match=r"out: expected a float32 \[3, H, W\] tensor"):
            prepare_frame(frame(4, 4), out)


def test_without_cupy_the_kernel_is_missing_and_that_is_said_once(monkeypatch, caplog):
    monkeypatch.setattr(preprocess, "_kernel", None)
    monkeypatch.setitem(sys.modules, "cupy", None)          # import cupy raises ImportError
    with caplog.at_level(logging.WARNING, logger=preprocess.__name__):
        assert preprocess._cuda_kernel() is None
        assert preprocess._cuda_kernel() is None
    warnings = [r for r in caplog.records if "CuPy does not import" in r.getMessage()]
    assert len(warnings) == 1


# -- CUDA: the kernel against the reference ----------------------------------------------------------

gpu = pytest.mark.gpu


def _needs_cupy():
    if preprocess._cuda_kernel() is None:
        pytest.skip("CuPy does not import here: the kernel cannot run (the torch path serves CUDA)")


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = (a.float().cpu() - b.float().cpu()).abs().max().item()
    print(f"{what}: max |kernel - reference| {err:.3g}")
    assert err <= KERNEL_ATOL, f"{what}: max |diff| {err:.3g} > {KERNEL_ATOL}"


@gpu
@pytest.mark.parametrize("size,out_size", SIZES)
def test_the_kernel_equals_the_reference_on_cuda(size, out_size):
    _needs_cupy()
    rgb = frame(*size)
    kernel = torch.full((3, *out_size), 7.0, device="cuda")
    reference = torch.full((3, *out_size), 7.0, device="cuda")
    prepare_frame_cuda(rgb, kernel)
    prepare_frame_reference(rgb, reference)
    _close(kernel, reference, f"{size} -> {out_size}, host frame")
    cpu = torch.zeros(3, *out_size)
    prepare_frame_reference(rgb, cpu)
    _close(kernel, cpu, f"{size} -> {out_size}, against the CPU reference")
    assert prepare_path(rgb, kernel) == "cuda-kernel"
    prepare_frame(torch.from_numpy(rgb).cuda(), kernel)          # a frame already on the device
    _close(kernel, reference, f"{size} -> {out_size}, device frame")


@gpu
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_the_kernel_reads_a_messages_view_through_its_strides(encoding):
    _needs_cupy()
    view, src = views(frame(480, 640))[encoding]
    kernel = torch.zeros(3, 512, 512, device="cuda")
    reference = torch.zeros(3, 512, 512, device="cuda")
    prepare_frame(view, kernel)
    prepare_frame_reference(src, reference)
    _close(kernel, reference, f"{encoding} view")
    chw = torch.from_numpy(src).cuda().permute(2, 0, 1).contiguous()   # nvjpeg's layout
    prepare_frame(chw.permute(1, 2, 0), kernel)
    _close(kernel, reference, f"{encoding}, a CUDA [H, W, 3] view of [3, H, W]")


@gpu
def test_the_kernel_runs_on_torchs_current_stream():
    _needs_cupy()
    rgb = frame(480, 640)
    out = torch.zeros(3, 512, 512, device="cuda")
    expected = torch.zeros(3, 512, 512, device="cuda")
    prepare_frame_reference(rgb, expected)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)     # the stream is busy for a while
        out.fill_(7.0)                     # queued behind the sleep
        prepare_frame(rgb, out)            # on another stream it would run first, then be overwritten
    side.synchronize()
    _close(out, expected, "on a side stream")


@gpu
def test_without_cupy_cuda_takes_the_torch_path(monkeypatch):
    monkeypatch.setattr(preprocess, "_kernel", False)
    rgb = frame(480, 640)
    out = torch.zeros(3, 512, 512, device="cuda")
    assert prepare_path(rgb, out) == "torch"
    prepare_frame(rgb, out)
    expected = torch.zeros(3, 512, 512, device="cuda")
    prepare_frame_reference(rgb, expected)
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="needs CuPy"):
        prepare_frame_cuda(rgb, out)
