"""Datasets, transforms and the repeated-augmentation sampler of train.py and finetune.py.

Every dataset is read from a folder the user already has; nothing is fetched unless ``download=True``
(``--download``). Layouts (ROOT is ``--data-path``):

- ``IMNET``, ``FOLDER``: DeiT's ImageFolder layout, ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``.
- ``CIFAR10`` / ``CIFAR100``: torchvision's, ``ROOT/cifar-10-batches-py/`` / ``ROOT/cifar-100-python/``.
- ``FMNIST``: the four IDX files (``.gz`` or not) flat in ROOT (Debian's ``dataset-fashion-mnist`` layout, the default
  ROOT) or in torchvision's ``ROOT/FashionMNIST/raw/``.
- ``FLOWERS``: torchvision's Flowers102, ``ROOT/flowers-102/{jpg/, imagelabels.mat, setid.mat}``.
- ``CARS``: torchvision's StanfordCars, ``ROOT/stanford_cars/...`` (see ``CARS_LAYOUT``); it cannot be downloaded.

timm, torchvision and scipy are imported inside the functions so that ``import tract`` needs torch alone.
"""
import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from tract.config import DATASETS
from tract.errors import ConfigError, DatasetError
from tract.runtime import default_num_workers
from tract.safe_files import special_kind

__all__ = ["FMNIST_DEBIAN_ROOT", "read_image", "build_dataset", "check_dataset",
           "build_transform", "default_mean_std", "RASampler", "FashionMNISTIDX", "SeededBatchSampler",
           "SeededBatches", "DeviceLoader", "TrainData", "image_size", "build_train_data", "eval_interpolation",
           "RANDOM_INTERPOLATIONS"]

FMNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"

# timm's constants, written out so that the signature of build_transform does not import timm.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_CIFAR_FILES = {
    "CIFAR10": ("cifar-10-batches-py",
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta")),
    "CIFAR100": ("cifar-100-python", ("train", "test", "meta")),
}
_FMNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
_FLOWERS_FILES = ("jpg/", "imagelabels.mat", "setid.mat")
_CARS_FILES = ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat", "cars_test_annos_withlabels.mat", "cars_train/",
               "cars_test/")
CARS_LAYOUT = """ROOT/stanford_cars/
    devkit/cars_meta.mat
    devkit/cars_train_annos.mat
    cars_test_annos_withlabels.mat
    cars_train/00001.jpg ...  (the training images, directly in this folder)
    cars_test/00001.jpg ...   (the test images, directly in this folder)"""
CARS_SOURCE = ("Stanford's download links are dead and torchvision cannot fetch the dataset. Get the images and "
               "devkit from a Kaggle mirror (search Kaggle for \"stanford-cars-dataset\") and the labelled test "
               "annotations from the Kaggle dataset \"cars_test_annos_withlabels.mat\" (the devkit's "
               "cars_test_annos.mat has no labels), then arrange them as above")

_LAYOUTS = {
    "IMNET": "ROOT/train/<class>/<images> and ROOT/val/<class>/<images> (DeiT's ImageFolder layout; ImageNet's "
             "val/ must be sorted into its 1000 class folders)",
    "FOLDER": "ROOT/train/<class>/<images> and ROOT/val/<class>/<images>, the same class folders in both",
    "CIFAR10": "ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (torchvision's layout)",
    "CIFAR100": "ROOT/cifar-100-python/{train, test, meta} (torchvision's layout)",
    "FMNIST": "the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
              "t10k-labels-idx1-ubyte (each may be .gz) either directly in ROOT (Debian's dataset-fashion-mnist "
              f"layout, the default ROOT {FMNIST_DEBIAN_ROOT}) or in ROOT/FashionMNIST/raw/ (torchvision's layout)",
    "FLOWERS": "ROOT/flowers-102/{jpg/image_00001.jpg..., imagelabels.mat, setid.mat} (torchvision's layout)",
    "CARS": CARS_LAYOUT,
}
_DOWNLOADABLE = ("CIFAR10", "CIFAR100", "FMNIST", "FLOWERS")
# The datasets whose files torchvision checks against the official release's MD5 checksums when it reads them
_CHECKSUMMED = ("CIFAR10", "CIFAR100", "FLOWERS")
# --train-interpolation random: timm's RandomResizedCropAndInterpolation draws one of these per image
RANDOM_INTERPOLATIONS = ("bilinear", "bicubic")


