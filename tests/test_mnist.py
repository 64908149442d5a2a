"""MNIST IDX loading (golden files written here byte by byte) and the image shifts."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesdl.data.mnist import (
    MNISTFormatError,
    blur,
    contrast,
    gaussian_kernel,
    gaussian_noise,
    load_mnist,
    load_mnist_idx,
    rotate,
)

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def idx_bytes(array: np.ndarray, *, magic: int | None = None, dims=None) -> bytes:
    """An IDX file of ``uint8`` values, written from the format's definition."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = array.shape if dims is None else dims
    return struct.pack(f">I{len(dims)}I", magic, *dims) + array.tobytes(order="C")


def write(path: Path, payload: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    return images, labels


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("compress", [True, False])
def test_reads_back_exactly(tmp_path, small, compress):
    images, labels = small
    xi = write(tmp_path / "img", idx_bytes(images), compress)
    yi = write(tmp_path / "lab", idx_bytes(labels), compress)
    x, y = load_mnist_idx(xi, yi)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (7, 1, 5, 3) and y.shape == (7,)
    np.testing.assert_array_equal((x[:, 0] * 255).round().numpy().astype(np.uint8), images)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert x.min() == 0.0 and x.max() == 1.0


def test_gzip_is_detected_by_content_not_name(tmp_path, small):
    images, labels = small
    xi = write(tmp_path / "images.gz", idx_bytes(images), compress=False)  # plain, named .gz
    yi = write(tmp_path / "labels.idx", idx_bytes(labels), compress=True)  # gzip, no .gz
    x, y = load_mnist_idx(xi, yi)
    assert x.shape == (7, 1, 5, 3) and len(y) == 7


def test_load_mnist_folder(tmp_path, small):
    images, labels = small
    write(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(images), compress=True)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(labels), compress=False)  # plain name
    x, y = load_mnist(tmp_path)
    assert x.shape == (7, 1, 5, 3)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_missing_file_says_which_and_where(tmp_path, small):
    images, _ = small
    write(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(images), compress=True)
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz.*mnist"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_mnist(tmp_path, part="train")
    with pytest.raises(ValueError, match="part"):
        load_mnist(tmp_path, part="validation")


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    ("which", "payload", "message"),
    [
        ("images", lambda im, lab: idx_bytes(im, magic=0x0801, dims=(7,)), "magic number"),
        ("images", lambda im, lab: idx_bytes(lab), "magic number"),  # labels given as images
        ("labels", lambda im, lab: idx_bytes(lab, magic=0x0B01), "magic number"),  # int8 dtype
        ("labels", lambda im, lab: b"\x01\x00\x08\x01" + idx_bytes(lab)[4:], "magic number"),
        ("images", lambda im, lab: idx_bytes(im)[:-1], "truncated"),
        ("images", lambda im, lab: idx_bytes(im)[:10], "truncated"),  # inside the header
        ("labels", lambda im, lab: idx_bytes(lab) + b"\x00", "extra bytes"),
        ("labels", lambda im, lab: b"\x00\x00", "too short"),
        ("images", lambda im, lab: idx_bytes(im[:0], dims=(0, 5, 3)), "none may be 0"),
        ("labels", lambda im, lab: idx_bytes(lab[:6]), "holds 7 images but"),  # count mismatch
    ],
)
def test_malformed_files_raise_value_error_naming_the_file(
    tmp_path, small, compress, which, payload, message
):
    images, labels = small
    files = {
        "images": write(tmp_path / "images.idx", idx_bytes(images), compress),
        "labels": write(tmp_path / "labels.idx", idx_bytes(labels), compress),
    }
    write(files[which], payload(images, labels), compress)
    with pytest.raises(ValueError, match=message) as info:
        load_mnist_idx(files["images"], files["labels"])
    assert isinstance(info.value, MNISTFormatError)
    assert str(files[which]) in str(info.value)


def test_truncated_gzip_stream(tmp_path, small):
    images, labels = small
    xi = tmp_path / "images.gz"
    xi.write_bytes(gzip.compress(idx_bytes(images))[:-9])
    yi = write(tmp_path / "labels", idx_bytes(labels), compress=True)
    with pytest.raises(MNISTFormatError, match=r"images\.gz.*does not decompress"):
        load_mnist_idx(xi, yi)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST copy not present")
def test_shared_mnist_test_set():
    x, y = load_mnist(SHARED_MNIST)
    assert x.shape == (10_000, 1, 28, 28) and y.shape == (10_000,)
    # published class counts of the MNIST test set
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(y).tolist() == counts
    assert x.min() == 0.0 and x.max() == 1.0


# ----------------------------------------------------------------------------- shifts
@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 12, 12, generator=g) * (torch.rand(6, 1, 12, 12, generator=g) > 0.6)
    return x


