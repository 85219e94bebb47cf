"""Benchmark the training feed: memory-mapped archive vs in-memory array, and peak memory.

In one run, on real images from a prepared archive:

1. training images/s of the small CNN (with augmentation, as `melanoma train` fits it)
   fed from the memory-mapped archive vs fed from the same training images held in
   memory as one uint8 array (the baseline; the feed must reach >= 0.9 of it);
2. peak RSS of a fresh process that trains the CNN from an archive of 25,000 images at
   224 px (built by repeating the real images, written straight into a memory-mapped
   ``.npy``) vs the size of the naive float32 copy (computed, not attempted).
   Target: under 3 GB.
3. training and inference speed of each model at the archive's size: the small CNN, and
   EfficientNet-Lite0 trained from scratch, with its backbone frozen (the head-only phase
   of fine-tuning) and fine-tuned whole with its BatchNorm frozen, as `melanoma train` does.
   Random initial weights: the speed does not depend on their values.
4. the small CNN's training speed by engine: TensorFlow (the default), JAX on one device,
   and JAX data-parallel over 2 XLA host devices (``keras.distribution.DataParallel``, as
   `melanoma train --distribute data-parallel` runs it), each JAX figure in a fresh process.

    .venv/bin/python benchmarks/train.py --archive data/archive [--steps 30] [--workdir DIR] [--only-engines]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from rich.console import Console
from rich.table import Table

GB = 1e9


def images_per_second(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, *, steps: int, batch_size: int,
                      model_name: str = "cnn", backbone_trainable: bool | None = None, shard=None) -> float:
    """Fit ``steps`` batches of a model (after a warm-up that traces the graph) and time them.

    ``backbone_trainable`` (backbones only): None trains every layer, as from scratch; False
    and True are the two phases of fine-tuning, set as `melanoma train` sets them.
    ``shard``: this process's part of each batch, in a data-parallel job.
    """
    from melanoma.modeling.feed import ArchiveFeed
    from melanoma.modeling.train import (
        compile_for_training,
        set_backbone_trainable,
        training_model,
    )

    classifier = random_model(model_name, int(labels.max()) + 1, images.shape[1])
    if backbone_trainable is not None:
        set_backbone_trainable(classifier, backbone_trainable)
    trainer = training_model(classifier, augment=True, seed=0)
    compile_for_training(trainer, 1e-3)
    feed = ArchiveFeed(images, labels, rows, batch_size=batch_size, shuffle=True, seed=0, shard=shard)
    trainer.fit(feed, epochs=1, steps_per_epoch=3, verbose=0)
    started = time.perf_counter()
    trainer.fit(feed, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * batch_size / (time.perf_counter() - started)


def random_model(model_name: str, num_classes: int, image_size: int):
    """The model with seeded random weights: speed does not depend on their values."""
    import keras

    from melanoma.modeling.models import build_model

    keras.utils.set_random_seed(0)
    return build_model(model_name, num_classes=num_classes, image_size=image_size, weights="none")


def inference_speed(images: np.ndarray, model_name: str, num_classes: int, repeats: int) -> tuple[float, float]:
    """Images/s predicting batches of 64, and the median milliseconds for one image."""
    classifier = random_model(model_name, num_classes, images.shape[1])
    batch = np.asarray(images[:64], dtype=np.float32)
    classifier.predict_on_batch(batch), classifier.predict_on_batch(batch[:1])  # trace both shapes
    started = time.perf_counter()
    for _ in range(repeats):
        classifier.predict_on_batch(batch)
    rate = repeats * len(batch) / (time.perf_counter() - started)
    single = []
    for _ in range(10 * repeats):
        started = time.perf_counter()
        classifier.predict_on_batch(batch[:1])
        single.append(time.perf_counter() - started)
    return rate, float(np.median(single)) * 1000


TRAINING_MODES = [  # (label, model, backbone_trainable)
    ("small CNN", "cnn", None),
    ("EfficientNet-Lite0 from scratch", "efficientnet-lite0", None),
    ("EfficientNet-Lite0 head only (backbone frozen)", "efficientnet-lite0", False),
    ("EfficientNet-Lite0 fine-tuned (BatchNorm frozen)", "efficientnet-lite0", True),
]


def model_speeds(archive, steps: int, batch_size: int, repeats: int) -> tuple[Table, Table]:
    """Training and inference speed of each model, as two tables."""
    rows, num_classes, size = archive.indices("train"), len(archive.classes), archive.images.shape[1]
    training = Table(title=f"Training speed at {size} px (batches of {batch_size}, with augmentation)")
    training.add_column("model")
    training.add_column("images/s", justify="right")
    for label, name, trainable in TRAINING_MODES:
        rate = images_per_second(archive.images, archive.labels, rows, steps=steps, batch_size=batch_size,
                                 model_name=name, backbone_trainable=trainable)
        training.add_row(label, f"{rate:.1f}")
    inference = Table(title=f"Inference speed at {size} px (Keras predict_on_batch)")
    for column in ("model", "images/s in batches of 64", "one image (ms, median)"):
        inference.add_column(column, justify="left" if column == "model" else "right")
    for label, name in (("small CNN", "cnn"), ("EfficientNet-Lite0", "efficientnet-lite0")):
        rate, one_ms = inference_speed(archive.images, name, num_classes, repeats)
        inference.add_row(label, f"{rate:.0f}", f"{one_ms:.1f}")
    return training, inference


def jax_speeds(archive_dir: Path, steps: int, batch_size: int) -> dict[str, float]:
    """Runs in a fresh process on JAX with 2 host devices: the small CNN's training images/s
    on one device, then data-parallel over both."""
    from melanoma.data.archive import open_archive
    from melanoma.modeling.distribute import start_data_parallel

    archive = open_archive(archive_dir)
    rows = archive.indices("train")
    single = images_per_second(archive.images, archive.labels, rows, steps=steps, batch_size=batch_size)
    parallel = start_data_parallel(None)
    both = images_per_second(archive.images, archive.labels, rows, steps=steps, batch_size=batch_size,
                             shard=parallel.shard)
    return {"single": single, "data_parallel": both, "devices": len(parallel.devices)}


def engine_table(archive, archive_dir: Path, steps: int, batch_size: int) -> Table:
    rate = images_per_second(archive.images, archive.labels, archive.indices("train"), steps=steps, batch_size=batch_size)
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    child = subprocess.run([sys.executable, __file__, "--jax-child", str(archive_dir), "--steps", str(steps),
                            "--batch-size", str(batch_size)], check=True, capture_output=True, text=True, env=env)
    jax = json.loads(child.stdout.strip().splitlines()[-1])
    table = Table(title=f"Small CNN training speed by engine (global batch {batch_size}, with augmentation, "
                  f"{os.cpu_count()} CPU cores)")
    for column in ("engine", "images/s", "ratio to TensorFlow"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for label, value in (("TensorFlow (default), 1 CPU device", rate), ("JAX, 1 CPU device", jax["single"]),
                         (f"JAX data-parallel, {jax['devices']} XLA host devices", jax["data_parallel"])):
        table.add_row(label, f"{value:.1f}", f"{value / rate:.2f}")
    return table


def feed_comparison(archive, steps: int, batch_size: int, rounds: int) -> list[tuple[str, float]]:
    rows = archive.indices("train")
    in_memory = np.ascontiguousarray(archive.images[rows])
    labels_in_memory = archive.labels[rows]
    results: dict[str, list[float]] = {"memory-mapped archive": [], "in-memory array (baseline)": []}
    for _ in range(rounds):  # alternate, so that load from other processes hits both alike
        results["memory-mapped archive"].append(
            images_per_second(archive.images, archive.labels, rows, steps=steps, batch_size=batch_size))
        results["in-memory array (baseline)"].append(
            images_per_second(in_memory, labels_in_memory, np.arange(len(rows)), steps=steps, batch_size=batch_size))
    return [(name, float(np.median(values))) for name, values in results.items()]


def build_big_archive(source_dir: Path, out: Path, n_images: int, size: int) -> Path:
    """A raw ``.npy`` of ``n_images`` real images at ``size`` px, by repeating the source's."""
    import cv2

    from melanoma.data.archive import open_archive

    source = open_archive(source_dir)
    resized = np.stack([cv2.resize(np.asarray(image), (size, size), interpolation=cv2.INTER_LINEAR)
                        for image in source.images])
    images = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(n_images, size, size, 3))
    for start in range(0, n_images, len(resized)):
        stop = min(n_images, start + len(resized))
        images[start:stop] = resized[:stop - start]
    images.flush()
    del images
    np.save(out.with_suffix(".labels.npy"), np.resize(source.labels, n_images))
    return out