def read_image(path: str):
    """Open an image file as PIL (ImageFolder's loader), or raise DatasetError naming the file."""
    from PIL import Image

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO planted in the folder must not hang the loader
    except OSError as e:
        raise DatasetError(f"cannot read image {path} ({e.strerror}): replace or delete the file") from None
    kind = special_kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise DatasetError(f"cannot read image {path} (a {kind}, not a file): replace or delete the file")
    try:
        with os.fdopen(fd, "rb") as f:
            image = Image.open(f)
            image.load()
            return image.convert("RGB") if image.mode not in ("RGB", "L") else image
    except Image.DecompressionBombError as e:  # PIL refuses more than twice Image.MAX_IMAGE_PIXELS before decoding
        raise DatasetError(f"cannot read image {path}: {e}: replace the file with a smaller image or delete it "
                           "(PIL's limit, Image.MAX_IMAGE_PIXELS, guards against decompression bombs)") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated, empty and foreign files
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e}): replace or delete the file") from None


def _fail(name: str, root, problem: str, fix: str) -> DatasetError:
    return DatasetError(f"{name} dataset at {root}: {problem}.\nExpected layout: {_LAYOUTS[name]}\nFix: {fix}.")


def _missing(base: Path, entries: Sequence[str]) -> List[str]:
    """The entries (a trailing '/' marks a folder) that are not under base."""
    return [e for e in entries if not ((base / e).is_dir() if e.endswith("/") else (base / e).is_file())]


def _fetch_fix(name: str, root, subfolder: Optional[str] = None) -> str:
    """The fix to suggest for files that are missing: download them, or point at the right folder."""
    fix = (f"pass --download to fetch {name} into {root}" if name in _DOWNLOADABLE
           else "put the files in place")
    if subfolder and Path(root).name == subfolder:
        fix += f", or pass the parent folder {Path(root).parent} (ROOT is the folder that holds {subfolder}/)"
    return fix


