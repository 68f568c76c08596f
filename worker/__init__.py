"""Batchery's worker side: the Celery app, the batched task, the models. Imports TensorFlow."""
