"""The engine a run uses: the Keras backend, its devices, and data-parallel training.

- :func:`use_backend` picks the Keras backend (``tensorflow`` or ``jax``); Keras reads it
  once, when it is first imported, so the CLI calls this before anything imports Keras.
- :func:`start_data_parallel` sets up ``keras.distribution.DataParallel`` (JAX backend) over
  every device of the job; given a :class:`Job` of several processes it first joins them
  with ``keras.distribution.initialize`` (``jax.distributed`` underneath: NCCL between GPUs,
  gloo between CPU hosts).
- In a data-parallel run the batch size is the *global* batch: each of the P processes
  feeds ``batch / P`` images of every step (:class:`Shard`: its slice of the same seeded
  epoch order), and the learning rate applies to that global batch, as on one device.
  Only process 0 writes the run folder (:func:`process_run_dir`).
- :func:`shard_of` splits a list of files for the tasks of a scheduler's array job.

Nothing here imports Keras or JAX at module level.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from melanoma.errors import MelanomaError, ModelError
from melanoma.modeling.runs import LAST_FILE, RUN_FILE

BACKENDS = ("tensorflow", "jax")
DATA_PARALLEL = "data-parallel"
DISTRIBUTIONS = (DATA_PARALLEL,)
_BACKEND_PACKAGES = {"tensorflow": ("tensorflow-cpu", "tensorflow"), "jax": ("jax",)}
_HOST_PORT = re.compile(r"^[^\s:,]+:(\d{1,5})$")

T = TypeVar("T")


# --------------------------------------------------------------------------- backend


def use_backend(name: str) -> None:
    """Make Keras run on ``name`` ("tensorflow" or "jax"). Keras reads ``KERAS_BACKEND`` when
    it is first imported; once imported on another backend, it cannot switch (ModelError)."""
    if name not in BACKENDS:
        raise ModelError(f"Unknown Keras backend {name!r}: choose one of {', '.join(BACKENDS)}.")
    if "keras" in sys.modules:
        import keras

        current = keras.backend.backend()
        if current != name:
            raise ModelError(f"Keras already runs on {current} in this process: it cannot switch to {name}.",
                             hint="Choose the backend before Keras is imported (melanoma --backend, MELANOMA_BACKEND).")
        return
    os.environ["KERAS_BACKEND"] = name


def engine_info(parallel: Parallel | None = None) -> dict[str, Any]:
    """What runs a model in this process: backend and its version, the devices, and the
    distribution (recorded in run.json, printed by the CLI)."""
    import keras

    backend = keras.backend.backend()
    info: dict[str, Any] = {"backend": backend, "backend_version": _version(*_BACKEND_PACKAGES.get(backend, ())),
                            "keras": keras.__version__}
    if parallel is None:
        info.update(devices=list(_local_devices(backend)), distribute=None, processes=1)
    else:
        info.update(devices=list(parallel.devices), distribute=DATA_PARALLEL, processes=parallel.process_count)
    return info


def describe_engine(info: dict[str, Any], parallel: Parallel | None = None) -> str:
    """One line for the terminal, from :func:`engine_info`."""
    devices = info["devices"]
    line = f"Keras {info['keras']} on {info['backend']} {info['backend_version'] or ''}".rstrip()
    line += f", {len(devices)} device{'s' if len(devices) != 1 else ''} ({', '.join(devices)})"
    if info["distribute"]:
        line += f", {info['distribute']} across {info['processes']} process{'es' if info['processes'] != 1 else ''}"
    if parallel is not None and parallel.process_count > 1:
        line += f" (this is process {parallel.process_index})"
    return line


def use_xla(model: Any) -> bool:
    """Whether to compile ``model``'s training step with XLA (``jit_compile``).

    Not on TensorFlow: XLA makes these convolutions several times slower on a CPU. Always
    on JAX, which without jit runs the step op by op; Keras marks RandomRotation and
    RandomZoom as not compilable for TensorFlow's sake, but their JAX versions compile, so
    they are marked compilable here.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        return False
    for layer in model._flatten_layers():
        if isinstance(layer, (keras.layers.RandomRotation, keras.layers.RandomZoom)):
            layer.supports_jit = True
    return True


