"""Reading datasets from disk (or generating them) into device-resident splits, with fingerprints.

Files are only touched here. Nothing downloads unless the suite says ``download: true``: with
download off no code path here opens a network connection. PIL is used once, to decode an
image folder, and the result is cached as a ``.pt`` file.
"""

from __future__ import annotations
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
import torch
from kdbench import KdbenchError
from kdbench.seeding import stream_seed
from kdbench.storage.files import atomic_save, atomic_write, file_digest
from kdbench.data.batches import DeviceData, Split
from kdbench.data.spec import (DataError, DataSpec, DatasetInfo, VAL_SEED, _SYNTHETIC_DEFAULTS, _SYNTHETIC_SEED,
                               dataset_info)


def resolve_data_root(cli_root: str | None) -> Path | None:
    """The data root: ``--data-root`` first, else env ``KDBENCH_DATA``, else None.

    No default like torchvision's ``./data`` is assumed: a missing root is reported by
    :func:`load_data` with instructions, rather than data appearing in whatever the cwd is.
    """
    if cli_root:
        return Path(cli_root).expanduser()
    env = os.environ.get("KDBENCH_DATA")
    if env:
        return Path(env).expanduser()
    return None


def cache_dir() -> Path:
    env = os.environ.get("KDBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdbench"


_HOW_TO_PROVIDE = "pass --data-root <folder> or set KDBENCH_DATA"


def load_data(spec: DataSpec, root: Path | None, device: torch.device | str) -> DeviceData:
    """Load both splits of ``spec`` on the CPU, cut them to train_size/test_size, hold val_size training images out
    as the validation split (:func:`carve_validation`), move them to ``device`` once."""
    info = dataset_info(spec)
    root = Path(root).expanduser() if root is not None else None
    name = spec.dataset
    if name in ("cifar100", "cifar10"):
        tr, te = _load_cifar(spec, _real_root(spec, root))
    elif name in ("mnist", "fashion_mnist"):
        tr, te = _load_mnist(spec, _real_root(spec, root))
    elif name == "imagefolder":
        tr, te = _load_imagefolder(spec, info, root)
    elif name == "synthetic":
        tr, te = _make_synthetic(spec, info)
    else:  # pragma: no cover - dataset_info already rejected it
        raise DataError(f"unknown dataset {name!r}")

    fingerprint = _fingerprint(spec, root, (tr, te))
    device = torch.device(device)
    tr = _first_n(*tr, spec.train_size, f"{name} train")
    te = _first_n(*te, spec.test_size, f"{name} test")
    parts = [("train", tr), ("test", te)]
    if spec.val_size:
        tr, va = carve_validation(*tr, spec)
        parts = [("train", tr), ("test", te), ("val", va)]
    splits = []
    for split_name, (images, labels) in parts:
        _check_split(images, labels, info, f"{name} {split_name}")
        # One host-to-device copy per split; contiguous so batch gathers are plain strided reads.
        splits.append(Split(images.to(device).contiguous(), labels.to(device=device, dtype=torch.int64).contiguous()))
    return DeviceData(info, splits[0], splits[1], fingerprint, splits[2] if len(splits) > 2 else None)


def carve_validation(images: torch.Tensor, labels: torch.Tensor, spec: DataSpec):
    """((train images, labels), (val images, labels)): val_size of the training images, drawn by the validation
    stream of kdbench.seeding (fixed per dataset: the same for every method and seed), out of the training split.
    Both keep the images' original order, so the engine's per-epoch draws work on the rest as on any split."""
    n, k = len(images), spec.val_size
    if k >= n:
        raise DataError(f"{spec.dataset}: val_size {k} leaves no training images: the training split has {n}")
    g = torch.Generator().manual_seed(stream_seed(VAL_SEED, "val", spec.dataset, spec.path))
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=g)[:k]] = True
    keep = ~held
    return (images[keep].contiguous(), labels[keep].contiguous()), (images[held].contiguous(), labels[held].contiguous())


