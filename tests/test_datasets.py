"""The image data sets behind ``open_dataset``: ``flowers102`` (torchvision's layout, built here as a tiny
fake), the original code's transform checked against a real Flowers102 image, ``folder`` and ``petals``.

Everything is offline: the Flowers102 tests replace the connection check and torchvision's download so
that no test can reach (or wait for) the network.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import upstream
from PIL import Image
from scipy.io import savemat

from deftcli import flowers
from deftcli.data import FolderDataset, center_crop_resize, open_dataset, split_of
from deftcli.errors import DeftError
from deftcli.flowers import Flowers102Dataset, flowers_transform
from deftcli.petals import render_petals
from deftcli.specs import DataSpec

RED, GREEN, BLUE, MAGENTA = (220, 30, 30), (30, 200, 60), (40, 60, 220), (255, 0, 255)


def unit(rgb: tuple[int, int, int]) -> torch.Tensor:
    """An 8-bit RGB colour in the model scale [-1, 1], shaped (3, 1, 1)."""
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 * 2 - 1


def bordered(centre, border, side: int, border_px: int, landscape: bool = True) -> Image.Image:
    """A side×side square of ``centre`` with ``border_px`` of ``border`` added left/right (or top/bottom)."""
    w, h = (side + 2 * border_px, side) if landscape else (side, side + 2 * border_px)
    arr = np.empty((h, w, 3), np.uint8)
    arr[...] = border
    if landscape:
        arr[:, border_px : border_px + side] = centre
    else:
        arr[border_px : border_px + side] = centre
    return Image.fromarray(arr)


def save_jpeg(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=95, subsampling=0)  # 4:4:4, so colour edges stay sharp
    return path


# --------------------------------------------------------------------------------------------------
# flowers102: a fake data set in torchvision's layout
# --------------------------------------------------------------------------------------------------

# 1-based image ids per split, deliberately unsorted: deft must keep setid.mat's order (as torchvision
# does), so that index i of a split is the original code's index i.
TRNID, VALID, TSTID = [2, 1], [5, 3, 4, 10], [6, 9, 7, 8]


def make_flowers(root: Path, images: dict[int, Image.Image] | None = None) -> Path:
    """``root/flowers-102/{jpg/image_000NN.jpg, setid.mat, imagelabels.mat}`` with 10 images.

    Image k is a solid colour (k·20, 255 − k·20, 128), of varying size and aspect; ``images`` overrides some.
    """
    base = root / "flowers-102"
    images = images or {}
    for k in range(1, 11):
        img = images.get(k) or Image.new("RGB", (70 + 7 * k, 90 - 3 * k), (k * 20, 255 - k * 20, 128))
        save_jpeg(img, base / "jpg" / f"image_{k:05d}.jpg")
    savemat(
        base / "setid.mat",
        {"trnid": np.array(TRNID, np.uint16), "valid": np.array(VALID, np.uint16), "tstid": np.array(TSTID, np.uint16)},
    )
    savemat(base / "imagelabels.mat", {"labels": np.arange(1, 11, dtype=np.uint8) % 3 + 1})
    return base


@pytest.fixture
def offline(monkeypatch):
    """No network: the connection check fails and torchvision's download must not be called."""
    calls = []

    def no_download(*args, **kwargs):
        calls.append("download")
        raise AssertionError("torchvision's download must not be called here")

    monkeypatch.setattr(flowers, "reachable", lambda *a, **k: calls.append("reachable") or False)
    monkeypatch.setattr("torchvision.datasets.Flowers102", no_download)
    return calls


def test_flowers_split_sizes_and_order(tmp_path, offline):
    make_flowers(tmp_path)
    sizes = {
        split: len(open_dataset(DataSpec(dataset="flowers102", root=str(tmp_path)), split, 64))
        for split in ("train", "val", "test")
    }
    assert sizes == {"train": len(TRNID) + len(TSTID), "val": len(VALID), "test": len(TSTID)}

    for split, ids in {"train": TRNID + TSTID, "val": VALID, "test": TSTID}.items():
        ds = Flowers102Dataset(tmp_path, split, 64, 3)
        assert [p.name for p in ds.files] == [f"image_{k:05d}.jpg" for k in ids]
        x = ds.batch(range(len(ds)))
        # each image is a solid colour, so its mean tells which file landed at which index
        for i, k in enumerate(ids):
            assert torch.allclose(x[i].mean((1, 2)), unit((k * 20, 255 - k * 20, 128)).flatten(), atol=0.03)
    assert offline == []  # a complete copy never touches the network


