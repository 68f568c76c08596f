from pathlib import Path

import pytest

from producer.errors import ConfigError
from producer.settings import DEFAULT_MODEL_DIR, Settings, redact_url


def test_defaults_without_environment() -> None:
    s = Settings.from_env({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.batch_size == 64
    assert s.model_dir == DEFAULT_MODEL_DIR
    assert s.model_path is None


def test_environment_overrides() -> None:
    s = Settings.from_env(
        {
            "BATCHERY_REDIS_URL": "redis://r:6380/2",
            "BATCHERY_BATCH_SIZE": "128",
            "BATCHERY_BATCH_WAIT_MS": "2.5",
            "BATCHERY_RESULT_TTL": "60",
            "BATCHERY_MODEL_DIR": "/srv/models",
            "BATCHERY_MODEL_PATH": "/srv/models/x/3",
        }
    )
    assert (s.redis_url, s.batch_size, s.batch_wait_ms, s.result_ttl_s) == (
        "redis://r:6380/2",
        128,
        2.5,
        60,
    )
    assert s.model_dir == Path("/srv/models")
    assert s.model_path == Path("/srv/models/x/3")


@pytest.mark.parametrize(
    ("name", "value"),
    [("BATCHERY_BATCH_SIZE", "lots"), ("BATCHERY_BATCH_SIZE", "0"), ("BATCHERY_RESULT_TTL", "-1")],
)
def test_bad_values_are_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://batchery:s3cret@h/0", "redis://batchery:***@h/0"),
        ("redis://:pa/ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://:pa#ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://:p@ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://:a@b/c@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://:pa;ss@h/0", "redis://:***@h/0"),
        ("redis://u:p:w@h/0", "redis://u:***@h/0"),
        ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=***"),
        ("redis://h/0?password=a@b&db=1", "redis://h/0?password=***&db=1"),
        ("redis://h/0?db=1&PASSWORD=x", "redis://h/0?db=1&PASSWORD=***"),
        ("rediss://u:pw@h:6380/0?ssl_cert_reqs=required",
         "rediss://u:***@h:6380/0?ssl_cert_reqs=required"),
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("unix:///tmp/r.sock?password=x", "unix:///tmp/r.sock?password=***"),
        ("sentinel://:pw@h1:26379;sentinel://:pw@h2:26379/0",
         "sentinel://:***@h1:26379;sentinel://:***@h2:26379/0"),
        ("sentinel://h1:26379/0?sentinel_password=x", "sentinel://h1:26379/0?sentinel_password=***"),
    ],
)  # fmt: skip
def test_redact_url_hides_every_password_form(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_url_hides_password_only() -> None:
    assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("rediss://:pw@host/1") == "rediss://:***@host/1"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_metrics_port_and_log_format() -> None:
    settings = Settings.from_env({"BATCHERY_METRICS_PORT": "9100", "BATCHERY_LOG_FORMAT": "JSON"})
    assert (settings.metrics_port, settings.log_format) == (9100, "json")
    assert Settings.from_env({}).metrics_port is None
    with pytest.raises(ConfigError, match="use text or json"):
        Settings.from_env({"BATCHERY_LOG_FORMAT": "xml"})


def test_task_events_are_on_unless_turned_off() -> None:
    assert Settings.from_env({}).task_events is True
    assert Settings.from_env({"BATCHERY_TASK_EVENTS": "0"}).task_events is False
    with pytest.raises(ConfigError, match="use 1 or 0"):
        Settings.from_env({"BATCHERY_TASK_EVENTS": "sometimes"})
    from worker.app import create_app

    assert create_app(Settings(task_events=False)).conf.worker_send_task_events is False
    assert create_app(Settings()).conf.worker_send_task_events is True
