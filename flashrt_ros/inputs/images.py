"""ROS image messages -> uint8 [H, W, 3] RGB frames, and frames -> message fields.

Read by field names, so no ROS import: `sensor_msgs/Image` (height, width, encoding, step, data)
and `sensor_msgs/CompressedImage` (format, data), as rclpy or rosbags decode them.

Raw images (`image_to_frame`) are numpy views of `msg.data`, never copies: rgb8 as it lies, bgr8
with the channel axis reversed (stride -1), rgba8/bgra8 without the alpha byte, mono8 with its one
channel repeated (stride 0); rows advance by `step`, so row padding costs nothing. A view shares the
message's memory: it lives as long as the message, and nobody writes into it (it is writable only
where the data is, so that torch takes it without a copy). The byte order flag `is_bigendian`
means nothing for 8-bit channels and is not read. Other encodings are refused, naming them.

Compressed images (`compressed_to_frame`) are decoded with Pillow on the CPU (imported when first
needed), or with nvjpeg through `torchvision.io.decode_jpeg` when a CUDA device is asked for, the
image is a JPEG and torchvision imports; then the frame is a CUDA tensor (a [H, W, 3] view of the
decoder's [3, H, W] output). The format string is read as image_transport writes it: "jpeg",
"png", or "<encoding>; jpeg compressed <encoding>" (compressed_image_transport); compressedDepth
and other formats are refused.

The way back (`to_image_msg_fields`, `to_compressed_msg_fields`) gives the field values for the
simulated camera and the tests; the caller builds whichever message type it has.
"""
from __future__ import annotations

import io

import numpy as np

from flashrt_ros.core.exceptions import InputError

# encoding -> (bytes per pixel, byte offset of R, G, B within a pixel)
ENCODINGS = {"rgb8": (3, (0, 1, 2)), "bgr8": (3, (2, 1, 0)), "rgba8": (4, (0, 1, 2)),
             "bgra8": (4, (2, 1, 0)), "mono8": (1, (0, 0, 0))}
COMPRESSED_FORMATS = ("jpeg", "png")
# A compressed image larger than this (8K UHD) is refused from its header, before it is decoded.
MAX_PIXELS = 7680 * 4320
# ITU-R BT.601 luma in 14-bit fixed point, rounded, as OpenCV's RGB2GRAY (cv_bridge's mono8).
_LUMA = (4899, 9617, 1868)


def to_frame(msg, device=None):
    """A sensor_msgs/Image or CompressedImage -> uint8 [H, W, 3] RGB frame (see the module
    docstring); `device` only matters for compressed images (a CUDA device decodes JPEG there)."""
    if hasattr(msg, "encoding"):
        return image_to_frame(msg)
    if hasattr(msg, "format"):
        return compressed_to_frame(msg, device)
    raise InputError(f"expected a sensor_msgs/Image (fields height, width, encoding, step, data) "
                     f"or CompressedImage (format, data), found {type(msg).__name__}")


def image_to_frame(msg) -> np.ndarray:
    """sensor_msgs/Image -> uint8 [height, width, 3] RGB view of msg.data (no copy)."""
    encoding = str(msg.encoding).lower()
    if encoding not in ENCODINGS:
        raise InputError(f"image encoding {msg.encoding!r} is not accepted: expected one of "
                         f"{', '.join(ENCODINGS)}; publish one of those (e.g. an image_proc "
                         f"debayer or format conversion) or a CompressedImage")
    channels, (r, g, b) = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise InputError(f"image: expected a positive height and width, found {height}x{width}")
    if step < width * channels:
        raise InputError(f"image: step {step} is shorter than a row of {width} {encoding} pixels "
                         f"({width * channels} bytes); expected step >= width * {channels}")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * height:
        raise InputError(f"image: expected step * height = {step} * {height} = {step * height} "
                         f"bytes of data ({width}x{height} {encoding}), found {data.size}")
    return np.lib.stride_tricks.as_strided(data[r:], shape=(height, width, 3),
                                           strides=(step, channels, g - r),
                                           writeable=data.flags.writeable)


def compressed_format(fmt: str) -> str:
    """'jpeg' or 'png' from a CompressedImage format string, else InputError."""
    words = str(fmt).lower().replace(";", " ").split()
    if "compresseddepth" not in words:
        for kind in COMPRESSED_FORMATS:
            if kind in words or (kind == "jpeg" and "jpg" in words):
                return kind
    raise InputError(f"compressed image format {fmt!r} is not accepted: expected jpeg or png "
                     f"(e.g. 'jpeg', 'png', 'rgb8; jpeg compressed bgr8' as image_transport "
                     f"writes them); depth images (compressedDepth) are not a camera input")


