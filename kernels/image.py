"""Images: uint8 NHWC batches to normalized float32 NCHW in one fused pass.

For every output element ``out[n, c, y, x]`` the kernel reads the input pixel (or interpolates four of them), then
computes ``(v * scale - mean[c]) / std[c]`` in float32. The geometry (resize, then center crop) is precomputed by
:class:`ImageSpec` into small index and weight tables that both implementations share, so the Numba kernel and the
numpy reference do the same float32 operations in the same order.

**Resize convention** (``resize``): bilinear with *half-pixel centers*, as OpenCV's ``cv2.resize(...,
interpolation=INTER_LINEAR)``: the source coordinate of output pixel ``d`` is ``(d + 0.5) * in / out - 0.5``, its
integer part clamped to ``[0, in - 1]`` with zero weight on the missing neighbour at the edges, and no antialiasing
when shrinking. Values interpolate as ``top + wy * (bottom - top)`` with ``top = p00 + wx * (p01 - p00)`` (flat
regions stay exact). Ferry computes in float32 where OpenCV uses 11-bit fixed point for uint8 images, so
values may differ from OpenCV's by about one grey level; positions and clamping are the same.

**Crop** (``crop``): a centered window of the (resized) image, top-left corner at ``((h - ch) // 2, (w - cw) // 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ferry.kernels import frozen

CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True, slots=True, eq=False)
class ImageSpec:
    """Everything the image kernel needs, validated and precomputed once per model.

    ``height``, ``width``, ``channels``: the input images; ``resize`` (h, w) or None; ``crop`` (h, w) or None;
    ``src_channel[c]``: the input channel that becomes output channel ``c`` (reversed for RGB <-> BGR)."""

    height: int
    width: int
    channels: int
    resize: tuple[int, int] | None
    crop: tuple[int, int] | None
    scale: np.float32
    mean: np.ndarray  # float32 [channels], in output channel order
    std: np.ndarray  # float32 [channels], in output channel order
    src_channel: np.ndarray  # int64 [channels]
    # Row and column tables, one entry per output row / column: the two source indices (int64) and the float32
    # weight of the second one.
    rows: tuple[np.ndarray, np.ndarray, np.ndarray]
    cols: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def build(
        cls,
        height: int,
        width: int,
        channels: int = 3,
        *,
        resize: tuple[int, int] | None = None,
        crop: tuple[int, int] | None = None,
        scale: float = 1.0,
        mean: np.ndarray | list[float] | float | None = None,
        std: np.ndarray | list[float] | float | None = None,
        input_order: str = "RGB",
        output_order: str = "RGB",
    ) -> ImageSpec:
        """Validate the parameters (``ValueError`` names the first bad one) and precompute the tables."""
        if min(height, width, channels) < 1:
            raise ValueError(f"height, width and channels must be >= 1, got {height}, {width}, {channels}")
        if resize is not None and min(resize) < 1:
            raise ValueError(f"resize must be positive, got {list(resize)}")
        if resize is not None and tuple(resize) == (height, width):
            resize = None  # identity: take the exact path
        size = resize or (height, width)
        if crop is not None and not (1 <= crop[0] <= size[0] and 1 <= crop[1] <= size[1]):
            raise ValueError(f"crop {list(crop)} does not fit in the {'resized ' if resize else ''}size {list(size)}")
        for name, order in (("input_order", input_order), ("output_order", output_order)):
            if order not in CHANNEL_ORDERS:
                raise ValueError(f"{name} must be one of {list(CHANNEL_ORDERS)}, got {order!r}")
        if input_order != output_order and channels != 3:
            raise ValueError(f"reordering channels ({input_order} -> {output_order}) needs 3 channels, not {channels}")
        mean32 = _per_channel(mean, 0.0, channels, "mean")
        std32 = _per_channel(std, 1.0, channels, "std")
        if not (np.isfinite(std32).all() and (std32 > 0).all()):
            raise ValueError(f"std must be finite and > 0, got {std32.tolist()}")
        if not (np.isfinite(mean32).all() and np.isfinite(scale)):
            raise ValueError("mean and scale must be finite")
        out_h, out_w = crop or size
        top, left = (size[0] - out_h) // 2, (size[1] - out_w) // 2
        src = np.arange(channels, dtype=np.int64)
        return cls(
            height,
            width,
            channels,
            None if resize is None else (int(resize[0]), int(resize[1])),
            None if crop is None else (int(crop[0]), int(crop[1])),
            np.float32(scale),
            mean32,
            std32,
            src[::-1].copy() if input_order != output_order else src,
            _axis_table(height, size[0], top, out_h),
            _axis_table(width, size[1], left, out_w),
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image as the client sends it: (height, width, channels)."""
        return (self.height, self.width, self.channels)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """One image as the graph gets it: (channels, height, width)."""
        return (self.channels, len(self.rows[0]), len(self.cols[0]))


