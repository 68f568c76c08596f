"""Every error a Batchery user can see. One hierarchy, one place."""

from __future__ import annotations


class BatcheryError(Exception):
    """Base class of every error Batchery raises on purpose."""


class ConfigError(BatcheryError):
    """A setting (environment variable or flag) has a value Batchery cannot use."""


class InvalidImageError(BatcheryError):
    """An input is not an image Batchery accepts (missing, empty, too big, wrong format)."""


class ImageTooLargeError(InvalidImageError):
    """An input is over the byte limit (BATCHERY_MAX_IMAGE_BYTES): an HTTP 413."""


class UnsupportedFormatError(InvalidImageError):
    """An input is an image in a format outside the allow-list (GIF, TIFF, ...): an HTTP 415."""


class WebhookRefusedError(BatcheryError):
    """A callback URL is not one this deployment may call (scheme, form, or allow-list)."""


class WireError(BatcheryError):
    """A message or result on the wire cannot be decoded."""


class InvalidJobError(WireError):
    """A job breaks the wire's rules (a name, an id, a size, a count): that job is refused."""

    #: The refused job's id, when that much of it was valid (so it can be answered).
    job_id: str | None = None


class ModelNotFoundError(BatcheryError):
    """A job or command names a model or version the registry does not hold."""


class ModelLoadError(BatcheryError):
    """A model exists in the registry but cannot be loaded safely."""


class PromotionRefusedError(BatcheryError):
    """An optimised version scores too far below its source to be promoted without --force."""


class BatchContractError(BatcheryError):
    """A forward pass returned a different number of outputs than it was given inputs."""


class ResultTimeoutError(BatcheryError):
    """A job's result did not arrive within the time the caller was willing to wait."""


class RedisUnavailableError(BatcheryError):
    """Redis cannot be reached at the configured URL."""


class ReplicaAckError(BatcheryError):
    """Fewer replicas than BATCHERY_REPLICA_ACKS confirmed a write in time: failover may lose it."""


class QueueFullError(BatcheryError):
    """The queue is at BATCHERY_MAX_QUEUE, or Redis is out of memory: nothing was enqueued."""


class JobNotFoundError(BatcheryError):
    """A job id Redis knows nothing of: never submitted, or its result and record expired."""


class FeedbackError(BatcheryError):
    """Feedback (``Client.feedback``) that cannot be recorded: see the subclasses."""


class JobNotAnsweredError(FeedbackError):
    """Feedback on a job not answered yet: there is no prediction to judge (an HTTP 409)."""


class NoPredictionError(FeedbackError):
    """Feedback on a job answered without a prediction: FAILURE, EXPIRED or CANCELLED (409)."""


class FeedbackGivenError(FeedbackError):
    """A job's feedback was already given: one feedback a job (an HTTP 409)."""


class InvalidLabelError(FeedbackError):
    """A feedback label that is not a label, or not one of the model version's (an HTTP 400)."""


class NoWorkerError(BatcheryError):
    """Workers are up but none can serve the job (every one is a lite, LiteRT-only worker):
    nothing was enqueued (an HTTP 503)."""
