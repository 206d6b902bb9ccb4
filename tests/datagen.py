"""Writers of tiny datasets in the real on-disk formats that tract.data reads (``import datagen`` in any test).

Each writer returns ``{split: (images, labels)}``: the uint8 pixel arrays it wrote (N, H, W, 3) or (N, H, W) and the
zero-based labels, so that tests can compare what a loader gives back with what was written. Images of one class
share a base colour plus noise, so a model can learn from them. JPEG-based formats (Flowers, Cars) are written at
quality 100 but stay lossy: compare their pixels with a tolerance.

torchvision checks the md5 of the real CIFAR and Flowers-102 files; a test reading these writers' CIFAR/Flowers files
must bypass that one check with ``skip_md5_checks(monkeypatch)`` (in-process only, so end-to-end tests that run
train.py as a subprocess should use FOLDER or FMNIST data).
"""
import gzip
import os
import pickle
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

Split = Tuple[np.ndarray, np.ndarray]


def _images(rng: np.random.Generator, labels: np.ndarray, shape: Tuple[int, ...], num_classes: int) -> np.ndarray:
    """Class-coloured noisy images, one per label."""
    colour_shape = (num_classes,) + ((shape[-1],) if len(shape) == 3 else ())
    base = rng.integers(30, 226, size=colour_shape)
    noise = rng.integers(-25, 26, size=(len(labels),) + shape)
    base = base[labels].reshape((len(labels), 1, 1) + colour_shape[1:])
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """n labels covering as many classes as n allows, in random order."""
    return rng.permutation(np.arange(n) % num_classes)