def test_flowers_batch_shape_and_range(tmp_path, offline):
    make_flowers(tmp_path)
    ds = open_dataset(DataSpec(dataset="flowers102", root=str(tmp_path)), "train", 64, 3)
    x = ds.batch([0, 3, 5])
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert Flowers102Dataset(tmp_path, "val", 32, 3).batch([1]).shape == (1, 3, 32, 32)


def test_flowers_centre_crop_removes_the_borders(tmp_path, offline):
    # image 3 (val index 1): green 96×96 centre with red 24-px borders left and right (144×96);
    # image 4 (val index 2): blue centre with red borders top and bottom (96×144).
    make_flowers(tmp_path, {3: bordered(GREEN, RED, 96, 24), 4: bordered(BLUE, RED, 96, 24, landscape=False)})
    x = Flowers102Dataset(tmp_path, "val", 64, 3).batch([1, 2])
    assert (x[0] - unit(GREEN)).abs().max() < 0.05, "a red border survived the centre crop"
    assert (x[1] - unit(BLUE)).abs().max() < 0.05, "a red border survived the centre crop"
    # the same through flowers_transform directly
    assert (flowers_transform(bordered(GREEN, RED, 96, 24), 64) - unit(GREEN)).abs().max() < 0.01


def test_flowers_accepts_the_flowers102_folder_itself(tmp_path, offline):
    base = make_flowers(tmp_path)
    assert len(Flowers102Dataset(base, "val", 64, 3)) == len(VALID)


@pytest.mark.parametrize(
    "remove, needle", [("setid.mat", "setid.mat"), ("imagelabels.mat", "imagelabels.mat"), ("jpg", "jpg")]
)
def test_flowers_partial_copy_names_the_missing_file(tmp_path, offline, remove, needle):
    base = make_flowers(tmp_path)
    target = base / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DeftError, match=needle) as info:
        Flowers102Dataset(tmp_path, "val", 64, 3)
    assert str(base / remove) in str(info.value)
    assert offline == [], "a partial copy must not trigger a download"


def test_flowers_partial_copy_given_as_the_flowers102_folder_names_its_own_missing_file(tmp_path, offline):
    base = make_flowers(tmp_path)
    (base / "setid.mat").unlink()
    with pytest.raises(DeftError) as info:
        Flowers102Dataset(base, "val", 64, 3)
    assert f"{base / 'setid.mat'} is missing" in str(info.value) and "flowers-102/flowers-102" not in str(info.value)
    assert offline == []


def test_flowers_missing_image_is_named_when_opening(tmp_path, offline):
    base = make_flowers(tmp_path)
    (base / "jpg" / "image_00004.jpg").unlink()  # listed in valid
    with pytest.raises(DeftError, match="image_00004.jpg"):
        Flowers102Dataset(tmp_path, "val", 64, 3)
    assert len(Flowers102Dataset(tmp_path, "train", 64, 3)) == len(TRNID) + len(TSTID)  # other splits still open


def test_flowers_corrupt_setid_is_a_user_error(tmp_path, offline):
    base = make_flowers(tmp_path)
    (base / "setid.mat").write_text("<html>404 not found</html>")
    with pytest.raises(DeftError, match="setid.mat"):
        Flowers102Dataset(tmp_path, "val", 64, 3)
    (base / "setid.mat").write_bytes(b"")
    with pytest.raises(DeftError, match="setid.mat"):
        Flowers102Dataset(tmp_path, "val", 64, 3)


def test_flowers_bad_split_or_channels(tmp_path, offline):
    make_flowers(tmp_path)
    with pytest.raises(DeftError, match="split"):
        Flowers102Dataset(tmp_path, "validation", 64, 3)
    with pytest.raises(DeftError, match="split"):
        open_dataset(DataSpec(dataset="flowers102", root=str(tmp_path)), "validation", 64, 3)
    with pytest.raises(DeftError, match="RGB"):
        open_dataset(DataSpec(dataset="flowers102", root=str(tmp_path)), "val", 64, 1)


def test_flowers_empty_root_offline_fails_without_trying_to_download(tmp_path, offline):
    with pytest.raises(DeftError, match="setid.mat") as info:
        open_dataset(DataSpec(dataset="flowers102", root=str(tmp_path / "nothing-here")), "val", 64, 3)
    assert "cannot be reached" in str(info.value) and "--data-root" in str(info.value)
    assert offline == ["reachable"]  # checked the connection, never called torchvision's download