def _class_folders(split_dir: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _holds_image(folder: Path) -> bool:
    """Whether a class folder holds at least one file ImageFolder reads (by its extension, anywhere below)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(folder, followlinks=True) for f in files)


def _fmnist_files(root: Path, train: bool) -> Optional[Tuple[Path, Path]]:
    """(images, labels) of one split in the first layout that holds all four files, or None."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        found = {}
        for split in (True, False):
            for stem in _FMNIST_FILES[split]:
                path = next((folder / f for f in (stem, stem + ".gz") if (folder / f).is_file()), None)
                if path is None:
                    break
                found[stem] = path
        if len(found) == 4:
            images, labels = _FMNIST_FILES[train]
            return found[images], found[labels]
    return None


def check_dataset(name: str, root: Optional[str], *, download: bool = False,
                  splits: Tuple[str, str] = ("train", "val")) -> None:
    """Cheap up-front check that a dataset's files and folders are where build_dataset will look; raises DatasetError.

    It lists folders and tests that files exist, without reading them, so it can run before a model is built or any
    output is written. With ``download=True`` a dataset torchvision can fetch is not required to be present yet.
    ``splits``: the folder names of an ImageFolder's training and evaluation splits (``--train-split``/``--val-split``).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "FMNIST":
        _check_fmnist(root, download)
        return
    if not root:
        raise DatasetError(f"{name} needs a dataset root: pass --data-path ROOT, where {_LAYOUTS[name]}")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise _fail(name, root, "the root is a file, not a folder", "pass the dataset folder as --data-path")
    if name in ("IMNET", "FOLDER"):
        _check_image_folder(name, root, path, splits)
    elif download and name in _DOWNLOADABLE:
        return
    elif name in _CIFAR_FILES:
        subfolder, files = _CIFAR_FILES[name]
        missing = _missing(path / subfolder, files)
        if missing:
            raise _fail(name, root, f"missing {', '.join(subfolder + '/' + m for m in missing)}",
                        _fetch_fix(name, root, subfolder))
    elif name == "FLOWERS":
        missing = _missing(path / "flowers-102", _FLOWERS_FILES)
        if missing:
            raise _fail(name, root, f"missing {', '.join('flowers-102/' + m for m in missing)}",
                        _fetch_fix(name, root, "flowers-102"))
    elif name == "CARS":
        missing = _missing(path / "stanford_cars", _CARS_FILES)
        if missing:
            fix = CARS_SOURCE + (f"; or pass the parent folder {path.parent} as --data-path"
                                 if path.name == "stanford_cars" else "")
            raise _fail(name, root, f"missing {', '.join('stanford_cars/' + m for m in missing)}", fix)


def _check_image_folder(name: str, root: str, path: Path, splits: Tuple[str, str] = ("train", "val")) -> None:
    classes = {}
    for split in splits:
        split_dir = path / split
        if not split_dir.is_dir():
            found = sorted(e.name + "/" for e in os.scandir(path) if e.is_dir()) if path.is_dir() else []
            raise _fail(name, root, f"no {split}/ folder" + (f" (it holds {', '.join(found[:8])})" if found else ""),
                        f"point --data-path at the folder holding {splits[0]}/ and {splits[1]}/, or name the "
                        "folders with --train-split NAME --val-split NAME")
        classes[split] = _class_folders(split_dir)
        if not classes[split]:
            raise _fail(name, root, f"{split}/ holds no class folders (images must sit in {split}/<class>/)",
                        "sort the images into one folder per class (ImageNet's flat val/ is sorted by the usual "
                        "valprep.sh script)")
    train, val = splits
    if classes[train] != classes[val]:
        only_train = sorted(set(classes[train]) - set(classes[val]))[:5]
        only_val = sorted(set(classes[val]) - set(classes[train]))[:5]
        raise _fail(name, root, f"{train}/ and {val}/ have different class folders ({len(classes[train])} vs "
                    f"{len(classes[val])}; only in {train}/: {only_train}, only in {val}/: {only_val})",
                    f"give {val}/ exactly the class folders of {train}/, or labels would not match")


def _check_fmnist(root: Optional[str], download: bool) -> None:
    path = Path(root or FMNIST_DEBIAN_ROOT).expanduser()
    if _fmnist_files(path, True) is not None:
        return
    if root is None:
        raise _fail("FMNIST", FMNIST_DEBIAN_ROOT, "the Debian package's files are not there",
                    "install them (apt-get install dataset-fashion-mnist), or pass --data-path DIR --download to "
                    "fetch them into a folder of yours")
    if not download:
        raise _fail("FMNIST", root, "the four IDX files are not all there", _fetch_fix("FMNIST", root))


class _ConvertMode:
    """PIL image -> the mode the model's input channels need (picklable, for DataLoader workers)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file (unsigned bytes, gzipped or not) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s) (bad header): "
                           "the file is damaged or not Fashion-MNIST; fetch it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise DatasetError(f"{path} holds {body.size} bytes of data where its header promises {shape}: the file is "
                           "truncated or damaged; fetch it again")
    return body.reshape(shape)


class FashionMNISTIDX(Dataset):
    """Fashion-MNIST read from its IDX files (gzipped or not, in any folder, read-only is fine) as PIL 'L' images."""

    classes = _FMNIST_CLASSES

    def __init__(self, images: Path, labels: Path, transform: Optional[Callable] = None):
        self.data = _read_idx(Path(images), 3)
        self.targets = _read_idx(Path(labels), 1).astype(np.int64)
        if len(self.data) != len(self.targets):
            raise DatasetError(f"{images} holds {len(self.data)} images but {labels} holds {len(self.targets)} "
                               "labels: the files do not belong together; fetch them again")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.data[index], mode="L")
        return (self.transform(img) if self.transform else img), int(self.targets[index])