def train_from_big_archive(path: Path, steps: int, batch_size: int) -> dict[str, float]:
    """Runs in a fresh process: train the CNN from the memory-mapped big archive, report peak RSS."""
    images = np.load(path, mmap_mode="r")
    labels = np.load(path.with_suffix(".labels.npy"))
    rate = images_per_second(images, labels, np.arange(len(images)), steps=steps, batch_size=batch_size)
    return {"peak_rss_bytes": peak_rss_bytes(), "images_per_second": rate, "n_images": len(images), "size": images.shape[1]}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork + exec, so the child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=Path("data/archive"), help="A prepared archive of real images.")
    parser.add_argument("--steps", type=int, default=30, help="Timed training steps per measurement.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds of the feed comparison (median).")
    parser.add_argument("--repeats", type=int, default=10, help="Timed inference batches per model.")
    parser.add_argument("--big-images", type=int, default=25_000)
    parser.add_argument("--big-size", type=int, default=224)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/melanoma-bench-train"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--jax-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--only-engines", action="store_true", help="Measure only the engines (table 4).")
    args = parser.parse_args()
    if args.jax_child:
        print(json.dumps(jax_speeds(args.jax_child, args.steps, args.batch_size)))
        return
    if args.child:
        print(json.dumps(train_from_big_archive(args.child, args.steps, args.batch_size)))
        return

    from melanoma.data.archive import open_archive

    console = Console()
    if args.only_engines:
        console.print(engine_table(open_archive(args.archive), args.archive, args.steps, args.batch_size))
        return
    console.print(f"Feed comparison on {args.archive} ({args.steps} steps x {args.batch_size} images, {args.rounds} rounds) ...")
    archive = open_archive(args.archive)
    rates = feed_comparison(archive, args.steps, args.batch_size, args.rounds)
    baseline = rates[1][1]
    table = Table(title="Small CNN training throughput (with augmentation)")
    for column in ("fed from", "images/s", "ratio to in-memory"):
        table.add_column(column, justify="left" if column == "fed from" else "right")
    for name, rate in rates:
        table.add_row(name, f"{rate:.1f}", f"{rate / baseline:.2f}")
    console.print(table)

    console.print(f"Training and inference speed per model ({args.steps} steps x {args.batch_size} images) ...")
    for table in model_speeds(archive, args.steps, args.batch_size, args.repeats):
        console.print(table)
    console.print(engine_table(archive, args.archive, args.steps, args.batch_size))

    args.workdir.mkdir(parents=True, exist_ok=True)
    big = args.workdir / f"big_{args.big_images}x{args.big_size}.npy"
    console.print(f"Writing {args.big_images:,} images at {args.big_size} px into {big} ...")
    build_big_archive(args.archive, big, args.big_images, args.big_size)
    try:
        child = subprocess.run([sys.executable, __file__, "--child", str(big), "--steps", str(args.steps),
                                "--batch-size", str(args.batch_size)], check=True, capture_output=True, text=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        big.unlink(missing_ok=True)
        big.with_suffix(".labels.npy").unlink(missing_ok=True)
    naive = args.big_images * args.big_size ** 2 * 3 * 4
    table = Table(title=f"Memory: training from {args.big_images:,} images at {args.big_size} px")
    for column in ("way", "peak RSS", "note"):
        table.add_column(column)
    table.add_row("memory-mapped archive + per-batch float32 (measured)", f"{measured['peak_rss_bytes'] / GB:.2f} GB",
                  f"{args.steps} steps, {measured['images_per_second']:.1f} img/s; target < 3 GB")
    table.add_row("whole archive as float32 (naive, computed)", f"{naive / GB:.2f} GB", "not attempted")
    table.add_row("whole archive as uint8 on disk", f"{naive / 4 / GB:.2f} GB", "memory-mapped, paged in on demand")
    console.print(table)


if __name__ == "__main__":
    main()