def _local_devices(backend: str) -> list[str]:
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id}" for d in jax.local_devices()]
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name.removeprefix("/device:").lower() for d in tf.config.list_logical_devices()]
    return []


def _version(*packages: str) -> str | None:
    for package in packages:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return None


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Job:
    """A training job of several processes; this one is ``process_id`` (0 is the
    coordinator, at ``coordinator`` HOST:PORT; None: JAX reads it from the cluster's
    environment, e.g. SLURM's)."""

    num_processes: int
    process_id: int
    coordinator: str | None


def job_from(num_processes: int | None, process_id: int | None, coordinator: str | None,
             environ: Mapping[str, str]) -> Job | None:
    """The job this process belongs to: from the three options (all or none), else from a
    SLURM step of several tasks (``srun``); None for a job of one process."""
    given = {"--num-processes": num_processes, "--process-id": process_id, "--coordinator": coordinator}
    if any(value is not None for value in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise MelanomaError(f"A multi-process job needs {', '.join(given)} together; {', '.join(missing)} "
                                "is missing.", hint="See docs/scale-out.md.")
        match = _HOST_PORT.match(coordinator)
        if not match or not 0 < int(match.group(1)) < 65536:
            raise MelanomaError(f"--coordinator {coordinator!r} is not HOST:PORT (e.g. 10.0.0.1:7777).")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise MelanomaError(f"--process-id {process_id} is not in 0..{num_processes - 1} "
                                f"(--num-processes {num_processes}).")
        return Job(num_processes, process_id, coordinator) if num_processes > 1 else None
    tasks = environ.get("SLURM_NTASKS", "1")
    if tasks.isdigit() and int(tasks) > 1 and "SLURM_PROCID" in environ and "SLURM_STEP_NODELIST" in environ:
        return Job(int(tasks), int(environ["SLURM_PROCID"]), None)
    return None


@dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count``: the part of every global batch that it feeds."""

    index: int
    count: int

    def local_rows(self, order: np.ndarray, global_batch: int) -> np.ndarray:
        """This process's rows of an epoch in ``order``: the order is filled up to whole
        global batches by wrapping around to its start (every step then has the same shape on
        every device and process), then each batch is cut into ``count`` equal slices."""
        order = np.asarray(order)
        if len(order) == 0:
            return order
        order = np.concatenate([order, np.resize(order, -len(order) % global_batch)])
        return order.reshape(-1, self.count, global_batch // self.count)[:, self.index].ravel()


@dataclass(frozen=True)
class Parallel:
    """A data-parallel job as this process sees it (from :func:`start_data_parallel`)."""

    process_index: int
    process_count: int
    devices: tuple[str, ...]  # every device of the job, in mesh order

    @property
    def is_chief(self) -> bool:
        """Process 0: the one that writes the run folder and prints the progress."""
        return self.process_index == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.process_index, self.process_count)

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly over the devices."""
        if batch_size % len(self.devices):
            raise ModelError(f"The batch size {batch_size} does not split over the {len(self.devices)} devices "
                             f"of this data-parallel job.",
                             hint=f"Choose a multiple of {len(self.devices)} (the batch size is the global batch).")

    def round_up(self, batch_size: int) -> int:
        """The smallest multiple of the number of devices that is at least ``batch_size``."""
        return math.ceil(batch_size / len(self.devices)) * len(self.devices)


def start_data_parallel(job: Job | None) -> Parallel:
    """Join ``job`` (if any) and make Keras train data-parallel over all of its devices.

    Call before any model is built; JAX backend only.
    """
    import keras

    if keras.backend.backend() != "jax":
        raise ModelError(f"Data-parallel training needs the JAX backend; Keras runs on {keras.backend.backend()}.",
                         hint="melanoma --backend jax train --distribute data-parallel ... (or MELANOMA_BACKEND=jax).")
    import jax

    if job is not None:
        # Between CPU hosts the collectives go through gloo (GPUs use NCCL whatever this says).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            keras.distribution.initialize(job.coordinator, job.num_processes, job.process_id)
        except Exception as exc:  # noqa: BLE001 - JAX raises RuntimeError/ValueError/XlaRuntimeError for a failed join
            where = job.coordinator or "the address from SLURM"
            raise ModelError(f"Process {job.process_id} of {job.num_processes} cannot join the job at {where}: {exc}",
                             hint="Start every process with the same --num-processes and --coordinator.") from None
    devices = tuple(keras.distribution.list_devices())
    # Each process feeds its own Shard of the archive rows (ArchiveFeed), so Keras must not shard again.
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=list(devices), auto_shard_dataset=False))
    return Parallel(jax.process_index(), jax.process_count(), devices)