def build_dataset(name: str, root: Optional[str], train: bool, transform: Optional[Callable] = None, *,
                  download: bool = False, in_chans: int = 3, split: Optional[str] = None) -> Tuple[Dataset, int]:
    """Build the train (``train=True``) or evaluation split of a dataset; returns ``(dataset, num_classes)``.

    Images reach ``transform`` as PIL images in mode 'RGB' for ``in_chans=3`` (grayscale data is replicated) and 'L'
    for ``in_chans=1`` (colour data is converted). The evaluation split is ImageFolder's val/, the test set of CIFAR,
    Fashion-MNIST and Cars, and the test split of Flowers-102, whose training set is its official train + val splits
    as is standard for transfer learning. Nothing is downloaded unless ``download=True``. ``split``: the folder of an
    ImageFolder dataset (default ``train`` / ``val``).
    """
    if in_chans not in (1, 3):
        raise DatasetError(f"in_chans={in_chans}: image datasets give 1 (grayscale) or 3 (RGB) channels; pass "
                           "--in-chans 1 or 3")
    split = split or ("train" if train else "val")
    check_dataset(name, root, download=download, splits=(split, split))
    from torchvision import datasets, transforms

    convert = _ConvertMode("L" if in_chans == 1 else "RGB")
    transform = transforms.Compose([convert, transform]) if transform is not None else convert
    path = Path(root).expanduser() if root else None
    try:
        if name in ("IMNET", "FOLDER"):
            dataset = datasets.ImageFolder(str(path / split), transform=transform,
                                           loader=read_image)
            return dataset, len(dataset.classes)
        if name == "FMNIST":
            path = path or Path(FMNIST_DEBIAN_ROOT)
            if _fmnist_files(path, train) is None:  # only reached with download=True (check_dataset)
                datasets.FashionMNIST(str(path), train=train, download=True)
            dataset = FashionMNISTIDX(*_fmnist_files(path, train), transform=transform)
            return dataset, len(dataset.classes)
        if name in _CIFAR_FILES:
            cls = datasets.CIFAR10 if name == "CIFAR10" else datasets.CIFAR100
            dataset = cls(str(path), train=train, transform=transform, download=download)
            return dataset, len(dataset.classes)
        if name == "FLOWERS":
            splits = ("train", "val") if train else ("test",)
            parts = [datasets.Flowers102(str(path), split=s, transform=transform, download=download) for s in splits]
            return torch.utils.data.ConcatDataset(parts), len(parts[0].classes)
        dataset = datasets.StanfordCars(str(path), split="train" if train else "test", transform=transform)
        return dataset, len(dataset.classes)
    except DatasetError:
        raise
    except (RuntimeError, OSError) as e:
        if name in ("IMNET", "FOLDER") and "Found no valid file" in str(e):  # ImageFolder: a class without images
            split = path / ("train" if train else "val")
            empty = [str(split / c) for c in _class_folders(split) if not _holds_image(split / c)]
            raise _fail(name, root, f"class folder {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} holds "
                        f"no images ({', '.join(datasets.folder.IMG_EXTENSIONS)})",
                        "add images to it, or remove that class folder from both train/ and val/") from None
        # The layout check passed, so torchvision refused the files' contents (checksum) or a download failed.
        problem, fix = f"torchvision could not read it ({type(e).__name__}: {e})", "delete the damaged files and " \
            "fetch them again" + (" with --download" if name in _DOWNLOADABLE else "")
        if name in _CHECKSUMMED:
            problem = (f"torchvision refused its files: it checks each one against the MD5 checksum of the official "
                       f"release, so a damaged, partial, re-saved or subset copy is refused ({type(e).__name__}: {e})")
            fix += (". For a subset or an edited copy, lay the images out as an image folder (ROOT/train/<class>/, "
                    "ROOT/val/<class>/) and pass --data-set FOLDER, which checks no checksums")
        raise _fail(name, root, problem, fix) from e


def default_mean_std(in_chans: int = 3) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """ImageNet's normalisation for ``in_chans`` channels: timm's 3-channel values, or for 1 channel their ITU-R 601
    luma weighting, the weighting PIL's RGB -> L conversion applies (exact for the mean, an approximation for the std).
    """
    if in_chans == 3:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if in_chans == 1:
        luma = (0.299, 0.587, 0.114)
        return ((sum(w * m for w, m in zip(luma, IMAGENET_DEFAULT_MEAN)),),
                (sum(w * s for w, s in zip(luma, IMAGENET_DEFAULT_STD)),))
    raise ValueError(f"in_chans={in_chans}: image data has 1 (grayscale) or 3 (RGB) channels")


