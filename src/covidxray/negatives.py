"""Pictures that are not frontal chest X-rays, found offline or made on the spot, for the input gate.

Nothing is downloaded: the photographs and drawings are the sample images that installed packages
ship (matplotlib, scikit-image, scikit-learn), the other modalities are pydicom's own test files and
scikit-image's medical samples, and documents, charts, noise and gradients are generated from a
seed. Each item is ``(name, kind, source)`` where ``source`` is a file path or the bytes of a
PNG/JPEG file, so that everything goes through the one decoder (`covidxray.imaging.read_image`),
colour and all. ``kind`` is one of `covidxray.gate.GATE_CLASSES` (never ``frontal``).

`HELD_OUT` names the package images that the shipped gate never trained on (the tests and the
gate benchmark score it on them).
"""

from __future__ import annotations

import gzip
import io
import math
from pathlib import Path
from typing import Iterator

import matplotlib
import numpy as np
import pydicom
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Item", "HELD_OUT", "package_images", "pydicom_images", "generated", "all_items"]

Item = tuple[str, str, "str | bytes"]  # (name, kind, path or file bytes)

HELD_OUT = {"grace_hopper.jpg", "china.jpg", "flower.jpg", "astronaut.png", "retina.jpg", "examples_ybr_color.dcm",
            "JPEG2000.dcm", "MR_small_expb.dcm", "693_J2KI.dcm"}
_MEDICAL = {"phantom.png": "other_modality", "retina.jpg": "other_modality", "microaneurysms.png": "other_modality",
            "cell.png": "other_modality", "ihc.png": "other_modality"}
_SKIP = {"lbpcascade_frontalface_opencv.xml", "README.txt", "lfw_subset.npy", "motorcycle_disp.npz"}
_WORDS = ("patient report laboratory result normal value range date signature clinic department findings impression "
          "the of and to in is with for on lung chest heart blood test page total invoice order item price quantity").split()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def package_images() -> list[Item]:
    """Photographs, drawings and medical non-X-ray samples shipped by matplotlib, scikit-image and scikit-learn."""
    folders = [Path(matplotlib.get_data_path()) / "sample_data"]
    faces = None
    try:  # optional: present where the test or training extras are installed
        import skimage
        folders.append(Path(skimage.__file__).parent / "data")
        faces = folders[-1] / "lfw_subset.npy"
    except ImportError:
        pass
    try:
        import sklearn
        folders.append(Path(sklearn.__file__).parent / "datasets" / "images")
    except ImportError:
        pass
    items: list[Item] = []
    for folder in folders:
        for f in sorted(folder.glob("*")):
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".tif") and f.name not in _SKIP:
                items.append((f.name, _MEDICAL.get(f.name, "other"), str(f)))
    if faces is not None and faces.is_file():  # 200 small face photographs (scikit-image)
        for i, face in enumerate(np.load(faces)[::4]):
            big = Image.fromarray((face * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC)
            items.append((f"lfw-{i}", "other", _png(np.asarray(big))))
    mr = Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz"  # a 256x256 16-bit MR slice, raw big-endian
    if mr.is_file():
        pixels = np.frombuffer(gzip.decompress(mr.read_bytes()), dtype=">u2").reshape(256, 256).astype(np.float64)
        items.append(("s1045.ima", "other_modality", _png((pixels / pixels.max() * 255).astype(np.uint8))))
    return items


def pydicom_images() -> list[Item]:
    """pydicom's bundled test files that hold an image of at least 32 x 32 pixels (CT, MR, US, NM, colour captures)."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    items: list[Item] = []
    for f in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not every test file is a readable dataset; those are not images anyway
            continue
        if int(ds.get("Rows", 0) or 0) >= 32 and int(ds.get("Columns", 0) or 0) >= 32 and str(ds.get("Modality", "")) != "SEG":
            items.append((f.name, "other_modality" if str(ds.get("Modality", "")) not in ("", "OT") else "other", str(f)))
    return items


def _document(rng: np.random.Generator) -> bytes:
    w, h = int(rng.integers(300, 900)), int(rng.integers(300, 1100))
    img = Image.new("L", (w, h), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(10, 28)))
    y = int(rng.integers(5, 40))
    while y < h - 20:
        line = " ".join(rng.choice(_WORDS, int(rng.integers(3, 12))))
        draw.text((int(rng.integers(5, 40)), y), line, fill=int(rng.integers(0, 80)), font=font)
        if rng.random() < 0.1:
            draw.rectangle((10, y, w - 10, y + 2), fill=0)
        y += int(rng.integers(14, 40))
    return _png(np.asarray(img))


def _chart(rng: np.random.Generator) -> bytes:
    fig = Figure(figsize=(float(rng.uniform(3, 7)), float(rng.uniform(2.5, 6))), dpi=60)
    ax = fig.add_subplot()
    x = np.arange(int(rng.integers(5, 60)))
    kind = rng.integers(0, 4)
    if kind == 0:
        ax.plot(x, np.cumsum(rng.normal(size=len(x))))
    elif kind == 1:
        ax.bar(x[:12], rng.random(len(x[:12])))
    elif kind == 2:
        ax.scatter(rng.random(40), rng.random(40), c=rng.random(40))
    else:
        ax.imshow(rng.random((8, 8)), cmap=str(rng.choice(["viridis", "gray", "magma", "jet"])))
    ax.set_title(" ".join(rng.choice(_WORDS, 3)))
    return _figure_png(fig)


def _noise(rng: np.random.Generator) -> bytes:
    h, w = int(rng.integers(64, 600)), int(rng.integers(64, 600))
    kind = rng.integers(0, 5)
    if kind == 0:
        a = rng.random((h, w))
    elif kind == 1:
        a = np.clip(rng.normal(0.5, rng.uniform(0.05, 0.3), (h, w)), 0, 1)
    elif kind == 2:  # smooth blobs: low-frequency noise, up-sampled
        a = np.asarray(Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)) / 255
    elif kind == 3:  # linear or radial gradient
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        a = (yy * math.cos(rng.uniform(0, 6.3)) + xx * math.sin(rng.uniform(0, 6.3))) if rng.random() < 0.5 else np.hypot(yy - 0.5, xx - 0.5)
        a = (a - a.min()) / (np.ptp(a) + 1e-9)
    else:  # shapes on a plain background
        img = Image.new("L", (w, h), int(rng.integers(0, 256)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 12))):
            box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
            draw.ellipse((box[0][0], box[1][0], box[0][1], box[1][1]), fill=int(rng.integers(0, 256)))
        a = np.asarray(img) / 255
    if rng.random() < 0.3:  # colour noise too
        return _png((np.stack([a, np.roll(a, 7, 0), np.roll(a, 11, 1)], -1) * 255).astype(np.uint8))
    return _png((a * 255).astype(np.uint8))


def generated(n: int, seed: int) -> list[Item]:
    """``n`` documents, charts, noise fields, gradients and shapes, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    makers = (("document", _document), ("chart", _chart), ("noise", _noise))
    return [(f"{name}-{seed}-{i}", "other", make(rng)) for i in range(n) for name, make in [makers[i % len(makers)]]]


def all_items(held_out: bool, n_generated: int = 150, seed: int = 0) -> Iterator[Item]:
    """Every packaged and generated negative; ``held_out`` selects `HELD_OUT` (and another seed) or the rest."""
    for item in package_images() + pydicom_images():
        if (item[0] in HELD_OUT) == held_out:
            yield item
    yield from generated(n_generated, seed + (1000 if held_out else 0))
