"""Archive rows into a model: the batch feed for training and prediction, and the check that
an archive is the one a run was trained on."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from melanoma.data.archive import read_rows
from melanoma.errors import ModelError
from melanoma.modeling.distribute import Shard
from melanoma.modeling.metrics import normalised

if TYPE_CHECKING:
    from melanoma.data.archive import Archive


class ArchiveFeed(keras.utils.PyDataset):
    """Batches of float32 images (0..255) and integer labels from archive rows.

    Only one batch is ever converted to float32. With ``shuffle``, the order of each epoch
    is drawn from (seed, epoch), so it does not depend on how the run was interrupted;
    ``row_probabilities`` (one per row) turns shuffling into sampling with replacement.
    ``labels`` holds the label of every archive row; ``rows`` are the rows to feed.
    With a ``shard`` (data-parallel training), ``batch_size`` is the global batch and this
    feed yields only the shard's slice of each global batch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, *, batch_size: int,
                 shuffle: bool = False, seed: int = 0, first_epoch: int = 0,
                 row_probabilities: np.ndarray | None = None, workers: int = 2, max_queue_size: int = 4,
                 shard: Shard | None = None):
        # Two threads fill a queue of at most `max_queue_size` batches, in order. Without the
        # queue, Keras hands the feed to tf.data with an autotuned prefetch buffer, which
        # grew to 7.8 GB when training from 25,000 images at 224 px.
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max_queue_size)
        self.images, self.labels, self.rows = images, labels, np.asarray(rows)
        self.shuffle, self.seed, self.global_batch, self.shard = shuffle, seed, batch_size, shard
        self.batch_size = batch_size if shard is None else batch_size // shard.count
        self.row_probabilities = row_probabilities
        self.epoch = first_epoch
        self.order = self._local_order()

    def _local_order(self) -> np.ndarray:
        order = self._epoch_order()
        return order if self.shard is None else self.shard.local_rows(order, self.global_batch)

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.row_probabilities is not None:
            return rng.choice(self.rows, size=len(self.rows), p=self.row_probabilities)
        return rng.permutation(self.rows)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # Sorted rows read the archive file sequentially; the order inside a batch is irrelevant.
        rows = np.sort(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        return read_rows(self.images, rows).astype(np.float32), self.labels[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._local_order()



def predict_rows(model: Any, archive: Archive, rows: np.ndarray, batch_size: int = 64, *, tta: bool = False) -> np.ndarray:
    """Class probabilities of archive rows, read batch by batch from the memory map;
    ``tta`` averages them over the 8 flips/rotations of each image."""
    from melanoma.modeling.predict import tta_mean

    feed = ArchiveFeed(archive.images, archive.labels, rows, batch_size=batch_size)
    if not tta:
        return normalised(model.predict(feed, verbose=0))
    return normalised(np.concatenate([tta_mean(model.predict_on_batch, feed[index][0]) for index in range(len(feed))]))



def check_archive(meta: dict[str, Any], archive: Archive) -> None:
    recorded = (meta.get("archive") or {}).get("sha256")
    if recorded and recorded != archive.header.get("sha256"):
        raise ModelError(f"The archive {archive.path} is not the one run {meta.get('run_id')} was trained on "
                         f"({meta['archive'].get('path')}): its splits may differ.",
                         hint=f"Pass --archive {meta['archive'].get('path')}.")
    if list(archive.classes) != list(meta.get("classes", [])):
        raise ModelError(f"The archive {archive.path} has classes {archive.classes}, the run has {meta.get('classes')}.")