def build_transform(train: bool, input_size: int, *, three_augment: bool = False, simple_random_crop: bool = False,
                    color_jitter: Optional[float] = 0.3, auto_augment: Optional[str] = None, reprob: float = 0.0,
                    remode: str = "pixel", recount: int = 1, eval_crop_ratio: float = 0.875,
                    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                    interpolation: str = "bicubic", use_prefetcher: bool = False) -> Callable:
    """DeiT III's image transform, built by timm's ``create_transform``.

    Train: RandomResizedCrop(scale (0.08, 1)) + horizontal flip, or with ``simple_random_crop`` DeiT's ``--src``
    (Resize + RandomCrop(pad 4, reflect) + flip); then ``three_augment`` (timm's '3a': one of grayscale,
    solarize(128), Gaussian blur radius U(0.1, 2), then ColorJitter) or the RandAugment string ``auto_augment``
    (timm drops colour jitter under RandAugment); normalise; random erasing with probability ``reprob``.
    Eval: Resize(int(input_size / eval_crop_ratio)) + CenterCrop(input_size) + normalise. ``mean``/``std`` have one
    value per input channel (length 1 for ``in_chans=1``). ``interpolation='random'`` (DeiT's and timm's choice): each
    training image resized with bilinear or bicubic at random, evaluation with bicubic (``eval_interpolation``).

    ``use_prefetcher`` (timm's meaning): the transform ends in a uint8 CHW tensor, without normalisation and random
    erasing, which ``DeviceLoader`` does on the device.
    """
    from timm.data import create_transform
    from torchvision import transforms

    mean, std = tuple(mean), tuple(std)
    if not train:
        return create_transform(input_size, is_training=False, crop_pct=eval_crop_ratio,
                                interpolation=eval_interpolation(interpolation), mean=mean, std=std,
                                use_prefetcher=use_prefetcher)
    if three_augment and auto_augment:
        raise ValueError(f"three_augment replaces auto_augment={auto_augment!r}: pass one of them, not both")
    primary, secondary, final = create_transform(
        input_size, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=color_jitter,
        auto_augment="3a" if three_augment else auto_augment, interpolation=interpolation, mean=mean, std=std,
        re_prob=reprob, re_mode=remode, re_count=recount, separate=True, use_prefetcher=use_prefetcher)
    _keep_zero_bit_posterize(secondary.transforms)
    if simple_random_crop:
        from timm.data.transforms import str_to_interp_mode

        resizes = [transforms.Resize(input_size, interpolation=str_to_interp_mode(mode))
                   for mode in (RANDOM_INTERPOLATIONS if interpolation == "random" else (interpolation,))]
        resize = transforms.RandomChoice(resizes) if len(resizes) > 1 else resizes[0]
        primary = transforms.Compose([
            resize,
            transforms.RandomCrop(input_size, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
        ])
    return transforms.Compose(primary.transforms + secondary.transforms + final.transforms)


def eval_interpolation(interpolation: str) -> str:
    """The evaluation's resize interpolation for ``--train-interpolation``: the same; bicubic for 'random' (DeiT)."""
    return "bicubic" if interpolation == "random" else interpolation


def _posterize(img, bits_to_keep: int, **kwargs):
    """timm's posterize, with 0 bits kept giving the black image Pillow < 13 gave (Pillow 13 raises ValueError)."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return posterize(img, bits_to_keep, **kwargs)


def _keep_zero_bit_posterize(augmentations: Sequence[Callable]) -> None:
    """Point the posterize ops of timm's RandAugment / AutoAugment / AugMix at ``_posterize``.

    RandAugment's increasing posterize keeps 4 - int(0.4 m) bits, 0 at magnitude 10, which DeiT III's
    rand-m9-mstd0.5-inc1 reaches with its magnitude noise: on Pillow 13 that would end a run in the data loader.
    """
    for aug in augmentations:
        for op in [*getattr(aug, "ops", []), *(op for sub in getattr(aug, "policy", []) for op in sub)]:
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize


class RASampler(Sampler):
    """DeiT's repeated-augmentation sampler: every index ``num_repeats`` times in a row, dealt round-robin to ranks.

    Consecutive copies of an image land on different ranks, so each rank sees its own augmentation of it. Each rank
    yields ``floor(N // 256 * 256 / num_replicas)`` indices per epoch, as DeiT does; when that is 0 (fewer than 256
    images, or more ranks than 256-blocks) it yields ``ceil(N / num_replicas)`` instead so that tiny data still
    trains. The order depends on ``seed + epoch`` only: call ``set_epoch`` before each epoch.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, num_repeats: int = 3,
                 seed: int = 0):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if num_repeats < 1:
            raise ValueError(f"num_repeats={num_repeats} must be at least 1")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.num_repeats, self.seed, self.epoch = shuffle, num_repeats, seed, 0
        n = len(dataset)
        if n == 0:
            raise ValueError("RASampler got an empty dataset")
        # Enough repeated indices for every rank to take the same number (the list is padded by wrapping around).
        self.num_samples = math.ceil(n * num_repeats / num_replicas)
        self.num_selected_samples = n // 256 * 256 // num_replicas or math.ceil(n / num_replicas)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        indices = order.repeat_interleave(self.num_repeats)
        total = self.num_samples * self.num_replicas
        indices = indices[torch.arange(total) % len(indices)]
        return iter(indices[self.rank::self.num_replicas][:self.num_selected_samples].tolist())

    def __len__(self) -> int:
        return self.num_selected_samples

    def set_epoch(self, epoch: int) -> None:
        """Pick the shuffle of this epoch (the order is a function of seed + epoch)."""
        self.epoch = epoch


