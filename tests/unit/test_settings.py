"""Settings: contract defaults, CREDITWATCH_* overrides, validation naming the field, no leaks."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import pytest

from shared.settings import ConfigError, Settings, load_settings, redact_url


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CREDITWATCH_"):
            monkeypatch.delenv(name)


def test_defaults_are_the_contracts_topics_ports_and_dev_friendly_storage() -> None:
    # Given no configuration at all
    # When settings are loaded
    settings = Settings()

    # Then every default is the contract's
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert (
        settings.topic_customers,
        settings.topic_invoices,
        settings.topic_payments,
        settings.topic_overdue,
        settings.topic_financials,
        settings.topic_credit_reports,
        settings.topic_assessments,
        settings.topic_limits,
        settings.topic_exposure,
        settings.topic_alerts,
        settings.topic_dlq,
    ) == (
        "crm.customers",
        "ar.invoices",
        "ar.payments",
        "ar.overdue",
        "crm.financials",
        "crm.credit-reports",
        "credit.assessments",
        "credit.limits",
        "credit.exposure",
        "credit.alerts",
        "credit.dlq",
    )
    assert (settings.assessment_port, settings.limits_port, settings.alerts_port) == (
        8001,
        8002,
        8003,
    )
    assert settings.host == "127.0.0.1"
    assert settings.dev_mode is False
    assert settings.policy is None
    assert settings.consumer_max_records == 500
    assert settings.consumer_poll_timeout_ms == 200
    assert settings.outbox_poll_interval_s == 0.05
    assert settings.scheduler_interval_s == 1.0
    assert settings.log_level == "INFO"


def test_database_url_template_is_formatted_per_service() -> None:
    settings = Settings()

    assert settings.database_url_for("limits") == "sqlite+aiosqlite:///.creditwatch/limits.db"
    assert settings.database_url_for("alerts") == "sqlite+aiosqlite:///.creditwatch/alerts.db"


def test_environment_variables_with_the_creditwatch_prefix_override_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given CREDITWATCH_* variables
    monkeypatch.setenv("CREDITWATCH_KAFKA_BOOTSTRAP", "kafka-1:9093,kafka-2:9093")
    monkeypatch.setenv("CREDITWATCH_TOPIC_INVOICES", "erp.invoices.v2")
    monkeypatch.setenv("CREDITWATCH_LIMITS_PORT", "9002")
    monkeypatch.setenv("CREDITWATCH_DEV_MODE", "true")
    monkeypatch.setenv("CREDITWATCH_POLICY", "/etc/creditwatch/policy.yaml")
    monkeypatch.setenv("CREDITWATCH_LOG_LEVEL", "debug")

    # When settings are loaded
    settings = Settings()

    # Then they win over the defaults
    assert settings.kafka_bootstrap == "kafka-1:9093,kafka-2:9093"
    assert settings.topic_invoices == "erp.invoices.v2"
    assert settings.limits_port == 9002
    assert settings.port_for("limits") == 9002
    assert settings.dev_mode is True
    assert settings.policy == Path("/etc/creditwatch/policy.yaml")
    assert settings.log_level == "DEBUG"


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITWATCH_POLICY", "")

    assert Settings().policy is None


def test_an_invalid_value_is_reported_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a port that is not a number
    monkeypatch.setenv("CREDITWATCH_LIMITS_PORT", "eighty")

    # When the configuration is loaded
    with pytest.raises(ConfigError) as raised:
        load_settings()

    # Then the message names the variable
    assert "CREDITWATCH_LIMITS_PORT" in str(raised.value)


def test_an_invalid_topic_name_is_reported_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="CREDITWATCH_TOPIC_DLQ"):
        load_settings(topic_dlq="credit dlq!")


def test_sasl_without_credentials_is_rejected_naming_the_missing_field_not_the_password() -> None:
    # Given SASL with a password but neither mechanism nor username
    # When the configuration is loaded
    with pytest.raises(ConfigError) as raised:
        load_settings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_password="hunter2-kafka",
        )

    # Then the missing field is named and the password is not echoed
    assert "kafka_sasl_username" in str(raised.value)
    assert "hunter2-kafka" not in str(raised.value)


def test_secrets_do_not_appear_in_repr_str_json_or_log_output(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given settings holding a token, a Kafka password and a database password
    monkeypatch.setenv(
        "CREDITWATCH_API_TOKENS",
        '{"tok-very-secret-123": {"principal": "erp", "scopes": ["credit:check"]}}',
    )
    monkeypatch.setenv("CREDITWATCH_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("CREDITWATCH_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("CREDITWATCH_KAFKA_SASL_USERNAME", "creditwatch")
    monkeypatch.setenv("CREDITWATCH_KAFKA_SASL_PASSWORD", "kafka-pa55word")
    monkeypatch.setenv(
        "CREDITWATCH_DATABASE_URL", "postgresql+asyncpg://cw:db-pa55word@db:5432/{service}"
    )
    settings = Settings()

    # When they are printed and logged
    logger = logging.getLogger("creditwatch.test")
    with caplog.at_level(logging.DEBUG, logger="creditwatch.test"):
        logger.info("settings: %s", settings)
        logger.info("settings: %r", settings)
        logger.info("settings: %s", settings.model_dump_json())
    rendered = [repr(settings), str(settings), settings.model_dump_json(), caplog.text]

    # Then no secret shows, while the secrets stay usable
    for text in rendered:
        assert "tok-very-secret-123" not in text
        assert "kafka-pa55word" not in text
        assert "db-pa55word" not in text
    assert "cw:***@db" in repr(settings)
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == "kafka-pa55word"
    assert "db-pa55word" in settings.database_url_for("limits")


def test_redact_url_masks_only_the_password() -> None:
    assert redact_url("postgresql://u:p%40ss@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert redact_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"


def test_plaintext_kafka_needs_no_security_kwargs() -> None:
    assert Settings().kafka_client_kwargs() == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_kwargs_carry_mechanism_and_credentials() -> None:
    settings = Settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="cw",
        kafka_sasl_password="s3cret",
    )

    assert settings.kafka_client_kwargs() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "cw",
        "sasl_plain_password": "s3cret",
    }


def test_ssl_kwargs_carry_an_ssl_context() -> None:
    settings = Settings(kafka_security_protocol="SSL")

    kwargs = settings.kafka_client_kwargs()

    assert kwargs["security_protocol"] == "SSL"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


def test_an_unreadable_ca_file_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    settings = Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "missing.pem")

    with pytest.raises(ConfigError, match="kafka_ssl_cafile"):
        settings.kafka_client_kwargs()


def test_unknown_security_protocol_is_rejected_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="CREDITWATCH_KAFKA_SECURITY_PROTOCOL"):
        load_settings(kafka_security_protocol="KERBEROS")


def test_settings_are_immutable() -> None:
    settings = Settings()

    with pytest.raises(ValueError):
        settings.dev_mode = True  # type: ignore[misc]