def _in_range(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize(
    "shift",
    [
        lambda x: rotate(x, 30.0),
        lambda x: rotate(x, -123.0),
        lambda x: gaussian_noise(x, 0.5, torch.Generator().manual_seed(0)),
        lambda x: blur(x, 1.5),
        lambda x: contrast(x, 0.3),
    ],
)
def test_shape_and_range(images, shift):
    _in_range(shift(images), images)


def test_rotate_zero_is_identity(images):
    torch.testing.assert_close(rotate(images, 0.0), images, atol=1e-5, rtol=0)


def test_rotate_90_twice_is_180(images):
    torch.testing.assert_close(
        rotate(rotate(images, 90.0), 90.0), rotate(images, 180.0), atol=1e-5, rtol=0
    )
    # and 180 turns the pixel grid around its centre (a pure permutation for a square image)
    torch.testing.assert_close(rotate(images, 180.0), images.flip(-1, -2), atol=1e-5, rtol=0)


def test_rotate_direction_and_non_square_images():
    x = torch.zeros(1, 1, 6, 10)
    x[0, 0, 2, 6] = 1.0  # right of the centre (2.5, 4.5) and a little above it
    out = rotate(x, 90.0)  # counter-clockwise as displayed: right goes up
    expected = torch.zeros_like(x)
    expected[0, 0, 1, 4] = 1.0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(out, -90.0), x, atol=1e-5, rtol=0)


def test_rotate_keeps_mass_of_a_centred_blob():
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = torch.exp(-((xx - 13.5) ** 2 + (yy - 10.5) ** 2 / 4) / 8)[None, None]
    for degrees in (17.0, 45.0, 60.0):
        out = rotate(blob, degrees)
        assert out.sum().item() == pytest.approx(blob.sum().item(), rel=1e-2)
        assert not torch.allclose(out, blob, atol=1e-2)  # an elongated blob really turns


def test_noise_zero_is_identity_and_seeded(images):
    torch.testing.assert_close(gaussian_noise(images, 0.0), images, atol=0, rtol=0)
    a = gaussian_noise(images, 0.3, torch.Generator().manual_seed(5))
    b = gaussian_noise(images, 0.3, torch.Generator().manual_seed(5))
    c = gaussian_noise(images, 0.3, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)


def test_noise_has_the_requested_std():
    x = torch.full((20, 1, 28, 28), 0.5)
    out = gaussian_noise(x, 0.05, torch.Generator().manual_seed(0))  # clamping never bites
    assert (out - x).std().item() == pytest.approx(0.05, rel=0.02)
    assert (out - x).mean().abs().item() < 0.001


def test_gaussian_kernel_matches_closed_form():
    k = gaussian_kernel(1.5, torch.float64)
    assert len(k) == 2 * math.ceil(4.5) + 1
    t = torch.arange(-5, 6, dtype=torch.float64)
    ref = torch.exp(-(t**2) / (2 * 1.5**2))
    torch.testing.assert_close(k, ref / ref.sum())
    assert gaussian_kernel(0.0).tolist() == [1.0]


def test_blur_properties(images):
    const = torch.full((2, 1, 9, 7), 0.37)
    torch.testing.assert_close(blur(const, 1.5), const, atol=1e-6, rtol=0)
    torch.testing.assert_close(blur(images, 0.0), images, atol=0, rtol=0)
    # a point in the middle spreads into the 2-d Gaussian (outer product of the 1-d kernels)
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0
    k = gaussian_kernel(1.0)
    torch.testing.assert_close(blur(x, 1.0)[0, 0, 4:11, 4:11], torch.outer(k, k))
    assert blur(images, 2.0).std() < images.std()


def test_contrast_properties(images):
    torch.testing.assert_close(contrast(images, 1.0), images, atol=1e-6, rtol=0)
    out = contrast(images, 0.3)
    torch.testing.assert_close(out.mean((1, 2, 3)), images.mean((1, 2, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std((1, 2, 3)), 0.3 * images.std((1, 2, 3)), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda x: rotate(x[0], 10.0), ValueError, r"\(N, C, H, W\)"),
        (lambda x: rotate(x * 2, 10.0), ValueError, r"\[0, 1\]"),
        (lambda x: rotate(x.numpy(), 10.0), TypeError, "torch.Tensor"),
        (lambda x: rotate(x, float("nan")), ValueError, "degrees"),
        (lambda x: gaussian_noise(x, -0.1), ValueError, "std"),
        (lambda x: blur(x, -1.0), ValueError, "sigma"),
        (lambda x: contrast(x, 0.0), ValueError, r"factor must lie in \(0"),
        (lambda x: contrast(x, 1.5), ValueError, "factor"),
        (lambda x: contrast(x, "0.5"), TypeError, "factor"),
        (lambda x: blur((x * 255).to(torch.uint8), 1.0), ValueError, "floating"),
    ],
)
def test_bad_arguments(images, call, error, message):
    with pytest.raises(error, match=message):
        call(images)