def compressed_to_frame(msg, device=None):
    """sensor_msgs/CompressedImage -> uint8 [H, W, 3] RGB frame: a numpy array decoded by Pillow,
    or a CUDA tensor decoded by nvjpeg when `device` is CUDA, the image a JPEG and torchvision
    importable."""
    kind = compressed_format(msg.format)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise InputError(f"compressed image ({msg.format!r}): expected {kind} data, found none")
    if kind == "jpeg" and device is not None and str(device).startswith("cuda"):
        frame = _decode_jpeg_cuda(data, device)
        if frame is not None:
            return frame
    return _decode_pillow(data, kind, msg.format)


def _decode_pillow(data: np.ndarray, kind: str, fmt) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InputError("compressed images are decoded with Pillow, which is not installed: "
                         "pip install pillow (or apt install python3-pil)") from None
    try:
        img = Image.open(io.BytesIO(data), formats=[kind.upper()])
    except Image.DecompressionBombError as e:
        raise InputError(f"compressed image: larger than accepted ({e}); publish a smaller "
                         f"image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"compressed image ({fmt!r}): expected {kind} data, found bytes Pillow "
                         f"cannot read as {kind} ({e})") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise InputError(f"compressed image: {w}x{h} is larger than the {MAX_PIXELS} pixels "
                         f"accepted; publish a smaller image")
    if img.mode not in ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"):
        raise InputError(f"compressed image: expected an 8-bit colour or grey image, found "
                         f"Pillow mode {img.mode} (e.g. 16-bit); publish 8-bit frames")
    try:
        img = img.convert("RGB") if img.mode != "RGB" else img
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"compressed image ({fmt!r}): the {kind} data is damaged ({e})") from None
    return np.asarray(img)


def _decode_jpeg_cuda(data: np.ndarray, device):
    """nvjpeg via torchvision -> [H, W, 3] CUDA view, or None where torchvision is missing."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    src = torch.from_numpy(data if data.flags.writeable else data.copy())
    try:
        chw = decode_jpeg(src, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        raise InputError(f"compressed image: the jpeg data cannot be decoded ({e})") from None
    return chw.permute(1, 2, 0)


def _rgb_array(frame) -> np.ndarray:
    if hasattr(frame, "detach"):                      # a torch tensor, on any device
        frame = frame.detach().cpu().numpy()
    a = np.asarray(frame)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        raise InputError(f"frame: expected a uint8 [H, W, 3] RGB array, found {a.dtype} "
                         f"{list(a.shape)}")
    return a


def to_image_msg_fields(frame, encoding: str = "rgb8", step: int | None = None) -> tuple:
    """uint8 [H, W, 3] RGB frame -> (height, width, encoding, step, data bytes) of a
    sensor_msgs/Image; `step` longer than a row pads each row with zeros. mono8 is BT.601 luma
    (OpenCV's RGB2GRAY)."""
    a = _rgb_array(frame)
    if encoding not in ENCODINGS:
        raise InputError(f"encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")
    channels, order = ENCODINGS[encoding]
    height, width = a.shape[:2]
    if encoding == "mono8":
        luma = a.astype(np.uint32) @ np.array(_LUMA, dtype=np.uint32)
        pixels = ((luma + (1 << 13)) >> 14).astype(np.uint8)[..., None]
    else:
        pixels = np.full((height, width, channels), 255, dtype=np.uint8)   # alpha: opaque
        pixels[..., list(order)] = a
    row = width * channels
    step = row if step is None else int(step)
    if step < row:
        raise InputError(f"step {step}: expected at least a row, {row} bytes")
    rows = np.zeros((height, step), dtype=np.uint8)
    rows[:, :row] = pixels.reshape(height, row)
    return height, width, encoding, step, rows.tobytes()


def to_compressed_msg_fields(frame, kind: str = "jpeg", quality: int = 90) -> tuple:
    """uint8 [H, W, 3] RGB frame -> (format, data bytes) of a sensor_msgs/CompressedImage, the
    format written as compressed_image_transport writes it for an rgb8 image."""
    from PIL import Image
    if kind not in COMPRESSED_FORMATS:
        raise InputError(f"compressed format {kind!r}: expected one of {COMPRESSED_FORMATS}")
    buf = io.BytesIO()
    options = {"quality": int(quality)} if kind == "jpeg" else {}
    Image.fromarray(np.ascontiguousarray(_rgb_array(frame))).save(buf, kind.upper(), **options)
    return f"rgb8; {kind} compressed bgr8", buf.getvalue()
