"""Melanoma classifier: a research sandbox for dermoscopic skin-lesion classification."""

__version__ = "0.1.0"