def parallel_job(distribute: str | None, num_processes: int | None, process_id: int | None, coordinator: str | None,
                 environ: Mapping[str, str]) -> Parallel | None:
    """The train command's ``--distribute`` and job options, set up (:func:`start_data_parallel`);
    None: train on one device."""
    if distribute is None:
        if (num_processes, process_id, coordinator) != (None, None, None):
            raise MelanomaError("A multi-process job (--num-processes, --process-id, --coordinator or "
                                "KERAS_DISTRIBUTION_*) needs --distribute data-parallel.")
        return None
    if distribute not in DISTRIBUTIONS:
        raise MelanomaError(f"Unknown --distribute {distribute!r}: choose one of {', '.join(DISTRIBUTIONS)}.")
    return start_data_parallel(job_from(num_processes, process_id, coordinator, environ))


@contextmanager
def process_run_dir(run_dir: Path, parallel: Parallel | None, resume: bool) -> Iterator[Path]:
    """Where this process keeps its run files: ``run_dir`` itself for process 0 (or a single
    process); for the others a private temporary folder, deleted afterwards. All processes
    then do the same bookkeeping, so their training loops stay in step, yet only process 0
    writes the run folder and its checkpoints. To resume, the others read run.json and
    last.keras from the shared run folder."""
    if parallel is None or parallel.is_chief:
        yield Path(run_dir)
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"melanoma-process{parallel.process_index}-"))
    try:
        if resume:
            for name in (RUN_FILE, LAST_FILE):
                if (Path(run_dir) / name).is_file():
                    shutil.copy2(Path(run_dir) / name, scratch / name)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class ReplicatedPredict:
    """Class probabilities of a feed's rows, the same on every process of a data-parallel job.

    Each process feeds its :class:`Shard` of every batch; the model runs on the global
    batch and the output is replicated to every device, so each process reads all of it
    (``model.predict`` would hand each process only its own part). Compiled once per model.
    """

    def __init__(self, model: Any):
        import jax
        import keras
        from jax.sharding import NamedSharding, PartitionSpec

        distribution = keras.distribution.distribution()
        mesh = distribution.device_mesh.backend_mesh
        self.model = model
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(distribution.batch_dim_name))
        self.step = jax.jit(lambda trainable, non_trainable, x: model.stateless_call(trainable, non_trainable, x)[0],
                            out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, batches: Sequence[tuple[np.ndarray, Any]], n_rows: int) -> np.ndarray:
        """``batches`` are this process's slices (a sharded ArchiveFeed); the first
        ``n_rows`` rows of the result are the unpadded ones, in the feed's order."""
        import jax

        trainable = [v.value for v in self.model.trainable_variables]
        non_trainable = [v.value for v in self.model.non_trainable_variables]
        outputs = []
        for index in range(len(batches)):
            local = np.asarray(batches[index][0], np.float32)
            x = jax.make_array_from_process_local_data(self.batch_sharding, local)
            outputs.append(np.asarray(self.step(trainable, non_trainable, x)))
        return np.concatenate(outputs)[:n_rows]


# --------------------------------------------------------------------------- array jobs


def shard_of(items: Sequence[T], spec: str) -> list[T]:
    """Part I of N (spec "I/N", I counted from 0) of ``items``: N contiguous, near-equal
    parts, so that the parts' outputs, concatenated in order, are the output of all items."""
    match = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise MelanomaError(f"--shard {spec!r} is not I/N with 0 <= I < N (e.g. 0/4 is the first of 4 parts).")
    index, count = int(match.group(1)), int(match.group(2))
    parts = np.array_split(np.arange(len(items)), count)
    if len(parts[index]) == 0:
        raise MelanomaError(f"Part {index}/{count} of {len(items)} image(s) is empty.",
                            hint=f"Split them into at most {len(items)} parts.")
    return [items[i] for i in parts[index]]