class SeededBatchSampler(Sampler):
    """Batches of ``sampler`` whose items carry their batch's seed: ``[(seed, index), ...]`` (see ``SeededBatches``).

    The seed is a function of (``seed``, ``rank``, epoch, batch position) only, so a batch gets the same augmentation
    whichever worker loads it, whether the workers are new or persistent from earlier epochs, and after a resume that
    skips the batches before it. Call ``set_epoch`` before each epoch (it is passed on to ``sampler``).
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, seed: int, rank: int = 0):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the order (the sampler's) and the augmentation seeds of this epoch."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        batches = torch.utils.data.BatchSampler(self.sampler, self.batch_size, self.drop_last)
        for position, batch in enumerate(batches):
            seed = int(np.random.SeedSequence([self.seed, self.rank, self.epoch, position]).generate_state(1)[0])
            yield [(seed, i) for i in batch]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class SeededBatches(Dataset):
    """Wraps a dataset for ``SeededBatchSampler``: seeds python, numpy and torch from the batch's seed, then loads it.

    Only the CPU generator is seeded (transforms run on the CPU): ``torch.manual_seed`` would reseed every CUDA
    generator too. In the main process (``num_workers=0``) the states are put back afterwards, so training's own
    random numbers (mixup, dropout, random erasing on the device) do not depend on the data loading.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Tuple[int, int]]) -> list:
        import random

        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        seed = keys[0][0]
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.default_generator.manual_seed(seed)
        try:
            return [self.dataset[i] for _, i in keys]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class DeviceLoader:
    """timm's PrefetchLoader (the next uint8 batch copied on a side stream, normalised there, one batch ahead) with
    random erasing done on the device as each batch is taken.

    Erasing at take time, not in the prefetch as timm does, keeps its random numbers in the order of the updates, so
    a checkpoint written after update k holds the RNG state the erasing of batch k + 1 starts from (bitwise resume).
    """

    def __init__(self, loader, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 reprob: float = 0.0, remode: str = "pixel", recount: int = 1):
        from timm.data.loader import PrefetchLoader
        from timm.data.random_erasing import RandomErasing

        self.loader = loader
        self.prefetch = PrefetchLoader(loader, mean=tuple(mean), std=tuple(std), channels=len(mean), device=device)
        self.erase = RandomErasing(reprob, mode=remode, max_count=recount, device=device) if reprob > 0 else None

    def __iter__(self):
        for samples, targets in self.prefetch:
            yield (self.erase(samples) if self.erase is not None else samples), targets

    def __len__(self) -> int:
        return len(self.loader)


