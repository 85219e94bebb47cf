"""Benchmark `prepare` on ISIC-sized inputs: the pipeline against a naive baseline.

Makes 1024x1024 JPEGs (quality 95) by upscaling real HAM10000 images, then measures, in
the same run and on the same files:

- naive: full-size ``cv2.imread`` + ``cv2.resize``, one process;
- pipeline: ``read_dataset`` + ``build_archive`` on a folder-per-class data set, with
  reduced-size JPEG decoding, vignette crop, colour constancy, all cores;

the peak memory (ru_maxrss of a fresh process running the whole prepare, and of its
largest worker) for two data set sizes, to show that it does not grow with the number
of images, and the cost of the framing: ``load_image`` with ``crop`` (the baseline) and
``lesion`` (which searches for the lesion) on the real files, one process, interleaved.

    .venv/bin/python benchmarks/prepare.py [--n 2000] [--sizes 128,224] [--workdir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from melanoma.config import Settings
from melanoma.data.archive import build_archive
from melanoma.data.preprocess import PreprocessParams, load_image
from melanoma.data.sources import read_dataset

REPO = Path(__file__).resolve().parents[1]
HAM_DIR = REPO.parent / "shared" / "data" / "ham10000"
ISIC_DIR = REPO.parent / "shared" / "data" / "isic2019" / "ISIC_2019_Training_Input"
INPUT_SIDE = 1024
JPEG_QUALITY = 95
console = Console()


def ham_images(ham_dir: Path) -> pd.DataFrame:
    """image_id, dx and path of every HAM10000 image."""
    metadata = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    paths = {p.stem: p for part in ("HAM10000_images_part_1", "HAM10000_images_part_2") for p in (ham_dir / part).glob("*.jpg")}
    metadata["path"] = metadata["image_id"].map(paths)
    return metadata.dropna(subset=["path"]).sort_values("image_id").reset_index(drop=True)


def _upscale(job: tuple[str, str]) -> None:
    source, target = job
    image = cv2.resize(cv2.imread(source), (INPUT_SIDE, INPUT_SIDE), interpolation=cv2.INTER_CUBIC)
    _, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    tmp = Path(target + ".tmp")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, target)


def make_inputs(workdir: Path, n: int, ham: pd.DataFrame) -> list[Path]:
    """n upscaled JPEGs in workdir/inputs/<dx>/ (HAM images reused, renamed, beyond 10,015);
    files made by an earlier run are kept."""
    jobs, files = [], []
    for i in range(n):
        row = ham.iloc[i % len(ham)]
        name = row["image_id"] + (f"_copy{i // len(ham)}" if i >= len(ham) else "")
        target = workdir / "inputs" / row["dx"] / f"{name}.jpg"
        files.append(target)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(row["path"]), str(target)))
    if jobs:
        with ProcessPoolExecutor(os.cpu_count()) as pool, Progress(console=console) as bar:
            task = bar.add_task(f"Making {len(jobs):,} {INPUT_SIDE}x{INPUT_SIDE} JPEGs", total=len(jobs))
            for _ in pool.map(_upscale, jobs, chunksize=16):
                bar.advance(task)
    return files


def subset(workdir: Path, files: list[Path]) -> Path:
    """A folder-per-class data set of exactly these files (hard links: no copies)."""
    root = workdir / f"set-{len(files)}"
    for path in files:
        link = root / path.parent.name / path.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, link)
    return root


def naive_rates(files: list[Path], size: int) -> tuple[float, float]:
    """Images per second and per CPU-second of the obvious loop: decode the whole image,
    resize it, keep it."""
    out = np.empty((len(files), size, size, 3), np.uint8)
    wall, cpu = time.perf_counter(), time.process_time()
    for i, path in enumerate(files):
        out[i] = cv2.resize(cv2.imread(str(path)), (size, size))
    return len(files) / (time.perf_counter() - wall), len(files) / (time.process_time() - cpu)


def prepare(root: Path, out_dir: Path, size: int) -> float:
    """Seconds for the real prepare (read the data set, build the archive, all cores)."""
    settings = Settings(image_size=size)
    started = time.perf_counter()
    dataset = read_dataset(root, "folder")
    build_archive(
        dataset,
        out_dir,
        PreprocessParams.from_settings(settings),
        seed=settings.seed,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        test_where=None,
        workers=settings.workers,
        force=True,
        progress=False,
    )
    return time.perf_counter() - started


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the process ended meanwhile
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _memory_mb(pid: int) -> tuple[float, float]:
    """The process's peak resident memory (VmHWM) and its current anonymous part (RssAnon)."""
    try:
        lines = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(lines["VmHWM"].split()[0]) / 1024, int(lines["RssAnon"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return 0.0, 0.0


def _cpu_seconds(pid: int) -> float:
    """User + system time of a process and of the children it has reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def prepare_child(root: Path, out_dir: Path, size: int) -> None:
    """Run one prepare in this fresh process; print its time, CPU time and memory as JSON.

    The workers are started by a forkserver, so they are not this process's children and
    RUSAGE_CHILDREN misses them: a thread samples every descendant's memory, and their CPU
    time is read from the forkserver, which has reaped them, before this process exits.
    """
    peaks: dict[int, float] = {}
    anonymous: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for pid in _descendants(os.getpid()):
                peak, anon = _memory_mb(pid)
                peaks[pid], anonymous[pid] = max(peak, peaks.get(pid, 0.0)), max(anon, anonymous.get(pid, 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_before = sum(os.times()[:4])
    seconds = prepare(root, out_dir, size)
    done.set()
    sampler.join()
    cpu = sum(os.times()[:4]) - cpu_before + sum(_cpu_seconds(pid) for pid in _descendants(os.getpid()))
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu, "main_mb": main_mb,
        "worker_mb": max(peaks.values(), default=0.0), "worker_anon_mb": max(anonymous.values(), default=0.0),
        "total_mb": main_mb + sum(peaks.values()),
    }))


def run_prepare(workdir: Path, files: list[Path], size: int) -> dict[str, float]:
    """prepare_child in a fresh interpreter, on a data set of exactly ``files``."""
    root = subset(workdir, files)
    out_dir = workdir / "archives" / f"{len(files)}-{size}"
    command = [sys.executable, __file__, "--child", str(root), "--workdir", str(out_dir), "--sizes", str(size)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"The prepare run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def framing_rates(files: list[Path], size: int, repeat: int) -> dict[str, float]:
    """Images per second of load_image with each framing (best of ``repeat`` interleaved passes)."""
    best = {"crop": 0.0, "lesion": 0.0}
    for _ in range(repeat):
        for mode, rate in best.items():
            params = PreprocessParams(size, resize_mode=mode)
            started = time.perf_counter()
            for path in files:
                load_image(path, params)
            best[mode] = max(rate, len(files) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images for the throughput runs")
    parser.add_argument("--sizes", default="128,224", help="target sizes, comma-separated")
    parser.add_argument("--memory-n", default="2000,8000", help="data set sizes for the peak-memory runs")
    parser.add_argument("--naive-n", type=int, default=500, help="images for the (slow) naive baseline")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions of each throughput run")
    parser.add_argument("--framing-n", type=int, default=500, help="real images of each source for the framing table")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/melanoma-bench"))
    parser.add_argument("--ham-dir", type=Path, default=HAM_DIR)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 images, memory at 200 and 800, no repeats")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: one prepare run
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        prepare_child(args.child, args.workdir, sizes[0])
        return
    if args.quick:
        args.n, args.memory_n, args.naive_n, args.repeat, args.framing_n = 200, "200,800", 50, 1, 100
    n, naive_n, memory_ns = args.n, min(args.naive_n, args.n), [int(m) for m in args.memory_n.split(",")]

    files = make_inputs(args.workdir, max(n, *memory_ns), ham_images(args.ham_dir))
    for path in files[:n]:  # the same page cache for both sides
        path.read_bytes()
    mean_kb = np.mean([f.stat().st_size for f in files[:n]]) / 1024
    console.print(
        f"Inputs: {INPUT_SIDE}x{INPUT_SIDE} JPEGs (q{JPEG_QUALITY}, {mean_kb:.0f} KB on average); {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f} at the start. Naive: {naive_n:,} images in this process. Pipeline: "
        f"{n:,} images, each run a fresh process (worker start-up, splits, checksum included)."
    )

    speed = Table(title=f"prepare: best of {args.repeat} interleaved runs (higher is better)")
    columns = ("size", "naive images/s", "pipeline images/s", "ratio", "naive images/CPU-s", "pipeline images/CPU-s", "ratio")
    for column in columns:
        speed.add_column(column, justify="right")
    for size in sizes:
        naive, pipeline = [], []
        for _ in range(args.repeat):  # interleaved, so that both sides share the machine's ups and downs
            naive.append(naive_rates(files[:naive_n], size))
            run = run_prepare(args.workdir, files[:n], size)
            pipeline.append((n / run["seconds"], n / run["cpu_seconds"]))
        (naive_wall, naive_cpu), (pipeline_wall, pipeline_cpu) = np.max(naive, axis=0), np.max(pipeline, axis=0)
        speed.add_row(
            f"{size} px", f"{naive_wall:,.0f}", f"{pipeline_wall:,.0f}", f"{pipeline_wall / naive_wall:.1f}x",
            f"{naive_cpu:,.0f}", f"{pipeline_cpu:,.0f}", f"{pipeline_cpu / naive_cpu:.1f}x",
        )
    console.print(speed)

    memory = Table(title=f"prepare at {sizes[0]} px: peak resident memory (MB) by data set size")
    columns = ("images", "main", "largest worker", "its anonymous part", "all processes", "archive size", "images/s")
    for column in columns:
        memory.add_column(column, justify="right")
    for count in memory_ns:
        run = run_prepare(args.workdir, files[:count], sizes[0])
        archive_mb = count * sizes[0] ** 2 * 3 / 2**20
        peaks = (run[key] for key in ("main_mb", "worker_mb", "worker_anon_mb", "total_mb"))
        memory.add_row(f"{count:,}", *(f"{mb:,.0f}" for mb in peaks), f"{archive_mb:,.0f}", f"{count / run['seconds']:,.0f}")
    console.print(memory)

    framing = Table(title=f"load_image, one process, best of {args.repeat}: crop (baseline) vs lesion framing, images/s")
    for column in ("images", "size", "crop", "lesion", "lesion / crop"):
        framing.add_column(column, justify="right")
    sources = {"HAM10000 200x150": sorted(ham_images(args.ham_dir)["path"])[: args.framing_n],
               "ISIC Archive 256x256": sorted(ISIC_DIR.glob("*.jpg"))[: args.framing_n],
               f"{INPUT_SIDE}x{INPUT_SIDE} JPEGs": files[: args.framing_n]}
    for name, paths in sources.items():
        for size in sizes:
            rates = framing_rates(paths, size, args.repeat)
            framing.add_row(f"{len(paths):,} {name}", f"{size} px", f"{rates['crop']:,.0f}", f"{rates['lesion']:,.0f}",
                            f"{rates['lesion'] / rates['crop']:.2f}x")
    console.print(framing)
    console.print(f"Load average {os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
