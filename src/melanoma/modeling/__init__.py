"""Modeling: models, training, evaluation, prediction and explanations."""
