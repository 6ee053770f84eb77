"""Evaluation metrics: image-text retrieval (more follow with the evaluation stage)."""
