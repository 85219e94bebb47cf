"""Development check: do the converted Keras EfficientNet-Lite logits match PyTorch's?

Needs torch and the reference port (``pip install torch efficientnet-lite-pytorch``), which
are NOT dependencies of this project. Runs the PyTorch model from the same ``.pth`` file
and the converted Keras model on two photographs and random images of several sizes,
and prints the largest logit difference.

    python scripts/compare_lite_with_torch.py --variant efficientnet-lite0 --weights-dir /tmp/weights
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from rich.console import Console
from rich.table import Table
from skimage import data
from skimage.transform import resize

from melanoma.modeling.efficientnet_lite import INPUT_OFFSET, INPUT_SCALE
from melanoma.modeling.pretrained import build_efficientnet_lite, torch_checkpoint


def keras_logits(variant: str, weights_dir: Path, images: np.ndarray) -> np.ndarray:
    import keras

    model = build_efficientnet_lite(variant, include_top=True, weights="imagenet", weights_dir=weights_dir)
    features = keras.Model(model.input, model.get_layer("avg_pool").output).predict(images, verbose=0)
    kernel, bias = model.get_layer("predictions").get_weights()
    return features @ kernel + bias


def torch_logits(variant: str, images: np.ndarray) -> np.ndarray:
    net = EfficientNet.from_name(variant, image_size=images.shape[1:3])
    net.load_state_dict(torch.load(torch_checkpoint(variant), weights_only=True))
    net.eval()
    normalised = (images - INPUT_OFFSET) / INPUT_SCALE
    with torch.no_grad():
        return net(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()


def photographs(size: int) -> np.ndarray:
    def square(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        s = min(h, w)
        crop = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        return resize(crop, (size, size), anti_aliasing=True, preserve_range=True)

    return np.stack([square(data.chelsea()), square(data.coffee())]).astype("float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="efficientnet-lite0")
    parser.add_argument("--weights-dir", type=Path, default=Path("models/weights"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    inputs = {
        "chelsea+coffee 224": photographs(224),
        "random 128x128": rng.uniform(0, 255, (2, 128, 128, 3)).astype("float32"),
        "random 97x130": rng.uniform(0, 255, (2, 97, 130, 3)).astype("float32"),
    }
    table = Table(title=f"{args.variant}: Keras vs PyTorch logits")
    for column in ("input", "max |diff|", "max |logit|", "same top-1"):
        table.add_column(column)
    for label, images in inputs.items():
        ours, theirs = keras_logits(args.variant, args.weights_dir, images), torch_logits(args.variant, images)
        same = bool((ours.argmax(1) == theirs.argmax(1)).all())
        table.add_row(label, f"{np.abs(ours - theirs).max():.2e}", f"{np.abs(theirs).max():.1f}", str(same))
    Console().print(table)


if __name__ == "__main__":
    main()
