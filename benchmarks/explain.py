"""Speed of prediction and explanation: the usual way vs the project's way, in one run.

    .venv/bin/python benchmarks/explain.py [--run RUN] [--images DIR] [--n 20] [--lime-images 2]

Without --run it builds an untrained `build_model("cnn", image_size=128, num_classes=7)`
run in a temporary folder (the timings do not depend on the weights). Images are real
HAM10000 files. Every baseline is measured in the same process, on the same images:

- LIME, 1,000 samples: `lime` as usually written (LimeImageExplainer defaults, quickshift
  segmentation, `model.predict` as the classifier function, batches of 10) vs
  `explain_lime` (array-built perturbations, batches of 128 through the Predictor);
- Grad-CAM per image (the traced GradientTape function);
- one image: `model.predict` per call vs `Predictor.predict_arrays` (predict_on_batch);
- ONNX Runtime vs Keras, one image and batches of 64.

Targets on 2 CPU cores: LIME >= 5x faster, Grad-CAM < 50 ms, one image < 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TQDM_DISABLE", "1")  # lime's per-sample progress bar

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "ham10000" / "HAM10000_images_part_1"
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def median_seconds(work: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def untrained_run(folder: Path, image_size: int) -> Path:
    """A run folder holding an untrained small CNN (timings do not depend on the weights)."""
    from melanoma.data.preprocess import PreprocessParams
    from melanoma.files import write_json
    from melanoma.modeling.models import build_model

    build_model("cnn", num_classes=len(HAM_CLASSES), image_size=image_size).save(folder / "model.keras")
    write_json(folder / "run.json", {
        "run_id": "benchmark-untrained-cnn", "model": "cnn", "weights": "none", "classes": HAM_CLASSES,
        "image_size": image_size, "preprocess": PreprocessParams(image_size=image_size).to_dict(),
        "status": "complete",
    })
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: an untrained 128 px CNN)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of real dermoscopy JPEGs")
    parser.add_argument("--n", type=int, default=20, help="images for the Grad-CAM and latency timings")
    parser.add_argument("--lime-images", type=int, default=2, help="images explained with LIME each way")
    parser.add_argument("--samples", type=int, default=1000, help="LIME samples")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="melanoma-bench-") as scratch:
        benchmark(args, Path(scratch))


def benchmark(args: argparse.Namespace, scratch: Path) -> None:
    import keras
    from lime import lime_image

    from melanoma.modeling.explain import SegmentationParams, explain_lime, gradcam_for
    from melanoma.modeling.export import export_model
    from melanoma.modeling.predict import Predictor

    console = Console()
    if args.run is None:
        run_dir = untrained_run(scratch, 128)
    else:  # export into a copy, so that the user's run folder is left as it is
        run_dir = scratch / "run"
        run_dir.mkdir()
        for name in ("run.json", "model.keras"):
            (run_dir / name).write_bytes((args.run / name).read_bytes())
    predictor = Predictor.from_run(run_dir)
    model = predictor.model
    files = sorted(args.images.glob("*.jpg"))[: args.n]
    if not files:
        raise SystemExit(f"No JPEG images in {args.images}.")
    images = np.stack([predictor.preprocess(f) for f in files])
    rows: list[tuple[str, str, float, float]] = []  # what, unit, baseline, project

    # LIME, 1,000 samples
    usual_explainer = lime_image.LimeImageExplainer(random_state=0)
    lime_usual, lime_project, lime_quickshift = [], [], []
    for image in images[: args.lime_images]:
        start = time.perf_counter()
        usual_explainer.explain_instance(image, lambda x: model.predict(x, verbose=0), num_samples=args.samples,
                                         random_seed=0)
        lime_usual.append(time.perf_counter() - start)
        for params, times in ((SegmentationParams(), lime_project),
                              (SegmentationParams(algorithm="quickshift"), lime_quickshift)):
            start = time.perf_counter()
            explain_lime(predictor, image, num_samples=args.samples, seed=0, top_k=5, segmentation=params)
            times.append(time.perf_counter() - start)
    usual = statistics.median(lime_usual)
    rows.append((f"LIME {args.samples} samples (SLIC)", "s", usual, statistics.median(lime_project)))
    rows.append((f"LIME {args.samples} samples (quickshift)", "s", usual, statistics.median(lime_quickshift)))
    # Both ways run the model on every sample: its forward passes alone bound the speed-up.
    samples = np.resize(images, (args.samples, *images.shape[1:]))
    rows.append((f"  bound: the model alone on {args.samples} images", "s", usual,
                 median_seconds(lambda: predictor.predict_arrays(samples), 2, warmup=1)))

    # Grad-CAM per image (the baseline column: one model.predict call, for scale)
    gradcam = gradcam_for(predictor)
    classes = predictor.predict_arrays(images).argmax(axis=1)
    cam_times = [median_seconds(lambda i=i: gradcam(images[i : i + 1], classes[i : i + 1]), 5) for i in range(len(images))]
    predict_one = median_seconds(lambda: model.predict(images[:1], verbose=0), 10)
    rows.append(("Grad-CAM, one image", "ms", predict_one * 1e3, statistics.median(cam_times) * 1e3))

    # One image: model.predict per call vs the Predictor
    rows.append(("predict one image (array)", "ms", predict_one * 1e3,
                 median_seconds(lambda: predictor.predict_arrays(images[:1]), 50) * 1e3))
    rows.append(("predict one image (JPEG file, incl. decoding)", "ms",
                 median_seconds(lambda: model.predict(predictor.preprocess(files[0])[None], verbose=0), 10) * 1e3,
                 median_seconds(lambda: predictor.predict(files[:1]), 20) * 1e3))

    # ONNX Runtime vs Keras
    export_model(run_dir, "onnx")
    onnx = Predictor.from_run(run_dir, engine="onnx")
    batch = np.concatenate([images] * (64 // len(images) + 1))[:64]
    rows.append(("Keras vs ONNX Runtime, one image", "ms",
                 median_seconds(lambda: predictor.predict_arrays(images[:1]), 50) * 1e3,
                 median_seconds(lambda: onnx.predict_arrays(images[:1]), 50) * 1e3))
    rows.append(("Keras vs ONNX Runtime, batch of 64", "ms",
                 median_seconds(lambda: predictor.predict_arrays(batch), 5) * 1e3,
                 median_seconds(lambda: onnx.predict_arrays(batch), 5) * 1e3))
    agreement = float(np.abs(predictor.predict_arrays(images) - onnx.predict_arrays(images)).max())

    table = Table(title=f"{predictor.run.meta.get('model')} at {predictor.image_size} px, {len(images)} real images, "
                  f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}), keras {keras.__version__}")
    for column in ("measurement", "baseline", "project", "speed-up"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for what, unit, base, ours in rows:
        table.add_row(what, f"{base:.3g} {unit}", f"{ours:.3g} {unit}", f"{base / ours:.1f}x")
    console.print(table)
    console.print("Baselines: LIME = lime defaults with model.predict, batches of 10; Grad-CAM and one image = "
                  "one model.predict call; ONNX rows = the Keras Predictor.")
    console.print(f"Keras vs ONNX max |difference| on these images: {agreement:.2e}")
    console.print(json.dumps({what: {"baseline": base, "project": ours, "unit": unit} for what, unit, base, ours in rows}))


if __name__ == "__main__":
    main()
