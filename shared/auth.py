"""Bearer-token authentication and scope checks for the HTTP APIs (contract §2).

Tokens come from ``CREDITWATCH_API_TOKENS`` (JSON) or the file named by
``CREDITWATCH_API_TOKENS_FILE``::

    {"<token>": {"principal": "order-entry", "scopes": ["credit:check"]}}

Routes declare what they need with ``Depends(require("credit:read"))``.

**Auth is decided before existence.** `require` is a dependency of the route, and FastAPI
resolves dependencies before it runs the handler, so an unauthenticated or unauthorised
caller gets 401/403 and never learns whether ``/v1/customers/C-1`` exists (no 404). Keep it
that way: look resources up in the handler (or in dependencies declared *after* the
``require`` one), never in a path-level dependency that runs first. (FastAPI reads and
decodes a JSON body before it resolves dependencies, so a body that is not JSON at all is
answered 422 even without a token; schema errors inside well-formed JSON come after auth.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.problems import Forbidden, Unauthorized
from shared.settings import ConfigError, Settings

__all__ = [
    "SCOPES",
    "ConfigError",
    "Principal",
    "TokenRegistry",
    "dev_tokens",
    "parse_bearer",
    "require",
]

SCOPES: frozenset[str] = frozenset(
    {"credit:check", "credit:read", "credit:write", "credit:approve", "alerts:write"}
)

# Only there so OpenAPI (and the "Authorize" button of /docs) knows about the scheme; the
# header is parsed by `require` itself to tell a missing header from a malformed one.
_bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a name (recorded as ``requested_by``/``changed_by``/``by``) and scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenRegistry:
    """The configured tokens, kept only as SHA-256 digests."""

    __slots__ = ("_by_digest", "generated")

    def __init__(
        self,
        tokens: Mapping[str, Principal],
        *,
        generated: Mapping[str, Principal] | None = None,
    ) -> None:
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {
            _digest(token): (_digest(token), principal) for token, principal in tokens.items()
        }
        # Plain-text tokens this process made up itself (dev mode), for the CLI to print.
        self.generated: dict[str, Principal] = dict(generated or {})

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings) -> TokenRegistry:
        """Load the tokens; outside dev mode refuse to start without any.

        In dev mode with none configured, two tokens are generated (see `dev_tokens`) and
        exposed as ``registry.generated``.
        """
        if settings.api_tokens is not None and settings.api_tokens_file is not None:
            raise ConfigError(
                "set either CREDITWATCH_API_TOKENS or CREDITWATCH_API_TOKENS_FILE, not both"
            )
        tokens: dict[str, Principal] = {}
        if settings.api_tokens is not None:
            tokens = parse_tokens(
                settings.api_tokens.get_secret_value(), source="CREDITWATCH_API_TOKENS"
            )
        elif settings.api_tokens_file is not None:
            tokens = load_tokens_file(settings.api_tokens_file)

        if tokens:
            return cls(tokens)
        if settings.dev_mode:
            generated = dev_tokens()
            return cls(generated, generated=generated)
        raise ConfigError(
            "no API tokens configured: outside dev mode the service refuses to start without "
            "tokens; set CREDITWATCH_API_TOKENS or CREDITWATCH_API_TOKENS_FILE"
        )

    # -- lookup ----------------------------------------------------------------------------
    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or None; timing does not depend on the tokens held."""
        digest = _digest(token)
        # The dict is keyed by a hash of the token, so the lookup reveals nothing usable about
        # stored tokens; compare_digest guards the final equality.
        stored_digest, principal = self._by_digest.get(digest, (b"\0" * 32, None))
        if principal is not None and hmac.compare_digest(stored_digest, digest):
            return principal
        return None

    def principals(self) -> list[Principal]:
        return [principal for _, principal in self._by_digest.values()]

    def __len__(self) -> int:
        return len(self._by_digest)

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def __repr__(self) -> str:
        names = sorted({principal.name for principal in self.principals()})
        return f"TokenRegistry({len(self)} tokens; principals={names})"


def parse_tokens(text: str, *, source: str) -> dict[str, Principal]:
    """Parse the token JSON; errors name ``source`` and the principal, never a token."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f'{source} must be a JSON object {{"<token>": {{"principal": ..., "scopes": [...]}}}}'
        )
    tokens: dict[str, Principal] = {}
    for position, (token, entry) in enumerate(raw.items(), start=1):
        where = f"{source}, entry #{position}"
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise ConfigError(f"{where}: the token must be a non-empty string without spaces")
        if not isinstance(entry, dict):
            raise ConfigError(f'{where}: must be an object {{"principal": ..., "scopes": [...]}}')
        name = entry.get("principal")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: 'principal' must be a non-empty string")
        scopes = entry.get("scopes")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise ConfigError(f"{source}: principal {name!r}: 'scopes' must be a list of strings")
        for scope in scopes:
            if scope not in SCOPES:
                raise ConfigError(
                    f"{source}: principal {name!r} has unknown scope {scope!r} "
                    f"(known: {', '.join(sorted(SCOPES))})"
                )
        tokens[token] = Principal(name=name.strip(), scopes=frozenset(scopes))
    return tokens


def load_tokens_file(path: Path) -> dict[str, Principal]:
    source = f"CREDITWATCH_API_TOKENS_FILE ({path})"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source} cannot be read: {exc.strerror or exc}") from None
    return parse_tokens(text, source=source)


def dev_tokens() -> dict[str, Principal]:
    """Two fresh random tokens with every scope: ``dev`` and ``dev-approver``.

    Two principals so that maker–checker (a requester may not approve its own limit request)
    can be tried in dev mode.
    """
    return {
        secrets.token_urlsafe(24): Principal("dev", SCOPES),
        secrets.token_urlsafe(24): Principal("dev-approver", SCOPES),
    }


def _registry_of(request: Request) -> TokenRegistry:
    registry = getattr(request.app.state, "tokens", None)
    if not isinstance(registry, TokenRegistry):
        raise RuntimeError("app.state.tokens is not a TokenRegistry (use shared.http.create_app)")
    return registry


def parse_bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthorized(
            "An 'Authorization: Bearer <token>' header is required.", field="authorization"
        )
    token = parse_bearer(header)
    if token is None:
        raise Unauthorized(
            "The Authorization header must be 'Bearer <token>'.",
            error="invalid_request",
            field="authorization",
        )
    return token


@cache
def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates the caller and checks ``scope``; returns the Principal.

    ``principal: Principal = Depends(require("credit:write"))``, or
    ``dependencies=[Depends(require("credit:read"))]`` when the name is not needed.
    Cached per scope, so FastAPI evaluates it once per request however often it is declared.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def authorised_principal(
        request: Request,
        _credentials: HTTPAuthorizationCredentials | None = Depends(_bearer_scheme),
    ) -> Principal:
        token = _bearer_token(request)
        principal = _registry_of(request).authenticate(token)
        if principal is None:
            raise Unauthorized(
                "The token is not valid.", error="invalid_token", field="authorization"
            )
        if not principal.allows(scope):
            raise Forbidden(
                f"This call needs the scope {scope!r}.",
                field="authorization",
                required_scope=scope,
                headers={
                    "WWW-Authenticate": (
                        f'Bearer realm="creditwatch", error="insufficient_scope", scope="{scope}"'
                    )
                },
            )
        return principal

    authorised_principal.__name__ = f"require_{scope.replace(':', '_')}"
    return authorised_principal
