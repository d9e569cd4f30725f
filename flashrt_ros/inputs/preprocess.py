"""A camera frame -> the policy's image buffer, as LeRobot prepares it for SmolVLA.

LeRobot's preparation: the uint8 frame / 255, resized bilinearly to fit the policy's size
(align_corners=False, no antialias), padded with 0 on the left and top, then `* 2 - 1`. The result
is written into `out`, a float32 [3, S_h, S_w] buffer the captured plans read (`io.pixels[i]`).

Two paths compute it:

* `prepare_frame_reference`: the torch operations themselves (`processor_smolvla.to_unit_image`
  and `resize_with_pad`), on `out`'s device; a host frame goes there as uint8. On the CPU this is
  the path that runs, and it is what `SmolVLAPolicy.load_batch` computed inline before it called
  `prepare_frame`, bit for bit. It also takes a float [3, H, W] image in [0, 1] (a dataset's).
* `prepare_frame_cuda`: one CuPy RawKernel from the uint8 [H, W, 3] frame to the normalised,
  padded [3, S_h, S_w] buffer in one pass, writing into `out` directly, on torch's current stream.
  A host frame is uploaded once, as the uint8 bytes its view spans (no host copy: a bgr8 view
  with reversed channels or a mono8 view with a repeated channel is read through its strides).
  It computes what torch's CUDA bilinear kernel computes, in the same order; held to the
  reference by test_inputs_preprocess.py (marker gpu) within KERNEL_ATOL.

`prepare_frame` takes the kernel where `out` is on CUDA, the frame is uint8 [H, W, 3], `out` is a
contiguous float32 buffer and CuPy imports; otherwise the reference (a warning, once, where CuPy
is missing on CUDA). `check_frame` refuses a frame that cannot be prepared, before anything is
written, so a caller can check every camera first.

`prepared_counts()` says how many frames each path prepared in this process ('cuda-kernel',
'torch'): how a test or a benchmark knows which path a runtime's frames took (a node on CUDA
prepares every uint8 frame with the kernel straight into its static image buffer).

Concurrency: the functions keep no state but the compiled kernel, created once under a lock, and
the counts, added to under their own lock; two threads may prepare frames into different buffers
at once.
"""
from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from flashrt_ros.core.exceptions import InputError
from flashrt_ros.core.models.smolvla.processor_smolvla import resize_with_pad, to_unit_image

# |kernel - reference| per value (values in [-1, 1]): both compute in float32 with the same
# operations; the compilers may fuse a multiply-add differently (a few ulp of 1.0 = 1.2e-7).
KERNEL_ATOL = 1e-6

log = logging.getLogger(__name__)

KERNEL_SOURCE = r"""
extern "C" __global__ void prepare_frame(
        const unsigned char* src, long long s_y, long long s_x, long long s_c,
        int in_h, int in_w, float scale_h, float scale_w,
        float* out, int out_h, int out_w, int h, int w) {
    // one thread per output pixel, all three channels; src points at pixel (0, 0), channel R
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= out_w || y >= out_h) return;
    long long plane = (long long)out_h * out_w;
    float* o = out + (long long)y * out_w + x;
    int top = out_h - h, left = out_w - w;            // the padding: 0 in [0, 1], -1 after * 2 - 1
    if (y < top || x < left) {
        o[0] = -1.0f; o[plane] = -1.0f; o[2 * plane] = -1.0f;
        return;
    }
    // torch's upsample_bilinear2d (align_corners=False): area_pixel_compute_source_index
    float ry = scale_h * ((float)(y - top) + 0.5f) - 0.5f;
    float rx = scale_w * ((float)(x - left) + 0.5f) - 0.5f;
    ry = ry < 0.0f ? 0.0f : ry;
    rx = rx < 0.0f ? 0.0f : rx;
    int y0 = (int)ry, x0 = (int)rx;
    int dy = y0 < in_h - 1 ? 1 : 0, dx = x0 < in_w - 1 ? 1 : 0;
    float ly1 = ry - (float)y0, lx1 = rx - (float)x0;
    float ly0 = 1.0f - ly1, lx0 = 1.0f - lx1;
    const unsigned char* p00 = src + y0 * s_y + x0 * s_x;
    const unsigned char* p01 = p00 + dx * s_x;
    const unsigned char* p10 = p00 + dy * s_y;
    const unsigned char* p11 = p10 + dx * s_x;
    const float inv255 = 1.0f / 255.0f;                // torch divides by a scalar this way on CUDA
    #pragma unroll
    for (int c = 0; c < 3; ++c) {
        long long k = c * s_c;
        float v00 = (float)p00[k] * inv255, v01 = (float)p01[k] * inv255;
        float v10 = (float)p10[k] * inv255, v11 = (float)p11[k] * inv255;
        float v = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11);
        o[c * plane] = v * 2.0f - 1.0f;
    }
}
"""
BLOCK = (32, 8, 1)

