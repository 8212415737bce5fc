"""Tests of regprune.data: every loader is fed tiny files written in the genuine on-disk formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regprune.data import DataBundle, list_datasets, load_data, make_loaders
from regprune.data.cifar import SafeUnpickler
from regprune.data.mnist import FASHION_MNIST_DEFAULT_PATH, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
from regprune.errors import UserError

# ----------------------------------------------------------------------------------------------------------
# Writers for the on-disk formats
# ----------------------------------------------------------------------------------------------------------


class Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way Python 2 wrote the official CIFAR files.

    Python 2 `str` objects (dict keys, numpy's raw array bytes, dtype codes) were stored as BINSTRING opcodes
    and numpy's reconstructor was named numpy.core.multiarray._reconstruct. Python 3's own protocol-2
    output differs (bytes go through _codecs.encode), so it would not be a faithful stand-in.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file, reconstruct_module: str = "numpy.core.multiarray") -> None:
        super().__init__(file, protocol=2)
        self.reconstruct_module = reconstruct_module

    def save_py2_str(self, obj) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + f"{self.reconstruct_module}\n_reconstruct\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[type(len)] = save_global  # builtin functions such as _reconstruct


def py2_pickle(obj, path: Path, reconstruct_module: str = "numpy.core.multiarray") -> None:
    with open(path, "wb") as f:
        Py2StylePickler(f, reconstruct_module).dump(obj)


def tiny_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 6, test: int = 10) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        labels = [(j + i) % 10 for j in range(per_batch)]
        batch = {
            b"batch_label": b"training batch %d of 5" % i,
            b"labels": labels,
            b"data": tiny_images(per_batch, i),
            b"filenames": [b"img_%d_%d.png" % (i, j) for j in range(per_batch)],
        }
        py2_pickle(batch, folder / f"data_batch_{i}")
    py2_pickle(
        {b"batch_label": b"testing batch 1 of 1", b"labels": [j % 10 for j in range(test)], b"data": tiny_images(test, 99),
         b"filenames": [b"t_%d.png" % j for j in range(test)]},
        folder / "test_batch",
    )
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    py2_pickle({b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, folder / "batches.meta")
    return folder


def write_cifar100(root: Path, train: int = 200, test: int = 100) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    # numpy 2 names the reconstructor numpy._core.multiarray; both spellings must load.
    for name, n, seed in (("train", train, 1), ("test", test, 2)):
        fine = [j % 100 for j in range(n)]
        py2_pickle(
            {b"filenames": [b"f%d.png" % j for j in range(n)], b"batch_label": name.encode(), b"fine_labels": fine,
             b"coarse_labels": [f // 5 for f in fine], b"data": tiny_images(n, seed)},
            folder / name,
            reconstruct_module="numpy._core.multiarray",
        )
    py2_pickle({b"fine_label_names": [b"c%d" % i for i in range(100)], b"coarse_label_names": [b"s%d" % i for i in range(20)]},
               folder / "meta", reconstruct_module="numpy._core.multiarray")
    return folder


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, gz: bool, n_train: int = 30, n_test: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (n_train, 28, 28)), IDX_IMAGES_MAGIC),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10, IDX_LABELS_MAGIC),
        "t10k-images-idx3-ubyte": (np.zeros((n_test, 28, 28)), IDX_IMAGES_MAGIC),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10, IDX_LABELS_MAGIC),
    }
    for name, (array, magic) in arrays.items():
        data = idx_bytes(np.asarray(array), magic)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def write_image_tree(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class if split == "train" else 2):
                pixels = rng.integers(0, 256, size=(20 + c, 30, 3), dtype=np.uint8)
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(pixels).save(d / f"{i}.{ext}")
    return root


def expect_user_error(match_all: list[str], *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_data(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in match_all:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------------------------------------
# Spec parsing
# ----------------------------------------------------------------------------------------------------------


def test_list_datasets_names_every_form():
    forms = list_datasets()
    for form in ("mnist5k", "digits", "fashion-mnist[:PATH]", "cifar10:PATH", "cifar100:PATH", "imagefolder:PATH"):
        assert form in forms


def test_unknown_dataset_lists_known_ones():
    msg = expect_user_error(["unknown dataset", "mnist5k", "cifar10:PATH", "imagefolder:PATH"], "imagenet1k")
    assert "imagenet1k" in msg
    assert "did you mean cifar10" in expect_user_error([], "cifar1O:/x")


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty dataset spec"),
        ("cifar10", "needs a folder"),
        ("imagefolder:", "needs a folder"),
        ("mnist5k:/tmp", "takes no path"),
    ],
)
def test_malformed_specs(spec, fragment):
    expect_user_error([fragment], spec)


@pytest.mark.parametrize("kw", [{"limit_train": 0}, {"limit_test": -3}, {"limit_train": 2.5}])
def test_bad_limits(kw):
    expect_user_error(["must be a positive integer"], "digits", **kw)


# ----------------------------------------------------------------------------------------------------------
# mnist5k and digits
# ----------------------------------------------------------------------------------------------------------


def test_mnist5k_split_is_stratified_and_deterministic():
    np.random.seed(1)
    torch.manual_seed(1)
    a = load_data("mnist5k", augment=False)
    np.random.seed(2)
    torch.manual_seed(2)
    b = load_data("mnist5k")
    assert isinstance(a, DataBundle)
    assert (a.name, a.num_classes, a.in_channels, a.image_size) == ("mnist5k", 10, 1, 28)
    assert len(a.train) == 4000 and len(a.test) == 1000
    assert np.bincount(np.asarray(a.test.targets), minlength=10).tolist() == [100] * 10
    assert np.bincount(np.asarray(a.train.targets), minlength=10).tolist() == [400] * 10
    # The split ignores the global RNG state: same images, same labels, same order.
    assert torch.equal(a.test.targets, b.test.targets) and torch.equal(a.test.images, b.test.images)
    assert torch.equal(a.train.images, b.train.images)
    x, y = a.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    # Normalised with the MNIST statistics: background pixels map to -mean/std.
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_mnist5k_augmentation_random_only_when_asked():
    plain = load_data("mnist5k", augment=False, limit_train=10)
    first = plain.train[3][0]
    assert all(torch.equal(first, plain.train[3][0]) for _ in range(5))
    aug = load_data("mnist5k", limit_train=10)
    torch.manual_seed(0)
    draws = [aug.train[3][0] for _ in range(12)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert all(d.shape == (1, 28, 28) for d in draws)
    # The test set never augments.
    assert torch.equal(aug.test[0][0], aug.test[0][0])


def test_limits_are_stratified_and_deterministic():
    a = load_data("mnist5k", limit_train=50, limit_test=20)
    b = load_data("mnist5k", limit_train=50, limit_test=20)
    assert len(a.train) == 50 and len(a.test) == 20
    assert np.bincount(np.asarray(a.train.targets), minlength=10).tolist() == [5] * 10
    assert np.bincount(np.asarray(a.test.targets), minlength=10).tolist() == [2] * 10
    assert torch.equal(a.train.images, b.train.images)
    big = load_data("mnist5k", limit_train=10**6)
    assert len(big.train) == 4000


def test_digits_shapes_range_and_split():
    d = load_data("digits")
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 1, 8)
    assert len(d.train) + len(d.test) == 1797
    assert abs(len(d.test) - 0.2 * 1797) < 10
    xs = torch.stack([d.train[i][0] for i in range(len(d.train))])
    assert xs.shape[1:] == (1, 8, 8) and xs.min() >= 0 and xs.max() <= 1 and xs.max() == 1
    counts = np.bincount(np.asarray(d.test.targets), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # No augmentation at all for digits.
    assert torch.equal(d.train[0][0], d.train[0][0])


# ----------------------------------------------------------------------------------------------------------
# make_loaders
# ----------------------------------------------------------------------------------------------------------


def test_make_loaders_batches_order_and_reproducibility():
    bundle = load_data("digits", limit_train=100, limit_test=45)
    train, test = make_loaders(bundle, 16, seed=3)
    batches = list(train)
    assert [len(y) for _, y in batches] == [16] * 6 + [4]  # drop_last=False
    assert batches[0][0].shape == (16, 1, 8, 8) and batches[0][1].dtype == torch.int64
    test_labels = torch.cat([y for _, y in test])
    assert torch.equal(test_labels, torch.as_tensor(bundle.test.targets))  # test order is preserved
    again, _ = make_loaders(bundle, 16, seed=3)
    other, _ = make_loaders(bundle, 16, seed=4)
    order = torch.cat([y for _, y in batches])
    assert torch.equal(order, torch.cat([y for _, y in again]))
    assert not torch.equal(order, torch.cat([y for _, y in other]))
    assert sorted(order.tolist()) == sorted(np.asarray(bundle.train.targets).tolist())


def test_make_loaders_with_worker_process():
    bundle = load_data("digits", limit_train=40, limit_test=10)
    train, test = make_loaders(bundle, 8, workers=1)
    assert sum(len(y) for _, y in train) == 40
    assert sum(len(y) for _, y in test) == 10


def test_make_loaders_distributed(tmp_path):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        bundle = load_data("digits", limit_train=30, limit_test=12)
        train, test = make_loaders(bundle, 8, distributed=True, seed=1)
        assert isinstance(train.sampler, DistributedSampler) and isinstance(test.sampler, DistributedSampler)
        train.sampler.set_epoch(0)
        epoch0 = torch.cat([y for _, y in train])
        train.sampler.set_epoch(1)
        epoch1 = torch.cat([y for _, y in train])
        assert len(epoch0) == 30 and sorted(epoch0.tolist()) == sorted(epoch1.tolist())
        assert torch.equal(torch.cat([y for _, y in test]), torch.as_tensor(bundle.test.targets))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"batch_size": 4, "workers": -1}])
def test_make_loaders_rejects_bad_arguments(kw):
    bundle = load_data("digits", limit_train=10, limit_test=10)
    with pytest.raises(UserError):
        make_loaders(bundle, **kw)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST / IDX
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_loads(tmp_path, gz):
    folder = write_idx_set(tmp_path / "fm", gz=gz)
    b = load_data(f"fashion-mnist:{folder}", augment=False)
    assert b.name == f"fashion-mnist:{folder}"
    assert (len(b.train), len(b.test), b.num_classes, b.in_channels, b.image_size) == (30, 20, 10, 1, 28)
    assert [b.train[i][1] for i in range(12)] == [i % 10 for i in range(12)]
    assert [b.test[i][1] for i in range(3)] == [9, 8, 7]
    x, _ = b.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, -0.2860 / 0.3530))  # all-black test images, normalised
    raw = np.random.default_rng(5).integers(0, 256, (30, 28, 28))[0]
    assert torch.allclose(b.train[0][0][0], (torch.tensor(raw, dtype=torch.float32) / 255 - 0.2860) / 0.3530, atol=1e-5)


def test_idx_augmentation_and_limit(tmp_path):
    folder = write_idx_set(tmp_path / "fm", gz=True)
    b = load_data(f"fashion-mnist:{folder}", limit_train=10, limit_test=5)
    assert len(b.train) == 10 and len(b.test) == 5
    assert sorted(b.train[i][1] for i in range(10)) == list(range(10))
    torch.manual_seed(0)
    draws = [b.train[0][0] for _ in range(12)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_idx_missing_folder_and_files(tmp_path):
    expect_user_error(["not found", "train-images-idx3-ubyte"], f"fashion-mnist:{tmp_path / 'nope'}")
    folder = write_idx_set(tmp_path / "fm", gz=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    expect_user_error(["lacks t10k-labels-idx1-ubyte", "train-images-idx3-ubyte[.gz]"], f"fashion-mnist:{folder}")


def test_idx_bad_magic(tmp_path):
    folder = write_idx_set(tmp_path / "fm", gz=False)
    # A label file where an image file belongs: wrong magic number.
    (folder / "train-images-idx3-ubyte").write_bytes((folder / "train-labels-idx1-ubyte").read_bytes())
    expect_user_error(["bad magic number 0x00000801", "0x00000803"], f"fashion-mnist:{folder}")


def test_idx_truncated_plain_and_gzip(tmp_path):
    plain = write_idx_set(tmp_path / "plain", gz=False)
    data = (plain / "train-images-idx3-ubyte").read_bytes()
    (plain / "train-images-idx3-ubyte").write_bytes(data[: len(data) - 100])
    expect_user_error(["truncated IDX file"], f"fashion-mnist:{plain}")
    (plain / "train-images-idx3-ubyte").write_bytes(data[:10])
    expect_user_error(["truncated IDX header"], f"fashion-mnist:{plain}")

    zipped = write_idx_set(tmp_path / "gz", gz=True)
    gz_data = (zipped / "t10k-images-idx3-ubyte.gz").read_bytes()
    (zipped / "t10k-images-idx3-ubyte.gz").write_bytes(gz_data[: len(gz_data) // 2])
    expect_user_error(["truncated gzip"], f"fashion-mnist:{zipped}")


def test_idx_counts_must_match(tmp_path):
    folder = write_idx_set(tmp_path / "fm", gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(29) % 10, IDX_LABELS_MAGIC))
    expect_user_error(["30 images but 29 labels"], f"fashion-mnist:{folder}")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_PATH), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    b = load_data("fashion-mnist", limit_train=100)
    assert b.name == "fashion-mnist"
    assert len(b.train) == 100 and len(b.test) == 10000
    assert np.bincount(np.asarray(b.test.targets), minlength=10).tolist() == [1000] * 10
    assert np.bincount(np.asarray(b.train.targets), minlength=10).tolist() == [10] * 10
    x, y = b.test[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10
    xs = torch.stack([b.test[i][0] for i in range(0, 10000, 10)])
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


# ----------------------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------------------


def test_cifar10_folder_and_parent(tmp_path):
    folder = write_cifar10(tmp_path)
    for given in (tmp_path, folder):
        b = load_data(f"cifar10:{given}", augment=False)
        assert b.name == f"cifar10:{given}"
        assert (len(b.train), len(b.test), b.num_classes, b.in_channels, b.image_size) == (30, 10, 10, 3, 32)
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    # Pixel layout: each row is R plane, G plane, B plane; check against the raw bytes written.
    raw = torch.tensor(tiny_images(6, 1)[0], dtype=torch.float32).view(3, 32, 32) / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std, atol=1e-5)
    assert [b.test[i][1] for i in range(10)] == list(range(10))


def test_cifar10_augmentation(tmp_path):
    write_cifar10(tmp_path)
    b = load_data(f"cifar10:{tmp_path}", limit_train=10)
    assert len(b.train) == 10
    torch.manual_seed(0)
    draws = [b.train[0][0] for _ in range(10)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def test_cifar100(tmp_path):
    write_cifar100(tmp_path)
    b = load_data(f"cifar100:{tmp_path}", limit_test=50)
    assert (len(b.train), len(b.test), b.num_classes, b.in_channels, b.image_size) == (200, 50, 100, 3, 32)
    assert b.test[0][0].shape == (3, 32, 32)
    train, _ = make_loaders(b, 64)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and int(y.max()) < 100


def test_cifar_missing_folder_and_file(tmp_path):
    expect_user_error(["not found", "data_batch_1", "test_batch", "batches.meta"], f"cifar10:{tmp_path / 'absent'}")
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    expect_user_error(["lacks data_batch_3", "data_batch_5", "batches.meta"], f"cifar10:{tmp_path}")
    expect_user_error(["lacks train, test, meta"], f"cifar100:{tmp_path}")


def test_cifar_foreign_and_truncated_files(tmp_path):
    folder = write_cifar10(tmp_path)
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(b"this is a JPEG, honest\n" * 10)
    expect_user_error(["data_batch_2", "expected an official CIFAR python batch"], f"cifar10:{folder}")
    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    expect_user_error(["data_batch_2", "truncated"], f"cifar10:{folder}")
    (folder / "data_batch_2").write_bytes(b"")
    expect_user_error(["data_batch_2"], f"cifar10:{folder}")


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, "expected a uint8 array of shape (N, 3072)"),
        ({b"data": np.zeros((4, 3072), dtype=np.float32), b"labels": [0, 1, 2, 3]}, "expected a uint8 array"),
        ({b"data": tiny_images(4, 0), b"labels": [0, 1, 2]}, "expected one label per image"),
        ({b"data": tiny_images(4, 0), b"labels": [0, 1, 2, 10]}, "expected 0..9"),
        ({b"pixels": tiny_images(4, 0)}, "expected a dict with b'data'"),
        ([1, 2, 3], "expected a dict with b'data'"),
    ],
)
def test_cifar_wrong_contents(tmp_path, payload, fragment):
    folder = write_cifar10(tmp_path)
    py2_pickle(payload, folder / "data_batch_4")
    expect_user_error(["data_batch_4", fragment], f"cifar10:{folder}")


class _RunsCommand:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _OpensFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("make_evil, fragment", [(_RunsCommand, "system"), (_OpensFile, "io.open")])
def test_hostile_pickle_is_refused(tmp_path, make_evil, fragment):
    folder = write_cifar10(tmp_path / "c")
    target = tmp_path / "pwned"
    py2_pickle({b"data": make_evil(target), b"labels": [0]}, folder / "data_batch_1")
    msg = expect_user_error(["data_batch_1", "refused global", fragment, "not loading it"], f"cifar10:{folder}")
    assert "genuine CIFAR" in msg
    assert not target.exists()
    # Control: the payload is live, an ordinary unpickler does create the file.
    control = tmp_path / "control"
    py2_pickle(make_evil(control), tmp_path / "control.pkl")
    result = pickle.loads((tmp_path / "control.pkl").read_bytes(), encoding="latin-1")
    if hasattr(result, "close"):
        result.close()
    assert control.exists()
    # The same payload in the meta file, which is read first.
    py2_pickle(make_evil(target), folder / "batches.meta")
    expect_user_error(["batches.meta", "refused global"], f"cifar10:{folder}")
    assert not target.exists()


def test_safe_unpickler_allow_list_is_exact():
    import io

    for spelling in ("numpy.core.multiarray", "numpy._core.multiarray"):
        buf = io.BytesIO()
        Py2StylePickler(buf, spelling).dump(np.arange(3, dtype=np.uint8))
        assert SafeUnpickler(io.BytesIO(buf.getvalue()), encoding="bytes").load().tolist() == [0, 1, 2]
    # Python 3's own protocol-2 output routes bytes through _codecs.encode (allowed: text to bytes, no effects),
    # so CIFAR folders re-saved by Python 3 load too.
    loaded = SafeUnpickler(io.BytesIO(pickle.dumps(np.arange(3, dtype=np.uint8), protocol=2)), encoding="bytes").load()
    assert loaded.tolist() == [0, 1, 2]
    refused = [("numpy", "save"), ("numpy", "ndarray.tofile"), ("numpy.core.multiarray", "scalar"), ("os", "system"),
               ("_codecs", "decode"), ("builtins", "eval")]
    for module, name in refused:
        hostile = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00."
        with pytest.raises(pickle.UnpicklingError, match="refused global"):
            SafeUnpickler(io.BytesIO(hostile)).load()


# ----------------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------------


def test_imagefolder_loads(tmp_path):
    root = write_image_tree(tmp_path / "imgs")
    b = load_data(f"imagefolder:{root}")
    assert (b.num_classes, b.in_channels, b.image_size) == (3, 3, 224)
    assert len(b.train) == 9 and len(b.test) == 6
    x, y = b.train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    assert torch.equal(b.test[1][0], b.test[1][0])  # eval transform is deterministic
    plain = load_data(f"imagefolder:{root}", augment=False, limit_train=3)
    assert len(plain.train) == 3 and sorted(plain.train[i][1] for i in range(3)) == [0, 1, 2]
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    train, test = make_loaders(b, 4)
    xb, yb = next(iter(test))
    assert xb.shape == (4, 3, 224, 224) and yb.tolist() == [0, 0, 1, 1]


def test_imagefolder_errors(tmp_path):
    expect_user_error(["not found", "PATH/train/<class>"], f"imagefolder:{tmp_path / 'none'}")

    root = write_image_tree(tmp_path / "a")
    for f in (root / "val").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((root / "val").iterdir()):
        d.rmdir()
    expect_user_error(["has no class folders", "PATH/val/<class>"], f"imagefolder:{root}")
    (root / "val").rmdir()
    expect_user_error(["has no val/ folder"], f"imagefolder:{root}")

    root = write_image_tree(tmp_path / "b")
    (root / "train").rename(root / "training")
    expect_user_error(["has no train/ folder"], f"imagefolder:{root}")

    root = write_image_tree(tmp_path / "c")
    (root / "train" / "empty").mkdir()
    (root / "train" / "notes").mkdir()
    (root / "train" / "notes" / "readme.txt").write_text("not an image")
    expect_user_error(["class folders without images", "empty, notes"], f"imagefolder:{root}")

    root = write_image_tree(tmp_path / "d")
    (root / "val" / "eel").rename(root / "val" / "emu")
    expect_user_error(["class folders differ", "eel", "emu"], f"imagefolder:{root}")


def test_imagefolder_unreadable_image(tmp_path):
    root = write_image_tree(tmp_path / "imgs")
    (root / "val" / "cat" / "0.png").write_bytes(b"not a png")
    b = load_data(f"imagefolder:{root}")
    with pytest.raises(UserError, match="not a readable image"):
        b.test[0]


# ----------------------------------------------------------------------------------------------------------
# Subset helpers
# ----------------------------------------------------------------------------------------------------------


def test_limit_helpers_on_generic_datasets():
    from torch.utils.data import TensorDataset

    from regprune.data.base import LabelledSubset, limit_indices, take_subset

    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    chosen = limit_indices(labels, 10, 5)
    assert chosen.tolist() == sorted(chosen.tolist())
    assert np.bincount(labels[chosen], minlength=3).tolist() == [3, 2, 0]
    assert limit_indices(None, 10, 4).tolist() == [0, 1, 2, 3]

    plain = TensorDataset(torch.arange(10))
    assert [int(plain[i][0]) for i in range(3)] == [0, 1, 2]
    assert len(take_subset(plain, 3)) == 3 and take_subset(plain, 30) is plain

    plain.targets = labels.tolist()  # type: ignore[attr-defined]
    sub = take_subset(plain, 5)
    assert isinstance(sub, LabelledSubset) and sub.targets == labels[chosen].tolist()
    assert len(take_subset(sub, 2)) == 2