def _per_channel(
    values: np.ndarray | list[float] | float | None, default: float, channels: int, name: str
) -> np.ndarray:
    if values is None or np.ndim(values) == 0:  # one number for every channel
        return np.full(channels, default if values is None else values, dtype=np.float32)
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size != channels:
        raise ValueError(f"{name} has {array.size} values for {channels} channels")
    return array


def _axis_table(
    size_in: int, size_resized: int, offset: int, size_out: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 along one axis for output positions offset..offset+size_out of
    an axis resized from size_in to size_resized, with OpenCV INTER_LINEAR's half-pixel centers and edge clamp."""
    d = np.arange(offset, offset + size_out, dtype=np.float64)
    if size_in == size_resized:  # no resize along this axis: an exact copy of the cropped window
        i0 = d.astype(np.int64)
        frac = np.zeros(size_out)
    else:
        f = (d + 0.5) * (size_in / size_resized) - 0.5
        i0 = np.floor(f).astype(np.int64)
        frac = f - i0
        low, high = i0 < 0, i0 >= size_in - 1
        frac[low | high] = 0.0
        i0[low] = 0
        i0[high] = size_in - 1
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, frac.astype(np.float32)


def image_to_nchw_ref(images: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """The numpy reference: uint8 [N, H, W, C] -> float32 [N, C, h, w]."""
    y0, y1, wy = spec.rows
    x0, x1, wx = spec.cols
    x = images if spec.src_channel[0] == 0 else images[..., ::-1]
    if spec.resize is None:  # the idiomatic numpy: slice the window, convert, normalize, transpose
        v = x[:, y0[0] : y0[0] + len(y0), x0[0] : x0[0] + len(x0)].astype(np.float32)
    else:
        wy, wx = wy[None, :, None, None], wx[None, None, :, None]
        upper, lower = x[:, y0].astype(np.float32), x[:, y1].astype(np.float32)
        top = upper[:, :, x0] + wx * (upper[:, :, x1] - upper[:, :, x0])
        bottom = lower[:, :, x0] + wx * (lower[:, :, x1] - lower[:, :, x0])
        v = top + wy * (bottom - top)
    v = (v * spec.scale - spec.mean) / spec.std
    return np.ascontiguousarray(v.transpose(0, 3, 1, 2))


def image_to_nchw(images: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """The Numba kernel (same contract as :func:`image_to_nchw_ref`); releases the GIL while it runs."""
    images = frozen(images)
    out = np.empty((images.shape[0], *spec.output_shape), dtype=np.float32)
    if spec.resize is None:
        _copy_normalize(images, spec.rows[0], spec.cols[0], spec.src_channel, spec.scale, spec.mean, spec.std, out)
    else:
        _bilinear_normalize(images, *spec.rows, *spec.cols, spec.src_channel, spec.scale, spec.mean, spec.std, out)
    return out


# Without resize every output value is one of 256 per channel: the kernel computes them once per call, with the
# reference's float32 operations, and the pass becomes a table lookup (bit for bit the reference's result). Serial:
# prange over images was slower on 2 shared cores than one thread (see BENCHMARKS.md), and the server runs one
# batch per executor thread anyway.
@numba.njit(cache=True, nogil=True, error_model="numpy")
def _copy_normalize(images, ys, xs, src, scale, mean, std, out):
    n_images, channels, out_h, out_w = out.shape
    table = np.empty((channels, 256), dtype=np.float32)
    for c in range(channels):
        for p in range(256):
            table[c, p] = (np.float32(p) * scale - mean[c]) / std[c]
    left = xs[0]
    for n in range(n_images):
        for c in range(channels):
            values = table[c]
            for y in range(out_h):
                row = images[n, ys[y], left : left + out_w, src[c]]
                dst = out[n, c, y]
                for x in range(out_w):
                    dst[x] = values[row[x]]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _bilinear_normalize(images, y0, y1, wy, x0, x1, wx, src, scale, mean, std, out):
    n_images, channels, out_h, out_w = out.shape
    for n in range(n_images):
        for c in range(channels):
            sc = src[c]
            m = mean[c]
            s = std[c]
            for y in range(out_h):
                r0 = images[n, y0[y]]
                r1 = images[n, y1[y]]
                b = wy[y]
                for x in range(out_w):
                    i = x0[x]
                    j = x1[x]
                    a = wx[x]
                    p = np.float32(r0[i, sc])
                    top = p + a * (np.float32(r0[j, sc]) - p)
                    q = np.float32(r1[i, sc])
                    bottom = q + a * (np.float32(r1[j, sc]) - q)
                    out[n, c, y, x] = ((top + b * (bottom - top)) * scale - m) / s
