"""``batchery bench``: Batchery against the usual ways of serving a model with Celery."""
