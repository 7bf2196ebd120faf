"""Image ops against PIL/NumPy references, on real photographs (scikit-learn's samples)."""

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from cnn_jax.data import transforms


@pytest.fixture(scope="module")
def photo():
    return load_sample_images().images[0]  # 427x640 RGB, "china.jpg"


def encode(image: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA"])
def test_decode_converts_modes_like_pil(photo, mode):
    img = Image.fromarray(photo).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = encode(img, fmt)
    out = transforms.decode(data)
    assert out.shape == photo.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_decode_grey_replicates_channels(photo):
    out = transforms.decode(encode(Image.fromarray(photo).convert("L")))
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_decode_16_bit_png_scales_to_8_bits():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    out = transforms.decode(encode(Image.fromarray(values)))  # a 16-bit grey PNG
    np.testing.assert_array_equal(out[0, :, 0], np.round(values[0] / 257.0).astype(np.uint8))


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_decode_bad_data_names_the_file(photo, data):
    if data is None:  # a real JPEG cut in half
        data = encode(Image.fromarray(photo), "JPEG")[:2000]
    with pytest.raises(ValueError, match="bad.jpg: cannot decode"):
        transforms.decode(data, name="bad.jpg")


def test_resize_shorter_matches_pil(photo):
    out = transforms.resize_shorter(photo, 256)
    assert out.shape == (256, 384, 3)  # 427x640 -> 256 x round(640 * 256 / 427)
    ref = np.stack([np.asarray(Image.fromarray(photo[..., c]).resize((384, 256), Image.BILINEAR))
                    for c in range(3)], -1)
    np.testing.assert_array_equal(out, ref)
    small = transforms.resize_shorter(photo[:100, :150], 256)  # smaller than the crop: enlarged
    assert small.shape == (256, 384, 3)


def test_central_crop_and_errors(photo):
    out = transforms.central_crop(photo, 227)
    np.testing.assert_array_equal(out, photo[100:327, 206:433])  # (427-227)//2, (640-227)//2
    with pytest.raises(ValueError, match="smaller than the 500x500 crop"):
        transforms.central_crop(photo, 500)


def test_random_crop_flip_is_a_window_or_its_mirror(photo):
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(20):
        out = transforms.random_crop_flip(photo, 227, rng)
        assert out.shape == (227, 227, 3)
        # the crop (or its mirror) appears in the photo at some offset
        for candidate, flipped in ((out, False), (out[:, ::-1], True)):
            hits = np.argwhere((photo[:201, :414, 0] == candidate[0, 0, 0]))
            if any(np.array_equal(photo[t:t + 227, l:l + 227], candidate) for t, l in hits[:5000]):
                flips += flipped
                break
        else:
            pytest.fail("crop is not a window of the photo")
    assert 3 <= flips <= 17  # about half mirrored


def test_pca_basis_reconstructs_the_covariance(photo):
    pixels = photo.reshape(-1, 3).astype(np.float64)
    values, vectors = transforms.pca_basis(pixels)
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, np.cov(pixels, rowvar=False), rtol=1e-8)
    assert values[0] >= values[1] >= values[2] > 0


def test_pca_colour_noise_is_the_papers_formula():
    image = np.zeros((2, 2, 3), np.float32)
    values, vectors = np.array([3.0, 2.0, 1.0]), np.eye(3)[:, [2, 0, 1]]
    rng, same = np.random.default_rng(5), np.random.default_rng(5)
    out = transforms.pca_colour_noise(image, values, vectors, rng)
    alpha = same.normal(0.0, 0.1, size=3)
    np.testing.assert_allclose(out[0, 0], vectors @ (alpha * values), rtol=1e-6)
    np.testing.assert_array_equal(out[0, 0], out[1, 1])  # one shift for every pixel of the image


def test_ten_crop(photo):
    crops = transforms.ten_crop(photo, 224)
    assert crops.shape == (10, 224, 224, 3)
    np.testing.assert_array_equal(crops[0], photo[:224, :224])
    np.testing.assert_array_equal(crops[3], photo[-224:, -224:])
    np.testing.assert_array_equal(crops[4], transforms.central_crop(photo, 224))
    for i in range(5):
        np.testing.assert_array_equal(crops[5 + i], crops[i][:, ::-1])


def test_rgb_to_grey_is_itu_601():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    np.testing.assert_array_equal(transforms.rgb_to_grey(rgb)[0, :, 0], [76, 150, 29])
