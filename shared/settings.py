"""Configuration of every creditwatch service, read from ``CREDITWATCH_*`` environment variables.

One `Settings` class serves all three services (they may share a process in dev mode); the
per-service parts (database file, port) are derived from the service name.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "KAFKA_SASL_MECHANISMS",
    "KAFKA_SECURITY_PROTOCOLS",
    "ConfigError",
    "Settings",
    "load_settings",
    "redact_url",
]

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
# Only the mechanisms that need nothing beyond a username and password; GSSAPI and
# OAUTHBEARER need callables/ticket caches that an environment variable cannot carry.
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
KAFKA_SECURITY_PROTOCOLS: tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

_URL_PASSWORD = re.compile(r"(?P<prefix>://[^:/?#@]*:)(?P<password>[^@/?#]*)(?P<suffix>@)")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the setting, never a secret."""


def redact_url(url: str) -> str:
    """``scheme://user:secret@host/db`` → ``scheme://user:***@host/db`` (for repr and logs)."""
    return _URL_PASSWORD.sub(r"\g<prefix>***\g<suffix>", url)


class Settings(BaseSettings):
    """All options, each overridable by ``CREDITWATCH_<FIELD NAME>`` (case-insensitive)."""

    model_config = SettingsConfigDict(
        env_prefix="CREDITWATCH_",
        extra="ignore",
        # CREDITWATCH_POLICY= (empty) means "not set", not the current directory.
        env_ignore_empty=True,
        frozen=True,
        # A failed model-level check would otherwise print every input, secrets included.
        hide_input_in_errors=True,
        validate_default=True,
    )

    # --- storage -------------------------------------------------------------------------
    database_url: str = Field(
        default="sqlite+aiosqlite:///.creditwatch/{service}.db",
        description="SQLAlchemy async URL; '{service}' is replaced by the service name.",
    )

    # --- Kafka ---------------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: KafkaSaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted kafka_ssl_keyfile."
    )
    # Idempotent producing (the relay, simulate, import): the broker drops a batch a retry
    # sends again, so a record is written once and in order even across lost acknowledgements.
    # Default: on, except in dev mode, whose embedded broker (Tansu) does not offer it.
    kafka_idempotent: bool | None = None

    # --- policy and access ---------------------------------------------------------------
    policy: Path | None = Field(
        default=None, description="Policy YAML; None means the packaged default policy."
    )
    api_tokens: SecretStr | None = Field(
        default=None,
        repr=False,
        description='JSON {"<token>": {"principal": "...", "scopes": [...]}}.',
    )
    api_tokens_file: Path | None = None
    dev_mode: bool = False

    # --- topics (contract defaults) ------------------------------------------------------
    topic_customers: str = "crm.customers"
    topic_invoices: str = "ar.invoices"
    topic_payments: str = "ar.payments"
    topic_overdue: str = "ar.overdue"
    topic_financials: str = "crm.financials"
    topic_credit_reports: str = "crm.credit-reports"
    topic_assessments: str = "credit.assessments"
    topic_limits: str = "credit.limits"
    topic_exposure: str = "credit.exposure"
    topic_alerts: str = "credit.alerts"
    topic_dlq: str = "credit.dlq"
    # Partitions for topics that `creditwatch dev` creates; the unit of scale-out.
    topic_partitions: int = Field(default=4, ge=1, le=1000)

    # --- HTTP ----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    assessment_port: int = Field(default=8001, ge=1, le=65535)
    limits_port: int = Field(default=8002, ge=1, le=65535)
    alerts_port: int = Field(default=8003, ge=1, le=65535)
    # How long an idle keep-alive connection is kept open. Clients and load balancers should
    # give up on idle connections sooner (a request sent as the server closes one fails):
    # 120 s is above Go's 90 s and the usual 60 s of load balancers.
    http_keep_alive_s: int = Field(default=120, ge=1, le=3600)
    # How long an Idempotency-Key is remembered (shared.idempotency): a retry within this
    # gets the stored answer; later, the key is free and the request runs again.
    idempotency_ttl_h: float = Field(default=24.0, gt=0, le=24 * 365)

    # --- processing loop -----------------------------------------------------------------
    consumer_max_records: int = Field(default=500, ge=1)
    consumer_poll_timeout_ms: int = Field(default=200, ge=0)
    # Consumer groups are "<prefix>-<service>"; two deployments on one cluster need two.
    consumer_group_prefix: str = "creditwatch"
    # A killed consumer's partitions move to a survivor after this long (broker minimum 6 s).
    consumer_session_timeout_ms: int = Field(default=10000, ge=1000)
    consumer_heartbeat_interval_ms: int = Field(default=2000, ge=100)
    outbox_poll_interval_s: float = Field(default=0.05, gt=0)
    # Woken by a commit, the relay waits this long for the next ones to join its produce
    # request (0: none). Adds at most this to an output event's latency.
    outbox_linger_ms: float = Field(default=5.0, ge=0, le=1000)
    # Under a steady flow of commits, the least time between the starts of two relay cycles
    # (0: none): bounds the produce requests (and outbox reads) a second under load. Adds at
    # most this to an output event's latency while commits keep coming.
    outbox_interval_ms: float = Field(default=25.0, ge=0, le=10000)
    # A relay that does not lead (another process of the service publishes) tries to take
    # over this often: the most an output event waits after the publishing process is gone.
    outbox_takeover_s: float = Field(default=1.0, gt=0, le=60)
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    # What a consumer does when a stored offset belongs to another log than the broker's
    # (another cluster id, or past the partition's end: a broker that lost its data, a topic
    # deleted and made again). "fail": stop with an error naming the partition (production:
    # an operator decides, e.g. with `creditwatch offsets reset`). "restart": consume that
    # partition again from its beginning, with one warning (events already stored are
    # recognised by id). Default: "restart" in dev mode (its embedded broker keeps nothing
    # across restarts), "fail" otherwise.
    consumer_on_new_log: Literal["fail", "restart"] | None = None
    # How long a stopping process waits for its loops (the batch in hand, leaving the group,
    # the relay's last cycle) before it cancels them: within a container's stop grace period
    # (Kubernetes: 30 s, compose: 10 s) even with the database and the broker unreachable.
    shutdown_timeout_s: float = Field(default=8.0, gt=0, le=300)
    # How often the broker is asked for its metadata (readiness, the cluster id).
    broker_probe_interval_s: float = Field(default=2.0, gt=0, le=60)

    # --- logging -------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = False

    # ------------------------------------------------------------------------------------
    @field_validator("log_level", mode="before")
    @classmethod
    def _normalise_log_level(cls, value: Any) -> Any:
        if isinstance(value, str):
            upper = value.strip().upper()
            if upper not in LOG_LEVELS:
                raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
            return upper
        return value

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper_case(cls, value: Any) -> Any:
        if isinstance(value, str):
            stripped = value.strip().upper()
            return stripped or None
        return value

    @field_validator(
        "topic_customers",
        "topic_invoices",
        "topic_payments",
        "topic_overdue",
        "topic_financials",
        "topic_credit_reports",
        "topic_assessments",
        "topic_limits",
        "topic_exposure",
        "topic_alerts",
        "topic_dlq",
    )
    @classmethod
    def _valid_topic_name(cls, value: str) -> str:
        # Kafka's own rule; failing here beats an opaque broker error at first produce.
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", value) or value in (".", ".."):
            raise ValueError("must be 1-249 characters of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("database_url", "kafka_bootstrap")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> Settings:
        protocol = self.kafka_security_protocol
        if protocol.startswith("SASL_"):
            if self.kafka_sasl_mechanism is None:
                raise ValueError(
                    f"kafka_sasl_mechanism is required when kafka_security_protocol is {protocol}"
                )
            if not self.kafka_sasl_username:
                raise ValueError(
                    f"kafka_sasl_username is required when kafka_security_protocol is {protocol}"
                )
            if self.kafka_sasl_password is None:
                raise ValueError(
                    f"kafka_sasl_password is required when kafka_security_protocol is {protocol}"
                )
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ValueError("kafka_ssl_keyfile is set but kafka_ssl_certfile is not")
        return self

    # ------------------------------------------------------------------------------------
    def topic_of_type(self) -> dict[str, str]:
        """Each contract event type's topic, as configured (for the wrong-topic check)."""
        from shared.events import TOPIC_OF_TYPE

        by_default = {
            "crm.customers": self.topic_customers,
            "ar.invoices": self.topic_invoices,
            "ar.payments": self.topic_payments,
            "ar.overdue": self.topic_overdue,
            "crm.financials": self.topic_financials,
            "crm.credit-reports": self.topic_credit_reports,
            "credit.assessments": self.topic_assessments,
            "credit.limits": self.topic_limits,
            "credit.exposure": self.topic_exposure,
            "credit.alerts": self.topic_alerts,
            "credit.dlq": self.topic_dlq,
        }
        return {type_: by_default[topic] for type_, topic in TOPIC_OF_TYPE.items()}

    @property
    def idempotent_producer(self) -> bool:
        """Whether producers ask the broker for idempotence (``kafka_idempotent``)."""
        if self.kafka_idempotent is not None:
            return self.kafka_idempotent
        return not self.dev_mode

    @property
    def on_new_log(self) -> Literal["fail", "restart"]:
        if self.consumer_on_new_log is not None:
            return self.consumer_on_new_log
        return "restart" if self.dev_mode else "fail"

    def database_url_for(self, service: str) -> str:
        """The database URL of one service (``{service}`` in the template replaced)."""
        return self.database_url.replace("{service}", service)

    def port_for(self, service: str) -> int:
        """The HTTP port of ``assessment``, ``limits`` or ``alerts``."""
        ports = {
            "assessment": self.assessment_port,
            "limits": self.limits_port,
            "alerts": self.alerts_port,
        }
        try:
            return ports[service]
        except KeyError:
            raise ValueError(f"unknown service {service!r}") from None

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """Security keyword arguments for aiokafka producers, consumers and admin clients.

        ``bootstrap_servers`` is not included: pass ``settings.kafka_bootstrap`` yourself.
        """
        kwargs: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self._ssl_context()
        if self.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            # The validator guarantees all three are present.
            assert self.kafka_sasl_password is not None
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            kwargs["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        return kwargs

    def kafka_producer_kwargs(self) -> dict[str, Any]:
        """``kafka_client_kwargs`` plus the producer's idempotence (``idempotent_producer``)."""
        return {**self.kafka_client_kwargs(), "enable_idempotence": self.idempotent_producer}

    def producer_failure_hint(self, error: BaseException) -> str:
        """What to add to a producer's failure: an idempotent producer fails against a broker
        that lacks idempotence (the embedded dev broker answers InitProducerId with an
        unknown error), which its error does not say. Nothing for a broker not reached."""
        from aiokafka.errors import KafkaConnectionError

        if not self.idempotent_producer or isinstance(error, KafkaConnectionError | OSError):
            return ""
        return (
            " (the producer is idempotent: a broker without idempotent producers, such as "
            "the embedded dev broker, needs CREDITWATCH_KAFKA_IDEMPOTENT=false)"
        )

    def _ssl_context(self) -> ssl.SSLContext:
        from aiokafka.helpers import create_ssl_context

        # An empty password makes OpenSSL fail on an encrypted key instead of prompting on a
        # terminal the service does not have.
        password = self.kafka_ssl_password.get_secret_value() if self.kafka_ssl_password else ""
        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=self.kafka_ssl_cafile,
                certfile=self.kafka_ssl_certfile,
                keyfile=self.kafka_ssl_keyfile,
                password=password,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "cannot build the Kafka TLS context from kafka_ssl_cafile/kafka_ssl_certfile/"
                f"kafka_ssl_keyfile: {exc.__class__.__name__}: {exc.strerror or exc}"
            ) from None
        return context

    @field_serializer("database_url", when_used="json")
    def _redacted_database_url(self, value: str) -> str:
        # JSON dumps end up in logs and support tickets; Python dumps stay usable.
        return redact_url(value)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "database_url" and isinstance(value, str):
                yield name, redact_url(value)
            else:
                yield name, value


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus ``overrides``) and turn validation failures into `ConfigError`.

    The message names each offending ``CREDITWATCH_*`` variable; inputs are never echoed.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            location = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if location:
                problems.append(f"CREDITWATCH_{location.upper()}: {message}")
            else:
                problems.append(message)
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