def test_flowers_failed_download_is_reported(tmp_path, monkeypatch):
    def failing_download(root, split, download):
        (Path(root) / "flowers-102").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(flowers, "reachable", lambda *a, **k: True)
    monkeypatch.setattr("torchvision.datasets.Flowers102", failing_download)
    with pytest.raises(DeftError, match="download failed: connection reset by peer"):
        Flowers102Dataset(tmp_path, "val", 64, 3)


def test_reachable_answers_false_while_the_connection_still_hangs(monkeypatch):
    """A DNS lookup or connect that never returns (and ignores socket timeouts) must not hold the caller."""
    import contextlib
    import threading

    release = threading.Event()

    def hanging_connection(address, timeout):
        release.wait()  # until the test is over: the probe thread is still stuck when reachable() answers
        raise OSError("released")

    monkeypatch.setattr(flowers.socket, "create_connection", hanging_connection)
    try:
        assert flowers.reachable("example.org", timeout=0.05) is False
    finally:
        release.set()
    monkeypatch.setattr(flowers.socket, "create_connection", lambda address, timeout: contextlib.nullcontext())
    assert flowers.reachable("example.org", timeout=5.0) is True


# --------------------------------------------------------------------------------------------------
# the original transform, against a real Flowers102 validation image
# --------------------------------------------------------------------------------------------------