def write_cifar(root, num_classes: int = 10, n_train: int = 10, n_test: int = 5, seed: int = 0) -> Dict[str, Split]:
    """Write CIFAR-10 (ROOT/cifar-10-batches-py) or CIFAR-100 (ROOT/cifar-100-python) as the python pickles."""
    if num_classes not in (10, 100):
        raise ValueError("CIFAR has 10 or 100 classes")
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = _labels(rng, n, num_classes)
        written[split] = (_images(rng, labels, (32, 32, 3), num_classes), labels)

    def record(images: np.ndarray, batch_label: str, **extra) -> dict:
        # CIFAR rows are the red, green, then blue planes of a 32x32 image, each row-major.
        return {"batch_label": batch_label, "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                "filenames": [f"img_{i}.png" for i in range(len(images))], **extra}

    if num_classes == 10:
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        images, labels = written["train"]
        for i, part in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
            _pickle(folder / f"data_batch_{i}",
                    record(images[part], f"training batch {i} of 5", labels=labels[part].tolist()))
        images, labels = written["test"]
        _pickle(folder / "test_batch", record(images, "testing batch 1 of 1", labels=labels.tolist()))
        _pickle(folder / "batches.meta", {"label_names": [f"class_{c}" for c in range(10)],
                                          "num_cases_per_batch": 10000, "num_vis": 3072})
    else:
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            images, labels = written[split]
            _pickle(folder / split, record(images, f"{split}ing batch 1 of 1", fine_labels=labels.tolist(),
                                           coarse_labels=(labels // 5).tolist()))
        _pickle(folder / "meta", {"fine_label_names": [f"fine_{c}" for c in range(100)],
                                  "coarse_label_names": [f"coarse_{c}" for c in range(20)]})
    return written


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: 0, 0, type 0x08 (unsigned byte), number of dimensions, big-endian int32 sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fmnist(root, n_train: int = 20, n_test: int = 10, gz: bool = True, layout: str = "flat",
                 seed: int = 0) -> Dict[str, Split]:
    """Write Fashion-MNIST's IDX files flat in ROOT (Debian's layout) or in ROOT/FashionMNIST/raw (torchvision's)."""
    if layout not in ("flat", "torchvision"):
        raise ValueError("layout is 'flat' or 'torchvision'")
    folder = Path(root) if layout == "flat" else Path(root) / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        labels = _labels(rng, n, 10)
        images = _images(rng, labels, (28, 28), 10)
        written[split] = (images, labels)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            name = folder / f"{prefix}-{kind}"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(data)
            else:
                name.write_bytes(data)
    return written


def _write_jpgs(folder: Path, names, images: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, img in zip(names, images):
        Image.fromarray(img).save(folder / name, quality=100, subsampling=0)  # near-lossless: tests compare pixels


def write_flowers(root, n_train: int = 4, n_val: int = 3, n_test: int = 5, size: Tuple[int, int] = (40, 48),
                  seed: int = 0) -> Dict[str, Split]:
    """Write Flowers-102 as torchvision reads it: ROOT/flowers-102/{jpg/image_00001.jpg..., imagelabels.mat, setid.mat}.

    Image ids are shuffled across the splits as in the real set.mat. Each split needs at least 2 images (scipy's
    squeeze_me turns a 1-element id list into a scalar, which the real files never have). ``size`` is (H, W).
    """
    from scipy.io import savemat

    if min(n_train, n_val, n_test) < 2:
        raise ValueError("each Flowers-102 split needs at least 2 images")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "flowers-102"
    ids = rng.permutation(n_train + n_val + n_test) + 1
    split_ids = dict(zip(("train", "val", "test"), np.split(ids, [n_train, n_train + n_val])))
    labels = _labels(rng, len(ids), 102)  # labels[id - 1] is the class of image id
    images = _images(rng, labels, size + (3,), 102)
    _write_jpgs(folder / "jpg", [f"image_{i:05d}.jpg" for i in range(1, len(ids) + 1)], images)
    savemat(folder / "imagelabels.mat", {"labels": (labels + 1)[None, :].astype(np.uint8)})
    savemat(folder / "setid.mat", {key: split_ids[split][None, :].astype(np.uint16)
                                   for key, split in (("trnid", "train"), ("valid", "val"), ("tstid", "test"))})
    return {split: (images[i - 1], labels[i - 1]) for split, i in split_ids.items()}


def write_cars(root, n_train: int = 6, n_test: int = 4, num_classes: int = 196, size: Tuple[int, int] = (36, 52),
               seed: int = 0) -> Dict[str, Split]:
    """Write Stanford Cars as torchvision reads it, under ROOT/stanford_cars/.

    Files: devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/*.jpg,
    cars_test/*.jpg (the folders hold the images directly, as torchvision expects).
    Annotations are MATLAB struct arrays with the real fields (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based),
    fname). Each split needs at least 2 images. ``size`` is (H, W).
    """
    from scipy.io import savemat

    if min(n_train, n_test) < 2:
        raise ValueError("each Stanford Cars split needs at least 2 images")
    rng = np.random.default_rng(seed)
    base = Path(root) / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.empty((1, num_classes), dtype=object)
    names[0, :] = [f"Make Model {c} 2012" for c in range(num_classes)]
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    written = {}
    for split, n, annos in (("train", n_train, base / "devkit" / "cars_train_annos.mat"),
                            ("test", n_test, base / "cars_test_annos_withlabels.mat")):
        labels = _labels(rng, n, num_classes)
        images = _images(rng, labels, size + (3,), num_classes)
        fnames = [f"{i:05d}.jpg" for i in range(1, n + 1)]
        _write_jpgs(base / f"cars_{split}", fnames, images)
        records = np.empty((1, n), dtype=[(f, object) for f in fields])
        for i, (label, fname) in enumerate(zip(labels, fnames)):
            records[0, i] = (np.uint16(1), np.uint16(1), np.uint16(size[1]), np.uint16(size[0]),
                             np.uint8(label + 1), fname)
        savemat(annos, {"annotations": records})
        written[split] = (images, labels)
    return written


def skip_md5_checks(monkeypatch) -> None:
    """Let torchvision accept files these writers made: its md5 check of the real CIFAR/Flowers downloads becomes a
    plain existence check. Nothing else of torchvision's loading is changed."""
    import torchvision.datasets.cifar
    import torchvision.datasets.flowers102

    def exists(fpath, md5=None) -> bool:
        return os.path.isfile(fpath)

    for module in (torchvision.datasets.cifar, torchvision.datasets.flowers102):
        monkeypatch.setattr(module, "check_integrity", exists)