@dataclass
class TrainData:
    """What train.py reads: both splits, their loaders, and how batches reach the device."""

    name: str
    train_set: Dataset
    val_set: Dataset
    num_classes: int
    train_loader: Any  # per process (the sampler shards); not given to accelerator.prepare
    val_loader: Any  # given to accelerator.prepare, which shards it
    batches: SeededBatchSampler
    updates_per_epoch: int
    mean: Sequence[float]
    std: Sequence[float]
    prefetcher: bool
    workers: int
    persistent_workers: bool
    prefetch_factor: Optional[int]
    device: torch.device
    erasing: Dict[str, Any]  # reprob, remode, recount: random erasing on the device with the prefetcher
    _epoch_loader: Any = None

    def on_device(self, loader):
        """``loader`` through the device input path when the prefetcher is on (one CUDA stream per call: call once)."""
        return DeviceLoader(loader, self.mean, self.std, self.device, **self.erasing) if self.prefetcher else loader

    def epoch_loader(self, epoch: int, skip_batches: int = 0):
        """This process's training batches of ``epoch``, the first ``skip_batches`` skipped unloaded (a resume)."""
        self.batches.set_epoch(epoch)
        if skip_batches:
            from accelerate import skip_first_batches

            return self.on_device(skip_first_batches(self.train_loader, skip_batches))
        if self._epoch_loader is None:  # built once: PrefetchLoader keeps one CUDA stream for its lifetime
            self._epoch_loader = self.on_device(self.train_loader)
        return self._epoch_loader

    @property
    def class_names(self) -> List[str]:
        """The class of each label index, as the dataset names them (ImageFolder: the sorted folder names)."""
        dataset = self.train_set.datasets[0] if isinstance(self.train_set, torch.utils.data.ConcatDataset) \
            else self.train_set
        names = getattr(dataset, "classes", None)
        return [str(n) for n in names] if names and len(names) == self.num_classes else [
            str(i) for i in range(self.num_classes)]

    def timm_data_config(self, args) -> Dict[str, Any]:
        """The eval preprocessing as timm's data config (what resolve_data_config(model=...) should give back)."""
        return {"input_size": (args.in_chans, args.input_size, args.input_size), "mean": tuple(self.mean),
                "std": tuple(self.std), "crop_pct": args.eval_crop_ratio, "crop_mode": "center",
                "interpolation": eval_interpolation(args.train_interpolation)}

    def describe_resize(self, input_size: int, eval_crop_ratio: float) -> str:
        """Whether the images are resized for the model (e.g. 64-px images to 28 px: the dry-run summary's line)."""
        size = image_size(self.train_set)
        eval_resize = int(input_size / eval_crop_ratio)
        if size is None:
            return (f"to {input_size} px (images of varying size; eval: resize to {eval_resize} px, center crop "
                    f"{input_size})")
        native = f"{size[0]}x{size[1]}" if size[0] != size[1] else f"{size[0]} px"
        if max(size) == input_size == min(size) and eval_resize == input_size:
            return f"none (the images are {native}, the model's --input-size)"
        return (f"{native} images resized to {input_size} px for the model (--input-size {input_size}; eval: resize "
                f"to {eval_resize} px, center crop {input_size})")

    def describe_input_path(self) -> str:
        """Where batches are made and normalised (the dry-run summary's line)."""
        how = (f"uint8 from {self.workers} workers, normalised on {self.device} one batch ahead (timm's "
               "PrefetchLoader)" if self.prefetcher else f"float32 normalised in {self.workers} workers")
        return how + (f", persistent, {self.prefetch_factor or 2} batches ahead per worker"
                      if self.persistent_workers else "")


def image_size(dataset) -> Optional[Tuple[int, int]]:
    """(width, height) of a dataset's first image as stored, without its transform; None where sizes vary or are
    not known without decoding every file (Flowers, Cars)."""
    if hasattr(dataset, "samples") and dataset.samples:  # ImageFolder
        return read_image(dataset.samples[0][0]).size
    data = getattr(dataset, "data", None)  # FashionMNISTIDX (N, H, W), CIFAR (N, H, W, C)
    if isinstance(data, np.ndarray) and data.ndim >= 3:
        return int(data.shape[2]), int(data.shape[1])
    return None


