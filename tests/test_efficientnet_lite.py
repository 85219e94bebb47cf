"""EfficientNet-Lite: the architecture, the safe .pth reader, the conversion, and its proof
on photographs of known content."""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from melanoma.cli import app
from melanoma.errors import ModelError
from melanoma.modeling.efficientnet_lite import (
    FEATURES_LAYER,
    INPUT_OFFSET,
    INPUT_SCALE,
    efficientnet_lite,
)
from melanoma.modeling.pretrained import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    assign_torch_weights,
    build_efficientnet_lite,
    cached_lite_weights,
    read_torch_state_dict,
    torch_checkpoint,
    weights_file,
)

LITE0 = "efficientnet-lite0"
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 504, 968}  # espresso, coffee mug, cup


# ----------------------------------------------------------------------------- hand-made .pth files


def write_legacy_pth(path: Path, state_pickle: bytes, storages: dict[str, np.ndarray], header: object = LEGACY_MAGIC) -> Path:
    """A file laid out like torch.save's legacy format, with our own state-dict pickle."""
    with path.open("wb") as file:
        for item in (header, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True}):
            file.write(item if isinstance(item, bytes) else pickle.dumps(item, protocol=2))
        file.write(state_pickle)
        pickle.dump(list(storages), file, protocol=2)
        for data in storages.values():
            file.write(np.int64(data.size).tobytes())
            file.write(data.astype("<f4").tobytes())
    return path