_kernel_lock = threading.Lock()
_kernel = None            # the cupy.RawKernel, or False once CuPy failed to import
_counts_lock = threading.Lock()
_counts = {"cuda-kernel": 0, "torch": 0}     # frames prepared by each path, in this process


def check_frame(frame, out: torch.Tensor, key: str = "frame"):
    """Refuse what `prepare_frame(frame, out)` cannot prepare (InputError, naming `key`); returns
    the frame as an array or tensor. Accepted: a uint8 [H, W, 3] frame, or a float [3, H, W] image
    in [0, 1], as a numpy array or a torch tensor on any device."""
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != 3 \
            or out.dtype != torch.float32:
        raise ValueError(f"out: expected a float32 [3, H, W] tensor (the policy's image buffer), "
                         f"found {getattr(out, 'dtype', type(out).__name__)} "
                         f"{list(getattr(out, 'shape', []))}")
    f = frame if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if is_hwc_uint8(f):
        in_h, in_w = f.shape[:2]
    elif f.ndim == 3 and f.shape[0] == 3 and _is_float(f):
        in_h, in_w = f.shape[1:]
    else:
        raise InputError(f"{key}: expected a float [3, H, W] image in [0, 1] or a uint8 [H, W, 3] "
                         f"frame, found {f.dtype} {tuple(f.shape)}")
    h, w = fitted_size(in_h, in_w, *out.shape[1:])
    if h < 1 or w < 1:
        raise InputError(f"{key}: a {in_w}x{in_h} frame fitted into {out.shape[2]}x{out.shape[1]} "
                         f"is {w}x{h} pixels; expected a frame whose sides give at least one "
                         f"pixel each (crop it nearer to the policy's aspect ratio)")
    return f


def prepare_frame(frame, out: torch.Tensor, key: str = "frame") -> None:
    """Write LeRobot's preparation of `frame` into `out` (float32 [3, S_h, S_w]): the CuPy kernel
    where it applies, else the torch reference (see the module docstring)."""
    f = check_frame(frame, out, key)
    if _kernel_applies(f, out) and _cuda_kernel() is not None:
        _launch(f, out)
    else:
        prepare_frame_reference(f, out, key)


def prepare_path(frame, out: torch.Tensor) -> str:
    """Which path `prepare_frame(frame, out)` takes: 'cuda-kernel' or 'torch'."""
    f = frame if isinstance(frame, torch.Tensor) else np.asarray(frame)
    return "cuda-kernel" if _kernel_applies(f, out) and _cuda_kernel() is not None else "torch"


def prepared_counts() -> dict:
    """{'cuda-kernel': n, 'torch': m}: the frames each path prepared in this process so far."""
    with _counts_lock:
        return dict(_counts)


def _counted(path: str) -> None:
    with _counts_lock:
        _counts[path] += 1


def prepare_frame_reference(frame, out: torch.Tensor, key: str = "frame") -> None:
    """The torch operations LeRobot runs, on `out`'s device, written into `out`."""
    f = check_frame(frame, out, key)
    if is_hwc_uint8(f):      # contiguous [H, W, 3] first: a view and its copy give the same bits
        t = f.contiguous() if isinstance(f, torch.Tensor) else torch.from_numpy(_host_array(f))
    else:
        t = f if isinstance(f, torch.Tensor) else torch.as_tensor(f)
    height, width = out.shape[1:]
    out.copy_(resize_with_pad(to_unit_image(t.to(out.device), key), width, height) * 2.0 - 1.0)
    _counted("torch")


def prepare_frame_cuda(frame, out: torch.Tensor, key: str = "frame") -> None:
    """The CuPy kernel: a uint8 [H, W, 3] frame (host or CUDA) -> `out` (contiguous float32 on
    CUDA). Raises RuntimeError where CuPy does not import."""
    f = check_frame(frame, out, key)
    if not _kernel_applies(f, out):
        raise ValueError(f"{key}: the kernel takes a uint8 [H, W, 3] frame into a contiguous "
                         f"float32 CUDA buffer; found {f.dtype} {tuple(f.shape)} into "
                         f"{out.dtype} on {out.device}")
    if _cuda_kernel() is None:
        raise RuntimeError("prepare_frame_cuda needs CuPy (the package's gpu extra: "
                           "pip install cupy-cuda13x, or the build for your CUDA)")
    _launch(f, out)


