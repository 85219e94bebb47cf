"""Temperature scaling (Guo et al. 2017): one number that makes probabilities honest.

The models output softmax probabilities, so their log-probabilities serve as logits:
``log p = z - logsumexp(z)`` differs from the logits ``z`` by a constant per image, which
the softmax ignores, so ``softmax(log p / T) == softmax(z / T)``. The temperature ``T`` is
fitted on the validation split by minimising the negative log-likelihood; it rescales the
confidence without changing the predicted class.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from melanoma.errors import ModelError

# The fitted temperature is kept inside these bounds (log-space search): outside them a
# model is either uniform or one-hot, and the validation split is too small or broken.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """float64 log-probabilities; exact zeros (float32 softmax underflow) become the log
    of the smallest normal float32, far below anything that matters after scaling."""
    return np.log(np.clip(np.asarray(probabilities, np.float64), np.finfo(np.float32).tiny, None))


def temperature_scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``, row by row, as float32."""
    if temperature == 1.0:
        return np.asarray(probabilities, np.float32)
    return np.exp(log_softmax(log_probabilities(probabilities) / temperature, axis=1)).astype(np.float32)


def negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL of the true classes after scaling by ``temperature``."""
    scaled = log_softmax(log_probabilities(probabilities) / temperature, axis=1)
    return float(-scaled[np.arange(len(labels)), labels].mean())


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature that minimises the NLL of ``labels`` (integer classes) under
    ``probabilities`` (N, C)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ModelError("Cannot fit a temperature: no validation images.")
    result = minimize_scalar(lambda log_t: negative_log_likelihood(labels, probabilities, float(np.exp(log_t))),
                             bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))
