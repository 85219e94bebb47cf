"""The ISIC 2019 tables: submission (predictions) and ground truth, with the ISIC columns."""

from __future__ import annotations

import numpy as np
import pandas as pd

from melanoma.config import ISIC2019_CLASSES

# HAM10000's diagnosis codes -> the ISIC 2019 submission columns.
HAM_TO_ISIC = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "akiec": "AK", "bkl": "BKL", "df": "DF", "vasc": "VASC", "scc": "SCC"}
ISIC_COLUMNS = [*ISIC2019_CLASSES, "UNK"]


def isic_columns(classes: list[str]) -> list[str] | None:
    """The ISIC 2019 column of each class, or None if the classes are not ISIC/HAM ones."""
    mapped = [name if name in ISIC2019_CLASSES else HAM_TO_ISIC.get(name) for name in classes]
    return None if None in mapped or len(set(mapped)) != len(mapped) else mapped


def truth_table(image_ids: list[str], labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """The ground truth in the ISIC 2019 format (``ISIC_2019_Training_GroundTruth.csv``):
    ``image`` then a 1.0/0.0 column per class, with the columns of :func:`submission_table`."""
    return submission_table(image_ids, np.eye(len(classes))[labels], classes)


def submission_table(image_ids: list[str], probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Predictions in the ISIC submission format: ``image`` then one probability column per
    class (``MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK`` where the classes map to ISIC 2019, with
    0.0 for the classes the model does not know; otherwise the archive's own classes)."""
    columns = isic_columns(classes)
    table = pd.DataFrame({"image": list(image_ids)})
    if columns is None:
        for index, name in enumerate(classes):
            table[name] = probabilities[:, index].astype(np.float64)
        return table
    for name in ISIC_COLUMNS:
        table[name] = probabilities[:, columns.index(name)].astype(np.float64) if name in columns else 0.0
    return table
