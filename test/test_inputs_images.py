"""Image messages -> uint8 [H, W, 3] RGB frames (flashrt_ros/inputs/images.py).

The messages are the real classes where they import: rclpy's sensor_msgs (data an array.array)
and rosbags' (data a numpy array, as a bag gives it); each test runs with both, skipping a kind
that does not import. Frames are compared by bytes with the RGB frame the message was made from.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from flashrt_ros.core.exceptions import InputError
from flashrt_ros.inputs import images
from flashrt_ros.inputs.images import (ENCODINGS, compressed_to_frame, image_to_frame, to_frame,
                                       to_compressed_msg_fields, to_image_msg_fields)

PIL = pytest.importorskip("PIL.Image")


def _rclpy_types():
    from sensor_msgs.msg import CompressedImage, Image
    return Image, CompressedImage


def _rosbags_types():
    from rosbags.typesys import Stores, get_typestore
    types = get_typestore(Stores.LATEST).types
    return types["sensor_msgs/msg/Image"], types["sensor_msgs/msg/CompressedImage"]


def _rosbags_header():
    from rosbags.typesys import Stores, get_typestore
    types = get_typestore(Stores.LATEST).types
    return types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=0, nanosec=0),
                                        frame_id="camera")


@pytest.fixture(params=["rclpy", "rosbags"])
def msgs(request):
    """(make_image(fields), make_compressed(format, data)) for one kind of message class."""
    try:
        Image, CompressedImage = (_rclpy_types if request.param == "rclpy" else _rosbags_types)()
    except ImportError as e:
        pytest.skip(f"{request.param} message classes do not import: {e}")
    if request.param == "rclpy":
        def image(height, width, encoding, step, data):
            return Image(height=height, width=width, encoding=encoding, step=step, data=data)

        def compressed(fmt, data):
            return CompressedImage(format=fmt, data=data)
    else:
        def image(height, width, encoding, step, data):
            return Image(header=_rosbags_header(), height=height, width=width, encoding=encoding,
                         is_bigendian=0, step=step, data=np.frombuffer(data, np.uint8).copy())

        def compressed(fmt, data):
            return CompressedImage(header=_rosbags_header(), format=fmt,
                                   data=np.frombuffer(data, np.uint8).copy())
    return image, compressed


def rgb(height=5, width=7, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)


def smooth(height=48, width=64) -> np.ndarray:
    """Gradients: JPEG keeps them within a few levels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1),
                     (x + y) * 255 // (width + height - 2)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
@pytest.mark.parametrize("pad", [0, 5])
def test_colour_encodings_give_the_rgb_frame_with_rows_padded_or_not(msgs, encoding, pad):
    image, _ = msgs
    frame = rgb()
    h, w, enc, step, data = to_image_msg_fields(frame, encoding, step=7 * ENCODINGS[encoding][0] + pad)
    assert (h, w, enc, len(data)) == (5, 7, encoding, step * 5)
    got = image_to_frame(image(h, w, enc, step, data))
    assert got.dtype == np.uint8 and got.shape == (5, 7, 3)
    assert got.tobytes() == frame.tobytes()


def test_mono8_repeats_its_channel_and_gives_a_grey_frame_back(msgs):
    image, _ = msgs
    grey = np.repeat(rgb()[..., :1], 3, axis=2)
    fields = to_image_msg_fields(grey, "mono8", step=9)
    assert fields[3] == 9 and len(fields[4]) == 45
    got = image_to_frame(image(*fields))
    assert got.tobytes() == grey.tobytes()
    # a colour frame goes out as BT.601 luma (OpenCV's RGB2GRAY): (R, G, B) = (255, 0, 0) -> 76
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert to_image_msg_fields(red, "mono8")[4] == bytes([76])


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_raw_frames_are_views_of_the_message_data(encoding):
    from array import array    # rclpy's uint8[]: the node's frames are never copied
    h, w, enc, step, data = to_image_msg_fields(rgb(), encoding, step=40)
    buf = array("B", data)
    got = image_to_frame(type("Msg", (), dict(height=h, width=w, encoding=enc, step=step,
                                              data=buf))())
    assert np.shares_memory(got, np.frombuffer(buf, np.uint8))
    assert got.flags.writeable        # torch takes it without a copy


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "16UC1", "yuv422", "32FC1", "rgb16", ""])
def test_other_encodings_are_refused_naming_them_and_the_accepted_ones(msgs, encoding):
    image, _ = msgs
    with pytest.raises(InputError) as e:
        image_to_frame(image(2, 2, encoding, 6, bytes(12)))
    assert repr(encoding) in str(e.value)
    assert all(name in str(e.value) for name in ENCODINGS)


def test_data_of_the_wrong_length_is_refused_with_expected_and_found(msgs):
    image, _ = msgs
    with pytest.raises(InputError, match=r"expected step \* height = 21 \* 5 = 105 .* found 104"):
        image_to_frame(image(5, 7, "rgb8", 21, bytes(104)))
    with pytest.raises(InputError, match=r"found 106"):
        image_to_frame(image(5, 7, "rgb8", 21, bytes(106)))
    with pytest.raises(InputError, match=r"step 20 is shorter than a row .*\(21 bytes\)"):
        image_to_frame(image(5, 7, "rgb8", 20, bytes(100)))
    with pytest.raises(InputError, match="positive height and width"):
        image_to_frame(image(0, 7, "rgb8", 21, b""))


