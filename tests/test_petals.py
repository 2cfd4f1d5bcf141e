"""The embedded ``petals`` data set: determinism, disjoint splits, range, shapes, variety, errors."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from deftcli.errors import DeftError
from deftcli.petals import SPLIT_SIZES, PetalsDataset, render_petals


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Renders on one thread: with two cores shared with other jobs, a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_256() -> torch.Tensor:
    return render_petals("train", torch.arange(256), 32)


def _digests(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images}


def test_same_image_in_any_batch_order_and_rng_state(train_256: torch.Tensor) -> None:
    picks = [200, 3, 77, 3, 128, 0]
    torch.manual_seed(1234)
    shuffled = render_petals("train", picks, 32)
    torch.manual_seed(99)
    torch.rand(10)
    again = render_petals("train", torch.tensor(picks), 32)
    assert torch.equal(shuffled, train_256[picks])
    assert torch.equal(again, shuffled)
    singles = torch.cat([render_petals("train", [i], 32) for i in (255, 5)])
    assert torch.equal(singles, train_256[[255, 5]])


def test_same_image_whatever_the_thread_count() -> None:
    one = render_petals("val", range(40, 56), 48)
    torch.set_num_threads(2)  # 16 images of 48×48 are enough pixels for torch to split the work
    try:
        two = render_petals("val", range(40, 56), 48)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one, two)


def test_splits_are_disjoint() -> None:
    train = _digests(render_petals("train", range(2000), 16))
    for split in ("val", "test"):
        assert not _digests(render_petals(split, range(300), 16)) & train
    assert not _digests(render_petals("val", range(300), 16)) & _digests(render_petals("test", range(300), 16))


def test_dtype_range_and_shapes(train_256: torch.Tensor) -> None:
    assert train_256.shape == (256, 3, 32, 32)
    assert train_256.dtype == torch.float32
    assert train_256.min() >= -1.0 and train_256.max() <= 1.0
    assert torch.isfinite(train_256).all()
    large = render_petals("test", [0, 1019], 64)
    assert large.shape == (2, 3, 64, 64) and large.dtype == torch.float32
    assert large.min() >= -1.0 and large.max() <= 1.0
    assert render_petals("train", [], 32).shape == (0, 3, 32, 32)


def test_larger_size_is_the_same_flower_rendered_finer(train_256: torch.Tensor) -> None:
    fine = render_petals("train", range(64), 64)
    difference = (F.avg_pool2d(fine, 2) - train_256[:64]).abs()
    assert difference.mean() < 0.03
    assert difference.mean(dim=(1, 2, 3)).max() < 0.15
    other_flowers = (F.avg_pool2d(fine, 2) - train_256[64:128]).abs().mean(dim=(1, 2, 3))
    assert other_flowers.min() > difference.mean(dim=(1, 2, 3)).max()


def test_images_vary(train_256: torch.Tensor) -> None:
    mean_colours = train_256.mean(dim=(2, 3))
    assert (mean_colours.std(dim=0) > 0.1).all()
    assert len(_digests(train_256)) == 256
    # Every image has structure (a flower on a background), not a flat colour.
    assert (train_256.std(dim=(1, 2, 3)) > 0.05).all()
    # Brightness and hue vary: some images are mostly dark, some bright; red, green and blue all dominate somewhere.
    brightness = mean_colours.mean(dim=1)
    assert brightness.min() < -0.6 and brightness.max() > 0.0
    assert set(mean_colours.argmax(dim=1).tolist()) == {0, 1, 2}


def test_errors() -> None:
    with pytest.raises(DeftError, match="unknown petals split") as raised:
        render_petals("validation", [0])
    assert "\n" not in str(raised.value)
    with pytest.raises(DeftError, match="out of range"):
        render_petals("val", [0, 1020])
    with pytest.raises(DeftError, match="out of range"):
        render_petals("train", torch.tensor([-1]))
    with pytest.raises(DeftError):
        render_petals("train", [0], size=4)
    with pytest.raises(DeftError):
        PetalsDataset("nope")


def test_dataset() -> None:
    assert len(PetalsDataset("val")) == 1020 == SPLIT_SIZES["val"]
    assert len(PetalsDataset("test")) == 1020
    assert len(PetalsDataset()) >= 50_000
    dataset = PetalsDataset("val", size=32)
    item = dataset[7]
    assert item.shape == (3, 32, 32) and item.dtype == torch.float32
    assert torch.equal(dataset.batch([6, 7])[1], item)
    assert torch.equal(item, render_petals("val", [7], 32)[0])
    with pytest.raises(IndexError):
        dataset[1020]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    assert next(iter(loader)).shape == (4, 3, 32, 32)
