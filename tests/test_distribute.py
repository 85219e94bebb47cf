"""The JAX backend and data-parallel training (keras.distribution), on this CPU.

This test process runs Keras on TensorFlow, and Keras cannot switch backends once
imported, so everything on JAX runs in subprocesses: two XLA host devices in one process
(``--xla_force_host_platform_device_count=2``), and two processes that train together
through the real CLI over 127.0.0.1 (JAX's gloo collectives).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma.data.archive import open_archive
from melanoma.errors import MelanomaError, ModelError
from melanoma.modeling.distribute import Shard, job_from, shard_of, use_backend

JAX_ENV = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def run_python(code: str, *, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def melanoma(*args: str | Path, env: dict[str, str] = JAX_ENV, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "melanoma", *map(str, args)], env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


# --------------------------------------------------------------------------- pure functions


def test_shards_cover_every_global_batch_in_equal_disjoint_slices() -> None:
    order = np.random.default_rng(0).permutation(np.arange(100, 123))  # 23 rows, global batch 8
    parts = [Shard(index, 2).local_rows(order, 8) for index in range(2)]
    assert [len(part) for part in parts] == [12, 12]  # 3 whole batches of 4 per process
    padded = np.concatenate([order, order[:1]])  # the last batch wraps around to the start
    for step in range(3):
        batch = np.concatenate([part[step * 4:(step + 1) * 4] for part in parts])
        np.testing.assert_array_equal(batch, padded[step * 8:(step + 1) * 8])
    single = Shard(0, 1).local_rows(order, 8)  # one process, several devices: whole batches only
    assert len(single) == 24 and set(single) == set(order)


def test_job_comes_from_the_options_or_slurm() -> None:
    assert job_from(None, None, None, {}) is None
    job = job_from(2, 1, "127.0.0.1:7777", {})
    assert (job.num_processes, job.process_id, job.coordinator) == (2, 1, "127.0.0.1:7777")
    assert job_from(1, 0, "host:7777", {}) is None  # one process: nothing to join
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[01-02]"}
    assert job_from(None, None, None, slurm).process_id == 3
    assert job_from(None, None, None, {**slurm, "SLURM_NTASKS": "1"}) is None
    with pytest.raises(MelanomaError, match="--coordinator is missing"):
        job_from(2, 0, None, {})
    with pytest.raises(MelanomaError, match="not HOST:PORT"):
        job_from(2, 0, "127.0.0.1", {})
    with pytest.raises(MelanomaError, match="not in 0..1"):
        job_from(2, 2, "127.0.0.1:7777", {})


def test_shard_of_splits_into_contiguous_parts() -> None:
    items = list(range(7))
    parts = [shard_of(items, f"{i}/3") for i in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    for bad in ("3/3", "1", "a/b", "-1/3"):
        with pytest.raises(MelanomaError, match="not I/N"):
            shard_of(items, bad)
    with pytest.raises(MelanomaError, match="empty"):
        shard_of(items[:2], "2/3")


def test_backend_cannot_change_once_keras_runs() -> None:
    import keras  # noqa: F401  (this process runs Keras on TensorFlow)

    use_backend("tensorflow")
    with pytest.raises(ModelError, match="already runs on tensorflow"):
        use_backend("jax")
    with pytest.raises(ModelError, match="Unknown Keras backend"):
        use_backend("torch")


def test_cli_refuses_data_parallel_on_tensorflow(cli, tmp_path: Path) -> None:
    result = cli("train", "--archive", tmp_path, "--distribute", "data-parallel")
    assert result.code == 2 and "needs the JAX backend" in result.stderr
    result = cli("--backend", "jax", "runs", "--dir", tmp_path)
    assert result.code == 2 and "cannot switch to jax" in result.stderr


# --------------------------------------------------------------------------- two devices, one process

DATA_PARALLEL_STEP = """
import json, keras, numpy as np
from melanoma.modeling.distribute import start_data_parallel
from melanoma.modeling.models import build_model
from melanoma.modeling.feed import ArchiveFeed
from melanoma.modeling.train import compile_for_training, training_model

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
labels = rng.integers(0, 3, 16)

def one_step(rows, parallel=None):
    keras.utils.set_random_seed(0)
    trainer = training_model(build_model("cnn", num_classes=3, image_size=32, weights="none"), augment=True, seed=0)
    compile_for_training(trainer, 1e-2)
    before = [np.asarray(w) for w in trainer.get_weights()]
    feed = ArchiveFeed(images, labels, rows, batch_size=len(rows), shard=parallel.shard if parallel else None)
    trainer.fit(feed, epochs=1, verbose=0)
    return before, [np.asarray(w) for w in trainer.get_weights()]

def norm(a, b):
    return float(np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b))))

initial, single = one_step(np.arange(16))
_, half = one_step(np.arange(8))  # what a device would learn from its half alone
parallel = start_data_parallel(None)
initial_dp, data_parallel = one_step(np.arange(16), parallel)
print(json.dumps({"devices": list(parallel.devices), "same_start": norm(initial, initial_dp),
                  "update": norm(single, initial), "dp_vs_single": norm(data_parallel, single),
                  "half_vs_single": norm(half, single)}))
