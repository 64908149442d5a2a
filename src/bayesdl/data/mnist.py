"""MNIST from its IDX files, and the distribution shifts used to test hand-over.

The IDX format (LeCun et al.) stores one array: a 4-byte magic number ``0x00 0x00 <dtype>
<ndim>``, then ``ndim`` big-endian ``uint32`` sizes, then the values in row-major order. MNIST
uses ``dtype = 0x08`` (unsigned bytes): images are ``ndim = 3`` ``(N, rows, cols)`` and labels
``ndim = 1`` ``(N,)``. The files may be gzip-compressed; :func:`load_mnist_idx` tells the two
apart by the gzip magic bytes, not by the file name.

The shifts take and return image batches ``(N, 1, H, W)`` with values in ``[0, 1]`` (the range of
:func:`load_mnist_idx`); the random one (:func:`gaussian_noise`) draws from an explicit
``torch.Generator``.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MNISTFormatError",
    "blur",
    "contrast",
    "gaussian_kernel",
    "gaussian_noise",
    "load_mnist",
    "load_mnist_idx",
    "rotate",
]

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08
_IMAGES_NDIM = 3
_LABELS_NDIM = 1
#: File names of the two parts of MNIST (as distributed, gzip-compressed).
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_WHERE = (
    "MNIST is distributed as four IDX files, e.g. from https://yann.lecun.com/exdb/mnist/ or "
    "the mirror https://ossci-datasets.s3.amazonaws.com/mnist/"
)


class MNISTFormatError(ValueError):
    """An IDX file is malformed: wrong magic number, sizes or length (the message names it)."""


# ----------------------------------------------------------------------------- IDX files
def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise MNISTFormatError(
            f"{path}: starts with the gzip magic bytes but does not decompress ({err}); the "
            "file is truncated or corrupt. Download it again."
        ) from None


def _read_idx(path: Path, ndim: int, what: str) -> np.ndarray:
    """The ``uint8`` array of one IDX file of ``ndim`` axes, every header field checked."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise MNISTFormatError(
            f"{path}: {len(data)} bytes, too short for an IDX header (4-byte magic number)."
        )
    zero, dtype, got_ndim = data[:2], data[2], data[3]
    expected_magic = 0x0800 | ndim
    if zero != b"\x00\x00" or dtype != _UBYTE or got_ndim != ndim:
        raise MNISTFormatError(
            f"{path}: magic number 0x{int.from_bytes(data[:4], 'big'):08x}, expected "
            f"0x{expected_magic:08x} for an IDX file of {what} (unsigned bytes, {ndim} "
            f"ax{'es' if ndim > 1 else 'is'}). Is this the right file (images vs labels)?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTFormatError(
            f"{path}: {len(data)} bytes, too short for the IDX header of {header} bytes "
            f"({ndim} sizes); the file is truncated."
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in dims):
        raise MNISTFormatError(f"{path}: the header gives sizes {dims}; none may be 0.")
    expected = header + math.prod(dims)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "followed by extra bytes"
        raise MNISTFormatError(
            f"{path}: the header gives sizes {dims}, so the file must hold {expected} bytes "
            f"(uncompressed), but it holds {len(data)}: it is {state}. Download it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(images_path: str | Path, labels_path: str | Path) -> tuple[Tensor, Tensor]:
    """Read an images file and a labels file in the IDX format (gzip or plain).

    Parameters
    ----------
    images_path:
        IDX file of ``uint8`` images, ``(N, H, W)`` (magic number ``0x00000803``); MNIST's are
        28 x 28.
    labels_path:
        IDX file of ``uint8`` labels, ``(N,)`` (magic number ``0x00000801``).

    Returns
    -------
    x:
        ``float32`` images ``(N, 1, H, W)``, pixel values divided by 255 (so in ``[0, 1]``).
    y:
        ``int64`` labels ``(N,)``.

    Raises
    ------
    FileNotFoundError
        A file does not exist.
    MNISTFormatError
        (a ``ValueError``) A file has the wrong magic number, a size of zero, a length that does
        not match its header, or the two files hold different numbers of examples. The message
        names the file.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file. {_WHERE}.")
    images = _read_idx(images_path, _IMAGES_NDIM, "images")
    labels = _read_idx(labels_path, _LABELS_NDIM, "labels")
    if len(images) != len(labels):
        raise MNISTFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; they must be the two files of one part of the data set."
        )
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist(folder: str | Path, part: str = "test") -> tuple[Tensor, Tensor]:
    """MNIST from a folder that holds its IDX files under their usual names.

    Parameters
    ----------
    folder:
        The folder with ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (for
        ``part="test"``) or ``train-images-idx3-ubyte.gz`` and ``train-labels-idx1-ubyte.gz``
        (``part="train"``). A file may also be stored uncompressed, without the ``.gz``.
    part:
        ``"test"`` (10,000 images, default) or ``"train"`` (60,000).

    Returns
    -------
    ``(x, y)``: ``float32`` images ``(N, 1, 28, 28)`` in ``[0, 1]`` and ``int64`` labels ``(N,)``;
    see :func:`load_mnist_idx`.

    Raises
    ------
    FileNotFoundError
        A file is missing (the message says which, and where to get MNIST).
    """
    if part not in FILES:
        raise ValueError(f"part must be one of {sorted(FILES)}, got {part!r}.")
    folder = Path(folder)
    paths = []
    for name in FILES[part]:
        path = folder / name
        if not path.is_file() and (folder / name.removesuffix(".gz")).is_file():
            path = folder / name.removesuffix(".gz")
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file (nor {name.removesuffix('.gz')} uncompressed). "
                f"load_mnist needs {' and '.join(FILES[part])} in {folder}. {_WHERE}."
            )
        paths.append(path)
    return load_mnist_idx(*paths)


# ----------------------------------------------------------------------------- shifts
def _check_images(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, 1, H, W), got {type(x).__name__}.")
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor of images (N, C, H, W), got shape "
            f"{tuple(x.shape)} and dtype {x.dtype}. For one image use x[None]."
        )
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"{name} must hold values in [0, 1] (as load_mnist_idx returns them), got the range "
            f"[{float(x.min()):.4g}, {float(x.max()):.4g}]."
        )


def _check_number(value: float, name: str, low: float, high: float, closed_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    value = float(value)
    ok_low = value >= low if closed_low else value > low
    if not (ok_low and value <= high and math.isfinite(value)):
        interval = f"{'[' if closed_low else '('}{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
    return value


def rotate(x: Tensor, degrees: float) -> Tensor:
    """Rotate every image about its centre by ``degrees``, counter-clockwise as displayed.

    Bilinear interpolation (``affine_grid`` + ``grid_sample``); pixels that come from outside
    the image are 0 (MNIST's black background). The rotation is a true rotation in pixel units
    also for non-square images. Rotations by multiples of 90 degrees of a square image move
    pixel centres onto pixel centres, so they only permute pixels (up to rounding).

    Parameters
    ----------
    x:
        Images ``(N, C, H, W)`` in ``[0, 1]``.
    degrees:
        Angle in degrees (any finite number; positive turns counter-clockwise).

    Returns
    -------
    Rotated images ``(N, C, H, W)`` in ``[0, 1]``, same dtype and device.
    """
    _check_images(x)
    degrees = _check_number(degrees, "degrees", -math.inf, math.inf, closed_low=True)
    n, _, h, w = x.shape
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    # Output pixel p (x right, y down, from the centre) samples the input at R p, with R the
    # inverse of the counter-clockwise turn as displayed; in grid_sample's normalised
    # coordinates (each axis scaled to [-1, 1]) the off-diagonal terms pick up the aspect ratio.
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.to(x.device).expand(n, 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0.0, 1.0)


def gaussian_noise(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """Add independent ``N(0, std^2)`` noise to every pixel, then clamp to ``[0, 1]``.

    Parameters
    ----------
    x:
        Images ``(N, C, H, W)`` in ``[0, 1]``.
    std:
        Standard deviation of the noise, ``>= 0`` (0 returns a copy of ``x``).
    generator:
        Source of the noise (on ``x``'s device); the same seed gives the same images.
        ``None`` uses torch's global generator.

    Returns
    -------
    Noisy images ``(N, C, H, W)`` in ``[0, 1]``.
    """
    _check_images(x)
    std = _check_number(std, "std", 0.0, math.inf, closed_low=True)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + std * noise).clamp_(0.0, 1.0)


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 1-d Gaussian kernel ``(2r + 1,)`` with radius ``r = ceil(3 sigma)``.

    ``sigma = 0`` gives the identity kernel ``[1]``.
    """
    sigma = _check_number(sigma, "sigma", 0.0, math.inf, closed_low=True)
    if sigma == 0.0:
        return torch.ones(1, dtype=dtype)
    radius = math.ceil(3.0 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of standard deviation ``sigma`` pixels: one separable kernel
    (:func:`gaussian_kernel`) applied along rows and then columns with ``conv2d``.

    The border is padded by repeating the edge pixels, so a constant image stays constant (the
    kernel sums to one) and the blurred values stay in ``[0, 1]``.

    Parameters
    ----------
    x:
        Images ``(N, C, H, W)`` in ``[0, 1]``.
    sigma:
        Standard deviation in pixels, ``>= 0`` (0 returns a copy of ``x``).

    Returns
    -------
    Blurred images ``(N, C, H, W)`` in ``[0, 1]``.
    """
    _check_images(x)
    kernel = gaussian_kernel(sigma, x.dtype).to(x.device)
    n, c, h, w = x.shape
    r = (len(kernel) - 1) // 2
    flat = x.reshape(n * c, 1, h, w)
    flat = F.pad(flat, (r, r, r, r), mode="replicate") if r else flat
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1))  # along rows (width)
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1))  # along columns (height)
    return flat.reshape(n, c, h, w).clamp_(0.0, 1.0)


def contrast(x: Tensor, factor: float) -> Tensor:
    """Lower the contrast: move every pixel toward its image's mean grey,
    ``mean + factor * (x - mean)``, with the mean over each image's pixels (and channels).

    The mean of every image is kept and its standard deviation is multiplied by ``factor``;
    values stay in ``[0, 1]`` (each is a convex combination of a pixel and the mean).

    Parameters
    ----------
    x:
        Images ``(N, C, H, W)`` in ``[0, 1]``.
    factor:
        In ``(0, 1]``; 1 returns a copy of ``x``, smaller values give flatter images.

    Returns
    -------
    Images ``(N, C, H, W)`` in ``[0, 1]``.
    """
    _check_images(x)
    factor = _check_number(factor, "factor", 0.0, 1.0, closed_low=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + factor * (x - mean)).clamp_(0.0, 1.0)
