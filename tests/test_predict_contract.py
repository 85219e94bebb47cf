"""The model's input contract: `Predictor.predict_arrays` takes pixels as the model was
trained on (uint8, or floats in 0..255) and refuses anything else with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from melanoma.errors import ImageError

pytestmark = pytest.mark.realdata


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda shape: np.full(shape, np.nan, np.float32), "NaN or infinite"),
        (lambda shape: np.full(shape, np.inf, np.float64), "NaN or infinite"),
        (lambda shape: np.full(shape, -1e6, np.float32), "0..255"),
        (lambda shape: np.full(shape, 256.0, np.float32), "0..255"),
        (lambda shape: np.zeros(shape, np.int64), "dtype int64"),
        (lambda shape: np.ones(shape, bool), "dtype bool"),
    ],
)
def test_predict_arrays_refuses_what_is_not_pixels(predictor, make, message: str) -> None:
    shape = (2, predictor.image_size, predictor.image_size, 3)
    with pytest.raises(ImageError, match=message):
        predictor.predict_arrays(make(shape))


def test_predict_arrays_takes_uint8_and_the_same_values_as_floats(predictor) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, predictor.image_size, predictor.image_size, 3), dtype=np.uint8)
    np.testing.assert_allclose(predictor.predict_arrays(images), predictor.predict_arrays(images.astype(np.float32)),
                               atol=1e-6)