@pytest.mark.parametrize("fmt", ["png", "rgb8; png compressed bgr8", "bgr8; png compressed bgr8",
                                 "PNG"])
def test_png_gives_the_frame_back_exactly(msgs, fmt):
    _, compressed = msgs
    frame = rgb(9, 11)
    out_fmt, data = to_compressed_msg_fields(frame, "png")
    assert out_fmt == "rgb8; png compressed bgr8"
    got = compressed_to_frame(compressed(fmt, data))
    assert got.dtype == np.uint8 and got.tobytes() == frame.tobytes()


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "mono8; jpeg compressed mono8",
                                 "jpg"])
def test_jpeg_decodes_to_the_frame_within_its_loss(msgs, fmt):
    _, compressed = msgs
    frame = smooth()
    _, data = to_compressed_msg_fields(frame, "jpeg", quality=95)
    got = to_frame(compressed(fmt, data))
    assert got.shape == frame.shape and got.dtype == np.uint8
    err = np.abs(got.astype(int) - frame.astype(int))
    assert err.mean() < 2 and err.max() <= 16, (err.mean(), err.max())


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_grey_palette_and_alpha_pngs_become_rgb(msgs, mode):
    _, compressed = msgs
    frame = rgb(6, 4)
    img = PIL.fromarray(frame).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    got = compressed_to_frame(compressed("png", buf.getvalue()))
    assert got.tobytes() == np.asarray(img.convert("RGB")).tobytes()


@pytest.mark.parametrize("fmt", ["16UC1; compressedDepth png", "tiff", "", "rgb8; webp compressed"])
def test_other_compressed_formats_are_refused(msgs, fmt):
    _, compressed = msgs
    with pytest.raises(InputError, match="expected jpeg or png"):
        compressed_to_frame(compressed(fmt, to_compressed_msg_fields(rgb(), "png")[1]))


def test_damaged_empty_16_bit_and_oversized_compressed_images_are_refused(msgs, monkeypatch):
    _, compressed = msgs
    png = to_compressed_msg_fields(rgb(), "png")[1]
    jpeg = to_compressed_msg_fields(smooth(), "jpeg")[1]
    with pytest.raises(InputError, match="expected jpeg data, found bytes"):
        compressed_to_frame(compressed("jpeg", png))          # the format lies
    with pytest.raises(InputError, match="found bytes Pillow cannot read"):
        compressed_to_frame(compressed("png", b"\x89PNG not really"))
    with pytest.raises(InputError, match="damaged"):
        compressed_to_frame(compressed("jpeg", jpeg[:-200]))
    with pytest.raises(InputError, match="found none"):
        compressed_to_frame(compressed("png", b""))
    buf = io.BytesIO()
    PIL.fromarray(np.full((4, 4), 60000, np.uint16)).save(buf, "PNG")
    with pytest.raises(InputError, match="8-bit"):
        compressed_to_frame(compressed("png", buf.getvalue()))
    monkeypatch.setattr(images, "MAX_PIXELS", 5 * 7 - 1)
    with pytest.raises(InputError, match="7x5 is larger than the 34 pixels"):
        compressed_to_frame(compressed("png", png))


def test_a_message_that_is_no_image_is_refused():
    with pytest.raises(InputError, match="expected a sensor_msgs/Image .* found JointState"):
        to_frame(type("JointState", (), {"position": [0.0]})())


def test_the_way_back_refuses_what_is_not_an_rgb_frame():
    with pytest.raises(InputError, match=r"expected a uint8 \[H, W, 3\] RGB array, found float64"):
        to_image_msg_fields(np.zeros((2, 2, 3)))
    with pytest.raises(InputError, match="encoding 'yuv422'"):
        to_image_msg_fields(rgb(), "yuv422")
    with pytest.raises(InputError, match="step 20: expected at least a row, 21 bytes"):
        to_image_msg_fields(rgb(), "rgb8", step=20)
    # a torch tensor is taken as well (a rendered frame on the GPU, say)
    assert to_image_msg_fields(torch.from_numpy(rgb()))[4] == rgb().tobytes()


@pytest.mark.gpu
def test_jpeg_decodes_on_cuda_through_nvjpeg_close_to_pillow():
    pytest.importorskip("torchvision", reason="nvjpeg decoding needs torchvision")
    frame = smooth(240, 320)
    fmt, data = to_compressed_msg_fields(frame, "jpeg", quality=95)
    msg = type("CompressedImage", (), {"format": fmt, "data": data})()
    on_gpu = compressed_to_frame(msg, device="cuda")
    on_cpu = compressed_to_frame(msg)
    assert isinstance(on_gpu, torch.Tensor) and on_gpu.is_cuda and on_gpu.dtype == torch.uint8
    assert tuple(on_gpu.shape) == frame.shape
    err = np.abs(on_gpu.cpu().numpy().astype(int) - on_cpu.astype(int))
    print(f"nvjpeg vs Pillow: mean |diff| {err.mean():.3f}, max {err.max()}")
    assert err.mean() < 1.5 and err.max() <= 16