"""


@pytest.mark.slow
def test_data_parallel_step_on_two_devices_equals_one_device_step() -> None:
    """Tolerance: the difference, relative to the size of the update, is below 1e-3
    (measured 9e-5 on this CPU: Adam divides each gradient by its own magnitude, which
    magnifies float rounding in tiny gradients; with SGD it is 2e-6). Training on half the
    batch, as a device without the gradient all-reduce would, moves it by over 1e-2."""
    env = {**JAX_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = json.loads(run_python(DATA_PARALLEL_STEP, env=env).stdout.strip().splitlines()[-1])
    assert result["devices"] == ["cpu:0", "cpu:1"]
    assert result["same_start"] == 0
    assert result["dp_vs_single"] / result["update"] < 1e-3
    assert result["half_vs_single"] / result["update"] > 1e-2


# --------------------------------------------------------------------------- two processes, the real CLI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(small_ham_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The small CNN trained for one epoch by two processes on 127.0.0.1; (run folder, logs)."""
    work = tmp_path_factory.mktemp("two_processes")
    scratch = work / "tmp"  # the processes' temporary folders: must be left empty
    scratch.mkdir()
    run_dir = work / "runs" / "dp"
    port = free_port()
    processes = []
    for process_id in range(2):
        log = (work / f"process{process_id}.log").open("w")
        processes.append((subprocess.Popen(
            [sys.executable, "-m", "melanoma", "--backend", "jax", "train", "--archive", str(small_ham_archive),
             "--model", "cnn", "--epochs", "1", "--batch-size", "32", "--seed", "0", "--run-dir", str(run_dir),
             "--distribute", "data-parallel", "--num-processes", "2", "--process-id", str(process_id),
             "--coordinator", f"127.0.0.1:{port}"],
            env={**JAX_ENV, "TMPDIR": str(scratch)}, stdout=log, stderr=subprocess.STDOUT), log))
    for process, log in processes:
        try:
            process.wait(timeout=900)
        finally:
            process.kill()
            log.close()
    logs = [(work / f"process{i}.log").read_text() for i in range(2)]
    for (process, _), text in zip(processes, logs):
        assert process.returncode == 0, text[-3000:]
    assert not any(scratch.iterdir()), "a process left files behind"
    return run_dir, logs


@pytest.mark.realdata
@pytest.mark.slow
def test_two_processes_train_one_run_that_tensorflow_loads(two_process_run: tuple[Path, list[str]],
                                                           small_ham_archive: Path) -> None:
    from melanoma.modeling.export import export_model
    from melanoma.modeling.metrics import melanoma_index, validation_scores
    from melanoma.modeling.predict import Predictor

    run_dir, logs = two_process_run
    assert [path.name for path in run_dir.parent.iterdir()] == ["dp"]
    assert {"run.json", "model.keras", "last.keras", "history.csv", "split.csv"} <= {p.name for p in run_dir.iterdir()}
    assert "this is process 0" in logs[0] and "this is process 1" in logs[1]
    assert "epoch 1/1" in logs[0] and "epoch 1/1" not in logs[1]  # only process 0 reports progress
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["epochs_done"] == 1
    engine = meta["engine"]
    assert engine["backend"] == "jax" and engine["distribute"] == "data-parallel" and engine["processes"] == 2
    assert len(engine["devices"]) == 2

    # The JAX-trained model on TensorFlow: the validation score process 0 recorded is reproduced.
    archive = open_archive(small_ham_archive)
    val_rows = archive.indices("val")
    predictor = Predictor.from_run(run_dir)
    probabilities = predictor.predict_arrays(archive.images[val_rows])
    scores = validation_scores(archive.labels[val_rows], probabilities, melanoma_index(archive.classes))
    assert scores["bma"] == pytest.approx(meta["best"]["val_bma"], abs=1e-6)
    export_model(run_dir)
    onnx = Predictor.from_run(run_dir, engine="onnx").predict_arrays(archive.images[val_rows])
    np.testing.assert_allclose(onnx, probabilities, atol=1e-4)


@pytest.mark.realdata
@pytest.mark.slow
def test_tensorflow_run_predicts_the_same_on_jax(trained_run: Path, predictor, ham_images_by_class: dict[str, Path]) -> None:
    images = sorted(ham_images_by_class.values())
    done = melanoma("--backend", "jax", "predict", "--run", trained_run, *images, "--format", "csv")
    on_jax = pd.read_csv(io.StringIO(done.stdout))
    on_tensorflow = predictor.predict(images)
    assert on_jax["file"].tolist() == [str(path) for path in images]
    np.testing.assert_allclose(on_jax[predictor.classes].to_numpy(), on_tensorflow, atol=1e-4)


# --------------------------------------------------------------------------- array jobs


@pytest.mark.realdata
def test_predict_shards_concatenate_to_one_run(cli, trained_run: Path, ham_images_by_class: dict[str, Path],
                                               tmp_path: Path) -> None:
    folder = tmp_path / "images"
    for name, path in ham_images_by_class.items():
        (folder / name).mkdir(parents=True)
        shutil.copy(path, folder / name / path.name)
    whole = tmp_path / "whole.csv"
    assert cli("predict", "--run", trained_run, "--input-dir", folder, "--out", whole).code == 0
    parts = []
    for index in range(3):
        part = tmp_path / f"part{index}.csv"
        assert cli("predict", "--run", trained_run, "--input-dir", folder, "--shard", f"{index}/3", "--out", part).code == 0
        parts.append(pd.read_csv(part))
    assert [len(part) for part in parts] == [3, 2, 2]
    # The same rows and predictions; float32 features differ in the last digits between batch sizes.
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), pd.read_csv(whole), check_exact=False,
                                  rtol=1e-3, atol=1e-6)
    result = cli("predict", "--run", trained_run, "--input-dir", folder, "--shard", "3/3")
    assert result.code == 2 and "not I/N" in result.stderr