def reference_jpeg(x: torch.Tensor, side: int = 128, border: int = 32) -> Image.Image:
    """The reference (1, 3, 64, 64) image upsampled bicubically to side×side, on a magenta
    (side + 2·border)×side canvas, JPEG-compressed (quality 95, 4:4:4): a stand-in for an original
    Flowers102 photo, which is larger than 64 px and not square."""
    big = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False).clamp(-1, 1)
    arr = ((big[0].permute(1, 2, 0).numpy() + 1) / 2 * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    bordered(arr, MAGENTA, side, border).save(buf, format="JPEG", quality=95, subsampling=0)
    buf.seek(0)
    return Image.open(buf)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


def test_flowers_transform_reproduces_the_original_preparation(tmp_path, offline):
    ref = torch.load(upstream("model_weights/flower_idx_3.pt"), weights_only=True, map_location="cpu")
    assert ref.shape == (1, 3, 64, 64)
    img = reference_jpeg(ref)
    assert img.size == (192, 128)

    # Measured on this machine (torch 2.14, torchvision 0.29, JPEG q95 4:4:4): PSNR 35.0 dB against the
    # reference, per-channel |Δmean| ≤ 0.001 and |Δstd| ≤ 0.0083 (reference std 0.64 / 0.53 / 0.72), the
    # same through the fake data set (which re-encodes the JPEG once more) and 35.0 dB through the
    # `folder` path. The error is the round trip 64 → 128 (bicubic) → 8 bit → JPEG → 64 (bilinear), not
    # the pipeline: squashing without the centre crop lets magenta in (6.5 dB), a [0, 1] scale instead of
    # [-1, 1] moves every channel mean by 0.50. The tolerances (|Δmean| < 0.01, |Δstd| < 0.03, > 30 dB)
    # leave about 3× (5 dB) headroom for other JPEG / Pillow builds.
    direct = flowers_transform(img, 64)[None]

    # the same file as val image 3 of a fake Flowers102 folder (index 3, as in the original's val_img_idx)
    make_flowers(tmp_path, {VALID[3]: img.copy()})
    via_dataset = Flowers102Dataset(tmp_path, "val", 64, 3).batch([3])

    for x in (direct, via_dataset):
        assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
        assert torch.allclose(x.mean((0, 2, 3)), ref.mean((0, 2, 3)), atol=0.01)
        assert torch.allclose(x.std((0, 2, 3)), ref.std((0, 2, 3)), atol=0.03)
        assert psnr(x, ref) > 30
    assert (direct - via_dataset).abs().max() < 0.03  # the dataset saves and re-reads one more JPEG

    # the generic folder path (torch's antialiased bilinear) prepares the same picture as closely
    folder = tmp_path / "folder"
    for k in range(20):  # enough files that every split has one; the reference is one of them
        save_jpeg(img if k == 7 else Image.new("RGB", (8, 8), GREEN), folder / f"f{k:02d}.jpg")
    same = load_one(folder, "f07.jpg", 64, 3)[None]
    assert psnr(same, ref) > 30
    assert (same - direct).abs().mean() < 0.02

    # a pipeline without the centre crop (squashing 192×128 to 64×64) is far off: the test can tell
    squashed = (
        torch.from_numpy(np.array(img.convert("RGB").resize((64, 64), Image.BILINEAR))).permute(2, 0, 1) / 255 * 2 - 1
    )[None]
    assert psnr(squashed, ref) < 20


# --------------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------------


def load_one(root: Path, rel: str, size: int, channels: int) -> torch.Tensor:
    """Image ``rel`` of the folder data set at ``root``, found in whichever split it falls in."""
    ds = open_dataset(DataSpec(dataset="folder", root=str(root)), split_of(rel), size, channels)
    return ds.batch([ds.files.index(root / rel)])[0]


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    bordered(GREEN, RED, 40, 10).save(root / "wide.png")  # 60×40
    save_jpeg(bordered(BLUE, RED, 48, 8, landscape=False), root / "a" / "b" / "tall.jpg")  # nested
    save_jpeg(Image.new("RGB", (20, 20), RED), root / "a" / "upper.JPEG")
    Image.new("L", (30, 30), 200).save(root / "a" / "grey.png")
    Image.new("RGBA", (16, 16), (*GREEN, 255)).save(root / "rgba.png")
    Image.new("RGB", (16, 16), BLUE).save(root / "c.bmp")
    (root / "notes.txt").write_text("not an image")
    (root / "._wide.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # hidden, not an image
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (16, 16), MAGENTA).save(root / ".ipynb_checkpoints" / "copy.png")
    (root / "fill").mkdir()
    for k in range(40):  # filler so that every split has files
        Image.new("RGB", (12, 12), (k * 6, 100, 100)).save(root / "fill" / f"{k:02d}.png")
    return root


def test_folder_discovers_images_recursively(mixed_folder):
    found = set()
    for split in ("train", "val", "test"):
        ds = open_dataset(DataSpec(dataset="folder", root=str(mixed_folder)), split, 16, 3)
        found |= {p.relative_to(mixed_folder).as_posix() for p in ds.files}
    expected = {"wide.png", "a/b/tall.jpg", "a/upper.JPEG", "a/grey.png", "rgba.png", "c.bmp"} | {
        f"fill/{k:02d}.png" for k in range(40)
    }
    assert found == expected  # no .txt, no hidden file or folder


def test_folder_centre_crop_resize_and_channels(mixed_folder):
    wide = load_one(mixed_folder, "wide.png", 32, 3)
    assert wide.shape == (3, 32, 32) and (wide - unit(GREEN)).abs().max() < 1e-5  # PNG: exact, borders gone
    tall = load_one(mixed_folder, "a/b/tall.jpg", 24, 3)
    assert tall.shape == (3, 24, 24) and (tall - unit(BLUE)).abs().max() < 0.05
    up = load_one(mixed_folder, "a/upper.JPEG", 64, 3)  # upsampled 20 → 64
    assert up.shape == (3, 64, 64) and (up - unit(RED)).abs().max() < 0.05
    grey = load_one(mixed_folder, "a/grey.png", 16, 3)
    assert grey.shape == (3, 16, 16)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.allclose(grey, torch.full_like(grey, 200 / 255 * 2 - 1), atol=1e-5)
    rgba = load_one(mixed_folder, "rgba.png", 16, 3)
    assert torch.allclose(rgba, unit(GREEN).expand(3, 16, 16), atol=1e-5)
    luma = load_one(mixed_folder, "wide.png", 16, 1)  # RGB file for a 1-channel prior: luma
    assert luma.shape == (1, 16, 16)
    assert torch.allclose(
        luma, torch.full_like(luma, (0.299 * GREEN[0] + 0.587 * GREEN[1] + 0.114 * GREEN[2]) / 255 * 2 - 1), atol=1e-4
    )
    batch = open_dataset(DataSpec(dataset="folder", root=str(mixed_folder)), "train", 16, 3).batch([0, 1, 2])
    assert batch.shape == (3, 3, 16, 16) and batch.min() >= -1 and batch.max() <= 1


def test_folder_warns_once_per_job_when_images_are_upscaled(mixed_folder, capsys, monkeypatch):
    split = split_of("a/upper.JPEG")
    ds = FolderDataset(mixed_folder, split, 12, 3)  # no image here is below 12 px
    assert "upscaled" not in capsys.readouterr().err
    ds = FolderDataset(mixed_folder, split, 64, 3)
    small = sum(min(Image.open(p).size) < 64 for p in ds.files)
    assert small == len(ds.files)  # every image here is below 64 px
    assert (
        f"{small} of the {len(ds.files)} {split} images have a short side below 64 px and are upscaled to 64×64"
        in capsys.readouterr().err
    )
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # rank 1 of a torchrun job: rank 0 says it
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    FolderDataset(mixed_folder, split, 64, 3)
    assert "upscaled" not in capsys.readouterr().err


def test_center_crop_resize_matches_flowers_transform_layout():
    x = torch.linspace(-1, 1, 3 * 30 * 50).view(3, 30, 50)
    y = center_crop_resize(x, 30)  # same size: a pure crop of the middle 30 columns
    assert torch.equal(y, x[:, :, 10:40])
    assert center_crop_resize(x, 8).shape == (3, 8, 8)


def test_folder_split_is_deterministic_disjoint_and_about_80_10_10(tmp_path):
    root = tmp_path / "many"
    names = [f"{'sub/' if k % 3 == 0 else ''}img_{k:03d}.png" for k in range(60)]
    for k, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k, 0, 0)).save(root / name)
    spec = DataSpec(dataset="folder", root=str(root))
    first = {
        s: [p.relative_to(root).as_posix() for p in FolderDataset(root, s, 8, 3).files]
        for s in ("train", "val", "test")
    }
    again = {
        s: [p.relative_to(root).as_posix() for p in open_dataset(spec, s, 8, 3).files] for s in ("train", "val", "test")
    }
    assert first == again
    # the split depends on relative paths only: a copy elsewhere splits the same way
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "many")
    assert {s: [p.relative_to(moved).as_posix() for p in FolderDataset(moved, s, 8, 3).files] for s in first} == first
    sets = {s: set(v) for s, v in first.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(names)
    n = {s: len(v) for s, v in first.items()}
    assert n["train"] >= 40 and 2 <= n["val"] <= 12 and 2 <= n["test"] <= 12, n  # these 60 names: see split_of
    # split_of itself is 80/10/10 on many names
    counts = {"train": 0, "val": 0, "test": 0}
    for k in range(20000):
        counts[split_of(f"photos/{k}.jpg")] += 1
    assert (
        abs(counts["train"] / 20000 - 0.8) < 0.015
        and abs(counts["val"] / 20000 - 0.1) < 0.01
        and abs(counts["test"] / 20000 - 0.1) < 0.01
    )


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DeftError, match="no images"):
        open_dataset(DataSpec(dataset="folder", root=str(empty)), "train", 16, 3)
    junk = tmp_path / "junk"
    (junk / "deeper").mkdir(parents=True)
    (junk / "readme.txt").write_text("hello")
    (junk / "deeper" / "data.csv").write_text("1,2")
    (junk / ".DS_Store").write_bytes(b"\x00\x00")
    (junk / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(DeftError, match="no images"):
        open_dataset(DataSpec(dataset="folder", root=str(junk)), "train", 16, 3)
    with pytest.raises(DeftError, match="no such folder"):
        open_dataset(DataSpec(dataset="folder", root=str(tmp_path / "missing")), "train", 16, 3)
    with pytest.raises(DeftError, match="--data-root"):
        open_dataset(DataSpec(dataset="folder"), "train", 16, 3)
    with pytest.raises(DeftError, match="split"):
        open_dataset(DataSpec(dataset="folder", root=str(junk)), "validation", 16, 3)
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "only.png")
    other = next(s for s in ("train", "val", "test") if s != split_of("only.png"))
    with pytest.raises(DeftError, match=f"'{other}' split"):
        open_dataset(DataSpec(dataset="folder", root=str(one)), other, 16, 3)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DeftError, match="bad.png is not an image"):  # found when the data set opens, not when drawn
        open_dataset(DataSpec(dataset="folder", root=str(broken)), split_of("bad.png"), 16, 3)
    Image.new("RGB", (8, 8)).save(broken / "bad.png")
    ds = open_dataset(DataSpec(dataset="folder", root=str(broken)), split_of("bad.png"), 16, 3)
    (broken / "bad.png").write_bytes((broken / "bad.png").read_bytes()[:40])  # truncated after the header was checked
    with pytest.raises(DeftError, match="bad.png"):
        ds.batch([0])


# --------------------------------------------------------------------------------------------------
# petals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split, size", [("val", 32), ("train", 16), ("test", 24)])
def test_petals_via_open_dataset_is_render_petals(split, size):
    ds = open_dataset(DataSpec(dataset="petals"), split, size, 3)
    indices = [0, 3, len(ds) - 1]
    assert torch.equal(ds.batch(indices), render_petals(split, indices, size))
    assert len(open_dataset(DataSpec(), "val", size, 3)) == 1020  # petals is the default data set


def test_petals_needs_three_channels():
    with pytest.raises(DeftError, match="RGB"):
        open_dataset(DataSpec(dataset="petals"), "val", 32, 1)