# --- Fingerprints -----------------------------------------------------------------------------------
# A dataset read from disk is fingerprinted by the sha256 of its loaded uint8 tensors (labels included), so a
# teacher trained on damaged images is never reused once they are fixed (the fingerprint is part of its key).
# Hashing is cheap (about a second for CIFAR); it is cached under a key of the files' stamps (_stamp), so it
# is computed once per version of the files. The image-folder tensor cache is keyed by the same stamps.
#
# What a stamp trusts: a file of at most SMALL_FILE bytes is identified by its content (a digest: reading it
# costs less than reusing a model trained on other bytes, and damage that keeps its size and times is seen);
# a larger one by its size, modification time, change time and inode. Writing a file moves its change time,
# which no tool sets back (touch and copy tools set only the modification time), so a rewrite that keeps size
# and modification time is still seen; only a filesystem without change times, or a clock set back, can hide
# one: after repairing a large file there, delete $KDBENCH_CACHE/fingerprints (default ~/.cache/kdbench).
SMALL_FILE = 1 << 20


def _stamp(path: Path, st: os.stat_result) -> list:
    if st.st_size <= SMALL_FILE:
        return [st.st_size, file_digest(path, "sha256")]
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _source_files(spec: DataSpec, root: Path | None) -> list[Path] | None:
    """The files a dataset is read from; None for generated data."""
    if spec.dataset == "synthetic":
        return None
    if spec.dataset == "imagefolder":
        path = user_path(spec.path or "", root)
        return [path] if path.is_file() else [p for p, _ in _list_files(_tree_root(path, path))]
    folder = {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py", "mnist": "MNIST/raw",
              "fashion_mnist": "FashionMNIST/raw"}[spec.dataset]
    base = _real_root(spec, root) / folder
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []


def _fingerprint_cache(spec: DataSpec, root: Path | None) -> Path | None:
    files = _source_files(spec, root)
    if files is None:
        return None
    stamps = [(str(p), *_stamp(p, p.stat())) for p in files]
    return cache_dir() / "fingerprints" / f"{spec.dataset}-{_key({'dataset': spec.dataset, 'files': stamps})}.txt"


def _fingerprint(spec: DataSpec, root: Path | None, splits) -> str | None:
    cache = _fingerprint_cache(spec, root)
    if cache is None:
        return None
    try:
        return cache.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    for images, labels in splits:
        for tensor in (images, labels):
            digest.update(tensor.contiguous().numpy())
    fingerprint = digest.hexdigest()[:16]
    try:
        atomic_write(cache, fingerprint.encode())
    except OSError:
        pass  # an unwritable cache only costs a hash next time
    return fingerprint


def cached_fingerprint(spec: DataSpec, root: Path | None) -> str | None:
    """The fingerprint if it is cached for the files as they are now; None otherwise. Reads no data."""
    try:
        cache = _fingerprint_cache(spec, root)
        return cache.read_text().strip() if cache is not None and cache.is_file() else None
    except (KdbenchError, OSError):
        return None


def data_fingerprint(spec: DataSpec, root: Path | None) -> str | None:
    """The dataset's fingerprint: from the cache, else by loading it (None for generated data)."""
    cache = _fingerprint_cache(spec, root)
    if cache is None:
        return None
    if cache.is_file():
        return cache.read_text().strip()
    return load_data(spec, root, "cpu").fingerprint


def _real_root(spec: DataSpec, root: Path | None) -> Path:
    if root is not None:
        return root
    if spec.download:
        # The user allowed a download but named no folder: use the kdbench cache, not the cwd.
        return cache_dir() / "datasets"
    raise DataError(
        f"no data root for {spec.dataset}: {_HOW_TO_PROVIDE} to the folder holding it, "
        "or set `download: true` in the suite's data section to let torchvision download it"
    )


