"""Publishing a batch of records once, for the command-line tools (simulate, import).

The services publish through their outbox relay; the tools publish a batch and exit. Their
producer is idempotent outside dev mode (``Settings.idempotent_producer``). A broker that lacks
idempotent producers (the embedded dev broker answers InitProducerId with an unknown error)
refuses it before any record goes out: an idempotent producer sends nothing until it holds a
producer id. So when idempotence was only the default (``CREDITWATCH_KAFKA_IDEMPOTENT`` unset)
and not one record was delivered, the batch is sent again without idempotence, and a warning
says so. Asked for explicitly, idempotence is never dropped: the failure names the setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import NamedTuple

from shared.events import KAFKA_HEADERS
from shared.settings import Settings

log = logging.getLogger("creditwatch.producing")


class Record(NamedTuple):
    topic: str
    key: bytes
    value: bytes


class PublishError(RuntimeError):
    """A batch that could not be published, with what to do about it."""


def _refused_idempotence(error: BaseException) -> bool:
    """Whether a failure is a broker's answer to InitProducerId that it lacks idempotence."""
    from aiokafka.errors import UnknownError, UnsupportedVersionError

    return isinstance(error, UnknownError | UnsupportedVersionError)


async def _send(settings: Settings, records: Sequence[Record], idempotent: bool) -> list[object]:
    """Send every record; the outcome of each (None, or its exception)."""
    from aiokafka import AIOKafkaProducer

    kwargs = settings.kafka_producer_kwargs()
    kwargs["enable_idempotence"] = idempotent
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=10, **kwargs
    )
    try:
        await producer.start()  # an idempotent producer asks for its id here (or at a send)
    except Exception as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        if _refused_idempotence(exc):
            return [exc] * len(records)  # nothing was handed over, nothing delivered
        raise
    try:
        futures = []
        failed: BaseException | None = None
        for r in records:
            try:
                # Structured-mode CloudEvents, as the services' own records say.
                futures.append(
                    await producer.send(r.topic, key=r.key, value=r.value, headers=KAFKA_HEADERS)
                )
            except Exception as exc:  # the sender failed (it raises again from send)
                failed = exc
                break
        results: list[object] = list(await asyncio.gather(*futures, return_exceptions=True))
        # Records never handed to the producer failed with what stopped it.
        results += [failed] * (len(records) - len(futures))
    finally:
        await producer.stop()
    return [r if isinstance(r, BaseException) else None for r in results]


async def publish(settings: Settings, records: Sequence[Record]) -> int:
    """Publish ``records`` (acks=all, in order per key); how many were published.

    Raises PublishError naming the cause (and CREDITWATCH_KAFKA_IDEMPOTENT where it helps) when
    any record was not delivered.
    """
    if not records:
        return 0
    idempotent = settings.idempotent_producer
    try:
        outcomes = await _send(settings, records, idempotent)
    except Exception as exc:
        raise PublishError(_describe(settings, exc, idempotent)) from exc
    errors = [e for e in outcomes if e is not None]
    if (
        errors
        and idempotent
        and settings.kafka_idempotent is None
        and len(errors) == len(records)
        and _refused_idempotence(errors[0])  # type: ignore[arg-type]
    ):
        log.warning(
            "the broker at %s refused an idempotent producer (%s); publishing without "
            "idempotence. Set CREDITWATCH_KAFKA_IDEMPOTENT=false to say so, or true to fail",
            settings.kafka_bootstrap,
            type(errors[0]).__name__,
        )
        idempotent = False
        try:
            outcomes = await _send(settings, records, idempotent)
        except Exception as exc:
            raise PublishError(_describe(settings, exc, idempotent)) from exc
        errors = [e for e in outcomes if e is not None]
    if errors:
        first = errors[0]
        assert isinstance(first, BaseException)
        raise PublishError(
            f"{len(errors)} of {len(records)} records not published: "
            + _describe(settings, first, idempotent)
        ) from first
    return len(records)


def _describe(settings: Settings, error: BaseException, idempotent: bool) -> str:
    text = f"{type(error).__name__}: {error}"
    if idempotent and _refused_idempotence(error):
        text += settings.producer_failure_hint(error)
    return text