def build_train_data(args, accelerator, *, log: Callable[[str], None] = print) -> TrainData:
    """Transforms, both splits and their loaders for train.py's ``args``; a bad dataset or augmentation is refused.

    Augmentation is seeded per batch from (seed, process, epoch, position) (``SeededBatchSampler``), so batches are
    the same with persistent workers and after a resume that skips batches.
    """
    from timm.data.loader import fast_collate
    from torch.utils.data import DataLoader, DistributedSampler

    # DeiT reads --data-path alone as ImageNet; it is read the same way here, as the image folder it may not be ImageNet
    name = args.data_set or ("FOLDER" if args.data_path else "FMNIST")
    mean, std = default_mean_std(args.in_chans)
    mean, std = args.mean or mean, args.std or std
    # GPU input path (timm's): workers hand over uint8, normalisation and random erasing run on the device
    prefetcher = args.prefetcher if args.prefetcher is not None else accelerator.device.type == "cuda"
    try:
        train_tf = build_transform(True, args.input_size, three_augment=args.three_augment,
                                   simple_random_crop=args.src, color_jitter=args.color_jitter,
                                   auto_augment=args.aa, reprob=args.reprob, remode=args.remode,
                                   recount=args.recount, mean=mean, std=std,
                                   interpolation=args.train_interpolation, use_prefetcher=prefetcher)
    except (AssertionError, KeyError, ValueError) as e:  # timm's policy parser asserts on what it cannot read
        if not args.aa:
            raise
        raise ConfigError(f"--aa {args.aa}: timm cannot read this augmentation policy ({e or type(e).__name__}); "
                          "e.g. --aa rand-m9-mstd0.5-inc1") from None
    eval_tf = build_transform(False, args.input_size, eval_crop_ratio=args.eval_crop_ratio, mean=mean, std=std,
                              interpolation=args.train_interpolation)
    with accelerator.main_process_first():  # only one process downloads
        check_dataset(name, args.data_path, download=args.download, splits=(args.train_split, args.val_split))
        train_set, num_classes = build_dataset(name, args.data_path, True, train_tf, download=args.download,
                                               in_chans=args.in_chans, split=args.train_split)
        val_set, _ = build_dataset(name, args.data_path, False, eval_tf, in_chans=args.in_chans,
                                   split=args.val_split)
    if args.num_classes is not None and args.num_classes != num_classes:
        raise ConfigError(f"--num-classes {args.num_classes}, but {name} at {args.data_path or 'the default path'} has "
                          f"{num_classes} classes, which the head always predicts: leave --num-classes out (or point "
                          "--data-path at the dataset you meant)")

    world, rank = accelerator.num_processes, accelerator.process_index
    if args.repeated_aug and world > 1:
        sampler = RASampler(train_set, world, rank, shuffle=True, seed=args.seed)
    else:
        if args.repeated_aug:
            log("note: --repeated-aug works across processes only; it is off in this single-process run")
        # Per-process shards seeded by (seed, epoch): a resumed run sees the same order as an uninterrupted one.
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    batches = SeededBatchSampler(sampler, args.batch_size, drop_last=True, seed=args.seed, rank=rank)
    workers = args.num_workers if args.num_workers is not None else default_num_workers()
    persistent = args.persistent_workers and workers > 0
    loader_kwargs = dict(num_workers=workers, pin_memory=args.pin_mem and torch.cuda.is_available(),
                         persistent_workers=persistent, prefetch_factor=args.prefetch_factor if workers > 0 else None)
    # Its own generator: making an iterator draws a seed, which must not come from the training RNG (a resumed run
    # makes one more, for the skipping loader).
    train_loader = DataLoader(SeededBatches(train_set), batch_sampler=batches, generator=torch.Generator(),
                              collate_fn=fast_collate if prefetcher else None, **loader_kwargs)
    val_loader = DataLoader(val_set, batch_size=int(1.5 * args.batch_size), shuffle=False, drop_last=False,
                            **loader_kwargs)
    updates_per_epoch = min(len(train_loader) // args.accum_steps, args.max_updates_per_epoch or len(train_loader))
    if updates_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training images over {world} process(es) give no full update of "
                          f"--batch-size {args.batch_size} x --accum-steps {args.accum_steps}: lower them")
    return TrainData(name, train_set, val_set, num_classes, train_loader, val_loader, batches, updates_per_epoch,
                     mean, std, prefetcher, workers, persistent, args.prefetch_factor, accelerator.device,
                     dict(reprob=args.reprob, remode=args.remode, recount=args.recount))