@pytest.fixture
def torch_names(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stand-ins registered as torch._utils._rebuild_tensor_v2 and torch.FloatStorage, so that
    pickle writes the same global references as PyTorch does (torch is not installed)."""

    def _rebuild_tensor_v2(*args):
        raise AssertionError("the reader must never call torch code")

    class FloatStorage:
        pass

    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    utils._rebuild_tensor_v2, torch.FloatStorage, torch._utils = _rebuild_tensor_v2, FloatStorage, utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return types.SimpleNamespace(rebuild=_rebuild_tensor_v2, storage=FloatStorage)


def state_pickle(names: types.SimpleNamespace, tensors: dict[str, tuple[str, int, int, tuple, tuple]]) -> bytes:
    """Pickle {name: (storage key, storage size, offset, size, stride)} as PyTorch would."""

    class StorageRef:
        def __init__(self, key: str, numel: int):
            self.key, self.numel = key, numel

    class Tensor:
        def __init__(self, storage: StorageRef, offset: int, size: tuple, stride: tuple):
            self.args = (storage, offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return names.rebuild, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", names.storage, obj.key, "cpu", obj.numel, None)
            return None

    state = collections.OrderedDict(
        (name, Tensor(StorageRef(key, numel), offset, size, stride)) for name, (key, numel, offset, size, stride) in tensors.items()
    )
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(state)
    return buffer.getvalue()


class RunsShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------- the reader


def test_reader_rebuilds_tensors_with_offset_and_stride(tmp_path, torch_names):
    storage = np.arange(12, dtype=np.float32)
    payload = state_pickle(torch_names, {
        "contiguous": ("0", 12, 0, (3, 4), (4, 1)),
        "transposed": ("0", 12, 0, (4, 3), (1, 4)),
        "shifted": ("0", 12, 5, (2, 3), (3, 1)),
    })
    state = read_torch_state_dict(write_legacy_pth(tmp_path / "t.pth", payload, {"0": storage}))
    grid = storage.reshape(3, 4)
    np.testing.assert_array_equal(state["contiguous"], grid)
    np.testing.assert_array_equal(state["transposed"], grid.T)
    np.testing.assert_array_equal(state["shifted"], storage[5:11].reshape(2, 3))


def test_reader_refuses_a_tensor_outside_its_storage(tmp_path, torch_names):
    payload = state_pickle(torch_names, {"too_long": ("0", 4, 2, (10,), (1,))})
    with pytest.raises(ModelError, match="too_long lies outside its storage"):
        read_torch_state_dict(write_legacy_pth(tmp_path / "t.pth", payload, {"0": np.zeros(4, np.float32)}))


@pytest.mark.parametrize("where", ["header", "state dict"])
def test_reader_refuses_a_malicious_pickle(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(RunsShellCommand(marker), protocol=2)
    if where == "header":
        path = write_legacy_pth(tmp_path / "evil.pth", pickle.dumps({}, protocol=2), {}, header=evil)
    else:
        path = write_legacy_pth(tmp_path / "evil.pth", evil, {})
    with pytest.raises(ModelError, match=r"evil\.pth asks to run (posix|os|nt)\.system while loading: refused"):
        read_torch_state_dict(path)
    assert not marker.exists()


def test_reader_reads_the_bundled_lite0_checkpoint():
    state = read_torch_state_dict(torch_checkpoint(LITE0))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.running_var"].dtype == np.float32 and (state["_bn0.running_var"] >= 0).all()
    weights = sum(v.size for name, v in state.items() if not name.endswith("num_batches_tracked"))
    assert weights == 4_694_024


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_reader_rejects_damaged_files(tmp_path, damage):
    path = tmp_path / "bad.pth"
    original = torch_checkpoint(LITE0).read_bytes()
    path.write_bytes(original[: len(original) // 2] if damage == "truncated" else b"hello, world\n")
    with pytest.raises(ModelError, match="bad.pth"):
        read_torch_state_dict(path)


# ----------------------------------------------------------------------------- the mapping


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, np.ndarray]:
    return read_torch_state_dict(torch_checkpoint(LITE0))


@pytest.fixture(scope="module")
def untrained_lite0():
    return efficientnet_lite(LITE0, input_shape=(64, 64, 3))


def test_an_unmatched_tensor_is_an_error_that_names_it(lite0_state, untrained_lite0):
    state = {**lite0_state, "_blocks.99._depthwise_conv.weight": np.zeros((8, 1, 3, 3), np.float32)}
    with pytest.raises(ModelError, match=r"_blocks\.99\._depthwise_conv\.weight matches no layer"):
        assign_torch_weights(untrained_lite0, state)


def test_a_shape_mismatch_is_an_error_that_names_the_tensor(lite0_state, untrained_lite0):
    state = {**lite0_state, "_blocks.3._project_conv.weight": np.zeros((41, 144, 1, 1), np.float32)}
    with pytest.raises(ModelError, match=r"_blocks\.3\._project_conv\.weight has shape \(41, 144, 1, 1\)"):
        assign_torch_weights(untrained_lite0, state)


def test_a_missing_tensor_is_an_error_that_names_the_layer(lite0_state, untrained_lite0):
    state = {name: value for name, value in lite0_state.items() if name != "_bn1.running_var"}
    with pytest.raises(ModelError, match=r"top_bn gets no tensor _bn1\.running_var"):
        assign_torch_weights(untrained_lite0, state)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "parameters"),
    # The parameter counts of the PyTorch checkpoints efficientnet-lite{1,2}-*.pth (Lite0 is
    # checked by its conversion); Lite1 scales depth only, Lite2 both width and depth.
    [("efficientnet-lite1", 5_470_344), ("efficientnet-lite2", 6_150_168)],
)
def test_variants_have_the_published_architecture(variant, parameters):
    model = efficientnet_lite(variant, input_shape=(64, 64, 3))
    assert model.count_params() == parameters
    assert model.get_layer("stem_conv").filters == 32 and model.get_layer("top_conv").filters == 1280


# ----------------------------------------------------------------------------- conversion and proof


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, str]:
    """Weights converted through the CLI, and what it printed."""
    weights_dir = tmp_path_factory.mktemp("weights")
    result = CliRunner().invoke(app, ["weights", "prepare", LITE0, "--weights-dir", str(weights_dir)])
    assert result.exit_code == 0, result.output
    return weights_dir, result.output


@pytest.mark.slow
def test_cli_prepare_converts_once_then_uses_the_cache(converted):
    weights_dir, first_output = converted
    assert "Converted 296 tensors" in first_output
    files = [weights_file(weights_dir, LITE0, include_top=top) for top in (True, False)]
    stamps = [f.stat().st_mtime_ns for f in files]
    second = CliRunner().invoke(app, ["weights", "prepare", LITE0, "--weights-dir", str(weights_dir)])
    assert second.exit_code == 0, second.output
    assert "already converted" in second.output
    assert [f.stat().st_mtime_ns for f in files] == stamps


@pytest.mark.slow
def test_a_damaged_cache_is_not_used(converted, tmp_path):
    copy = shutil.copytree(converted[0], tmp_path / "copy")
    assert cached_lite_weights(LITE0, copy) is not None
    damaged = weights_file(copy, LITE0, include_top=False)
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))
    assert cached_lite_weights(LITE0, copy) is None


def photographs(size: int) -> np.ndarray:
    """scikit-image's chelsea (a cat) and coffee (an espresso), centre-cropped, 0..255 RGB."""
    from skimage import data
    from skimage.transform import resize

    def square(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return resize(image[top : top + side, left : left + side], (size, size), preserve_range=True)

    return np.stack([square(data.chelsea()), square(data.coffee())]).astype("float32")


@pytest.fixture(scope="module")
def imagenet_lite0(converted):
    return build_efficientnet_lite(LITE0, input_shape=(224, 224, 3), include_top=True, weights="imagenet",
                                   weights_dir=converted[0])


@pytest.mark.slow
def test_converted_model_recognises_a_cat_and_an_espresso(imagenet_lite0):
    probabilities = imagenet_lite0(photographs(224)).numpy()
    cat_top5, coffee_top5 = (set(np.argsort(-p)[:5].tolist()) for p in probabilities)
    assert cat_top5 & CAT_CLASSES, f"no cat class in the top-5 of chelsea: {cat_top5}"
    assert coffee_top5 & COFFEE_CLASSES, f"no espresso/mug/cup in the top-5 of coffee: {coffee_top5}"

    # The normalisation inside the model, (x - 127) / 128, is the one the weights were trained
    # with: it is more confident on both photographs than ImageNet mean/std normalisation.
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    as_if_imagenet = ((photographs(224) - mean) / std * INPUT_SCALE + INPUT_OFFSET).astype("float32")
    other = imagenet_lite0(as_if_imagenet).numpy()
    for ours, theirs, classes in zip(probabilities, other, (CAT_CLASSES, COFFEE_CLASSES)):
        assert ours[list(classes)].sum() > theirs[list(classes)].sum()


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "size"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)])
def test_larger_variants_convert_from_their_packages_and_see_a_cat_and_an_espresso(variant, size, tmp_path):
    model = build_efficientnet_lite(variant, input_shape=(size, size, 3), include_top=True, weights="imagenet",
                                    weights_dir=tmp_path)
    probabilities = model(photographs(size)).numpy()
    cat_top5, coffee_top5 = (set(np.argsort(-p)[:5].tolist()) for p in probabilities)
    assert cat_top5 & CAT_CLASSES and coffee_top5 & COFFEE_CLASSES, (cat_top5, coffee_top5)


@pytest.mark.slow
def test_headless_backbone_takes_any_size_and_matches_the_full_model(converted, imagenet_lite0):
    import keras

    backbone = build_efficientnet_lite(LITE0, include_top=False, weights="imagenet", weights_dir=converted[0])
    image = photographs(224)[:1]
    reference = keras.Model(imagenet_lite0.input, imagenet_lite0.get_layer(FEATURES_LAYER).output)(image)
    np.testing.assert_allclose(backbone(image).numpy(), reference.numpy(), atol=1e-5)
    assert backbone(image[:, :97, :130]).shape == (1, 4, 5, 1280)  # ceil(97 / 32), ceil(130 / 32)


def test_imagenet_head_needs_1000_classes(tmp_path):
    with pytest.raises(ModelError, match="1000 classes, not 7"):
        build_efficientnet_lite(LITE0, include_top=True, classes=7, weights="imagenet", weights_dir=tmp_path)