def fitted_size(in_h: int, in_w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """(h, w) of a frame resized to fit (out_h, out_w) keeping its aspect, as resize_with_pad."""
    ratio = max(in_w / out_w, in_h / out_h)
    return int(in_h / ratio), int(in_w / ratio)


def is_hwc_uint8(f) -> bool:
    uint8 = torch.uint8 if isinstance(f, torch.Tensor) else np.uint8
    return f.dtype == uint8 and f.ndim == 3 and f.shape[2] == 3


def _is_float(f) -> bool:
    return f.is_floating_point() if isinstance(f, torch.Tensor) else \
        np.issubdtype(f.dtype, np.floating)


def _host_array(a: np.ndarray) -> np.ndarray:
    """A contiguous, writable copy where `a` is neither (torch takes it without a copy else)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


def _kernel_applies(f, out: torch.Tensor) -> bool:
    return (out.is_cuda and out.dtype == torch.float32 and out.is_contiguous()
            and is_hwc_uint8(f) and (not isinstance(f, torch.Tensor) or not f.is_cuda
                                     or f.device == out.device))


def _cuda_kernel():
    """The compiled RawKernel, or None where CuPy does not import (warned once)."""
    global _kernel
    if _kernel is None:
        with _kernel_lock:
            if _kernel is None:
                try:
                    import cupy
                    _kernel = cupy.RawKernel(KERNEL_SOURCE, "prepare_frame")
                except ImportError as e:
                    log.warning("CuPy does not import (%s): camera frames are prepared with the "
                                "torch path on CUDA (install the package's gpu extra for the "
                                "one-pass kernel)", e)
                    _kernel = False
    return _kernel or None


def _launch(f, out: torch.Tensor) -> None:
    """Upload a host frame's bytes (if host) and run the kernel on torch's current stream."""
    import cupy
    stream = torch.cuda.current_stream(out.device)
    in_h, in_w = f.shape[:2]
    if isinstance(f, torch.Tensor) and f.is_cuda:
        src, strides, keep = f.data_ptr(), f.stride(), f
    else:
        a = f.numpy() if isinstance(f, torch.Tensor) else f
        keep, first, strides = _upload(a, out.device, stream.cuda_stream)
        src = keep.data_ptr() + first
    h, w = fitted_size(in_h, in_w, *out.shape[1:])
    out_h, out_w = out.shape[1:]
    grid = ((out_w + BLOCK[0] - 1) // BLOCK[0], (out_h + BLOCK[1] - 1) // BLOCK[1], 1)
    args = (np.uint64(src), *(np.int64(s) for s in strides), np.int32(in_h), np.int32(in_w),
            np.float32(in_h) / np.float32(h), np.float32(in_w) / np.float32(w),   # torch's scales
            np.uint64(out.data_ptr()), np.int32(out_h), np.int32(out_w), np.int32(h), np.int32(w))
    with cupy.cuda.Device(out.device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        _cuda_kernel()(grid, BLOCK, args)
    _counted("cuda-kernel")
    del keep       # torch's allocator reuses the upload only for work queued after the kernel


def _upload(a: np.ndarray, device, stream_ptr: int):
    """The bytes the uint8 view `a` spans -> a CUDA uint8 tensor, queued on `stream_ptr`; returns
    (tensor, offset of a[0, 0, 0] in it, a's strides). cudaMemcpyAsync from pageable memory
    returns once the bytes are staged, so the host view may go as soon as this returns."""
    import cupy
    host, size, first = byte_span(a)
    buf = torch.empty(size, dtype=torch.uint8, device=device)
    cupy.cuda.runtime.memcpyAsync(buf.data_ptr(), host, size,
                                  cupy.cuda.runtime.memcpyHostToDevice, stream_ptr)
    return buf, first, a.strides


def byte_span(a: np.ndarray) -> tuple[int, int, int]:
    """(address of the lowest byte, number of bytes, offset of a[0, ..., 0] from that byte) of
    the memory a uint8 view reaches through its strides (negative and zero strides included)."""
    low = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
    high = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0)
    return a.__array_interface__["data"][0] + low, high - low + 1, -low