def _first_n(images: torch.Tensor, labels: torch.Tensor, n: int | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n == len(images):
        return images, labels
    if n > len(images):
        raise DataError(f"{what}: asked for the first {n} images but the split has only {len(images)}")
    # clone: a view would keep the whole split's storage alive when the device is the CPU
    return images[:n].clone(), labels[:n].clone()


def _check_split(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, what: str) -> None:
    # Runs once on the CPU at load time; cheap insurance that the engine gets what the info promises.
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != info.input_shape:
        raise DataError(f"{what}: images are {images.dtype} {tuple(images.shape)}, expected uint8 (N, {', '.join(map(str, info.input_shape))})")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{what}: {labels.shape[0]} labels for {images.shape[0]} images")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(f"{what}: labels span {int(labels.min())}..{int(labels.max())}, outside 0..{info.num_classes - 1}")


# --- CIFAR ------------------------------------------------------------------------------------------


def _load_cifar(spec: DataSpec, root: Path):
    from torchvision import datasets

    cls = datasets.CIFAR100 if spec.dataset == "cifar100" else datasets.CIFAR10
    out = []
    for train in (True, False):
        try:
            # torchvision's own integrity check (md5 of every batch file and of the meta file)
            ds = cls(str(root), train=train, download=spec.download)
        except (RuntimeError, OSError, ValueError, EOFError, KeyError, AssertionError, pickle.UnpicklingError) as e:
            raise DataError(_cifar_problem(cls, spec, root, e)) from e
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        out.append((images, torch.as_tensor(ds.targets, dtype=torch.int64)))
    return out[0], out[1]


def _cifar_problem(cls, spec: DataSpec, root: Path, err: Exception) -> str:
    """Say which file is missing or corrupted (torchvision's message does not)."""
    from torchvision.datasets.utils import check_integrity

    folder = root / cls.base_folder
    how = f"{_HOW_TO_PROVIDE} to the folder that contains {cls.base_folder}/, or set `download: true` in the suite's data section"
    if spec.download:
        return f"{spec.dataset}: download into {folder} failed or gave bad files ({err}); {how}"
    if not folder.is_dir():
        return f"{spec.dataset} not found: no folder {folder}; {how}"
    files = [(f, md5) for f, md5 in list(cls.train_list) + list(cls.test_list)] + [(cls.meta["filename"], cls.meta["md5"])]
    missing = [f for f, _ in files if not (folder / f).is_file()]
    bad = [f for f, md5 in files if (folder / f).is_file() and not check_integrity(str(folder / f), md5)]
    if missing or bad:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"corrupted (md5 mismatch) {', '.join(bad)}"] if bad else [])
        return f"{spec.dataset} in {folder}: {'; '.join(parts)}; {how}"
    return f"{spec.dataset}: could not read {folder} ({type(err).__name__}: {err}); {how}"


# --- MNIST / Fashion-MNIST --------------------------------------------------------------------------


def _load_mnist(spec: DataSpec, root: Path):
    from torchvision import datasets

    cls = datasets.MNIST if spec.dataset == "mnist" else datasets.FashionMNIST
    folder = root / cls.__name__  # torchvision's layout: <root>/MNIST/raw/<idx files>
    how = f"{_HOW_TO_PROVIDE} to the folder that contains {cls.__name__}/raw/, or set `download: true` in the suite's data section"
    # torchvision only checks that the raw files exist; an MD5SUMS beside raw/ lets us catch corruption.
    _verify_md5sums(folder, spec.dataset, how)
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=spec.download)
        except (RuntimeError, OSError, ValueError, EOFError, AssertionError, TypeError) as e:
            if isinstance(e, RuntimeError) and "not found" in str(e).lower():
                raise DataError(f"{spec.dataset} not found in {folder / 'raw'} (expected the four idx files); {how}") from e
            raise DataError(f"{spec.dataset}: could not read the idx files in {folder / 'raw'} ({type(e).__name__}: {e}); {how}") from e
        out.append((ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)))
    return out[0], out[1]


def _verify_md5sums(folder: Path, name: str, how: str) -> None:
    """Check files against ``folder/MD5SUMS`` (md5sum format: ``<hex>  <file>``, names relative to raw/)."""
    sums = folder / "MD5SUMS"
    if not sums.is_file():
        return
    for lineno, line in enumerate(sums.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or len(parts[0]) != 32:
            raise DataError(f"{name}: {sums} line {lineno} is not '<md5>  <file>': {line!r}")
        expected, fname = parts[0].lower(), parts[1].lstrip("*")  # '*' marks binary mode in md5sum output
        candidates = [folder / "raw" / fname, folder / fname]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            continue  # a missing file is reported by torchvision's own existence check
        actual = _md5(path)
        if actual != expected:
            raise DataError(f"{name}: {path} is corrupted (md5 {actual}, {sums.name} says {expected}); replace it; {how}")


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


# --- Image folders ----------------------------------------------------------------------------------

_CACHE_FORMAT = 1  # bump when the cached tensors' layout or ordering changes


def _load_imagefolder(spec: DataSpec, info: DatasetInfo, root: Path | None):
    if not spec.path:
        raise DataError("imagefolder: set `path` in the suite's data section (a folder with train/ and test/, or a .zip of it)")
    path = user_path(spec.path, root)
    if not path.exists():
        raise DataError(f"imagefolder: {path} does not exist; give `path` relative to the data root ({_HOW_TO_PROVIDE}) or as an absolute path")
    size = info.input_shape[1]
    cache = cache_dir()
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise DataError(f"imagefolder: {path} is a file but not a .zip; give a folder with train/ and test/ or a .zip of one")
        # A zip is keyed by itself (its path and stamp): a cache hit then needs neither unpacking nor a file listing.
        key = _key({"zip": str(path.resolve()), "stamp": _stamp(path, path.stat()), "image_size": size})
        tensor_file = cache / "imagefolder" / f"{path.stem}-{key}.pt"
        cached = _read_tensor_cache(tensor_file)
        if cached is None:
            folder = _tree_root(_unzip_once(path, cache / "unzipped" / f"{path.stem}-{key}"), path)
            cached = _decode_image_tree(folder, size)
            _write_tensor_cache(tensor_file, cached)
    else:
        folder = _tree_root(path, path)
        listing = [(str(p.relative_to(folder)), *_stamp(p, st)) for p, st in _list_files(folder)]
        key = _key({"folder": str(folder.resolve()), "files": listing, "image_size": size})
        tensor_file = cache / "imagefolder" / f"{folder.name}-{key}.pt"
        cached = _read_tensor_cache(tensor_file)
        if cached is None:
            cached = _decode_image_tree(folder, size)
            _write_tensor_cache(tensor_file, cached)

    classes = list(cached["classes"])
    if len(classes) != info.num_classes:
        raise DataError(f"imagefolder {path}: found {len(classes)} classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) but the suite declares num_classes: {info.num_classes}")
    return (cached["train_images"], cached["train_labels"]), (cached["test_images"], cached["test_labels"])


def user_path(path: str, root: Path | None) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if root is not None:
        return root / p
    if p.exists():  # no data root: a path that exists relative to the cwd is taken as meant
        return p.resolve()
    raise DataError(f"imagefolder: relative path {path!r} needs a data root: {_HOW_TO_PROVIDE}, or give an absolute path")


def _key(obj: object) -> str:
    payload = json.dumps({"format": _CACHE_FORMAT, **obj}, sort_keys=True).encode()  # type: ignore[dict-item]
    return hashlib.sha1(payload, usedforsecurity=False).hexdigest()[:16]


def _list_files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    out = []
    for split in ("train", "test"):
        for dirpath, dirnames, filenames in os.walk(folder / split):
            dirnames.sort()
            for fn in sorted(filenames):
                p = Path(dirpath) / fn
                out.append((p, p.stat()))
    return out


def _tree_root(folder: Path, shown: Path) -> Path:
    """The folder holding train/ and test/: ``folder`` itself or its single subfolder (zips often add one)."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return folder
    subdirs = [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX"))] if folder.is_dir() else []
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir() and (subdirs[0] / "test").is_dir():
        return subdirs[0]
    raise DataError(f"imagefolder: {shown} has no train/ and test/ folders (expected train/<class>/<image>, test/<class>/<image>)")


def _unzip_once(zip_path: Path, dest: Path) -> Path:
    """Unpack ``zip_path`` into ``dest`` unless a complete unpacking is already there."""
    marker = dest / ".kdbench-complete"
    if marker.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)  # extractall drops absolute paths and '..' components
    except (zipfile.BadZipFile, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"imagefolder: could not unpack {zip_path} into {dest.parent} ({type(e).__name__}: {e}); check the zip or set KDBENCH_CACHE to a writable folder") from e
    (tmp / marker.name).touch()
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier attempt
    try:
        os.replace(tmp, dest)  # atomic: a concurrent loader sees all of it or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise
    return dest


def _decode_image_tree(folder: Path, image_size: int) -> dict:
    """Decode every image under folder/train and folder/test once (PIL, through torchvision's ImageFolder).

    Images are converted to RGB and must all be ``image_size`` square (no silent resizing). ImageFolder
    lists samples class by class, so each split is put in a fixed pseudo-random order: "the first N
    images" (train_size/test_size) then holds all classes, as it does for CIFAR and MNIST.
    """
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    splits = {}
    for split in ("train", "test"):
        try:
            ds = ImageFolder(str(folder / split))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"imagefolder: {folder / split}: {e}") from e
        splits[split] = ds
    if splits["train"].classes != splits["test"].classes:
        a, b = set(splits["train"].classes), set(splits["test"].classes)
        raise DataError(f"imagefolder {folder}: train and test classes differ (only in train: {sorted(a - b) or '-'}; only in test: {sorted(b - a) or '-'})")

    out: dict = {"classes": list(splits["train"].classes)}
    for i, (split, ds) in enumerate(splits.items()):
        n = len(ds.samples)
        arr = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
        for j, (p, _) in enumerate(ds.samples):
            try:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    if im.size != (image_size, image_size):
                        raise DataError(f"imagefolder: {p} is {im.size[0]}x{im.size[1]}, but the suite declares image_size: {image_size}")
                    arr[j] = np.asarray(im)
            except OSError as e:
                raise DataError(f"imagefolder: cannot decode {p} ({e})") from e
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(i))
        out[f"{split}_images"] = images[order].contiguous()
        out[f"{split}_labels"] = labels[order].contiguous()
    return out


def _read_tensor_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a torn or stale cache file is rebuilt, never fatal
        return None


def _write_tensor_cache(path: Path, data: dict) -> None:
    try:
        atomic_save(data, path)
    except OSError:
        pass  # an unwritable cache only costs speed next time


# --- Synthetic --------------------------------------------------------------------------------------


def _make_synthetic(spec: DataSpec, info: DatasetInfo):
    """Class prototypes (smooth random colour fields) plus per-image noise and brightness jitter.

    Prototypes are low-frequency (a 4x4 grid upsampled) so that crops and flips keep most of the class
    signal; small models learn this in a few epochs. Train and test use separate generators so the test
    images do not depend on train_size.
    """
    c, h, w = info.input_shape
    k = info.num_classes
    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    grid = torch.rand(k, c, 4, 4, generator=g)
    protos = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    protos = 40.0 + 175.0 * protos  # in [40, 215]: room for noise before clamping

    def make(n: int, seed: int):
        gs = torch.Generator().manual_seed(seed)
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=gs)]
        shift = torch.randn(n, 1, 1, 1, generator=gs) * 12.0
        noise = torch.randn(n, c, h, w, generator=gs) * 40.0
        images = (protos[labels] + shift + noise).round_().clamp_(0, 255).to(torch.uint8)
        return images.contiguous(), labels

    n_train = spec.train_size or _SYNTHETIC_DEFAULTS["train_size"]
    n_test = spec.test_size or _SYNTHETIC_DEFAULTS["test_size"]
    return make(n_train, _SYNTHETIC_SEED + 1), make(n_test, _SYNTHETIC_SEED + 2)
