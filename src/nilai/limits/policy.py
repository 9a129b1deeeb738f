"""Which limits apply to a request, and what happens when the limit store is down."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from nilai.auth.base import TOKEN_CLOCK_SKEW_S, Principal, TokenLimit
from nilai.errors import LimitsUnavailable, RateLimited
from nilai.limits.base import (
    ALLOWED,
    ConcurrencyLimiter,
    Decision,
    Limit,
    LimitStoreUnavailable,
    RateLimiter,
)
from nilai.outages import OutageLog

logger = logging.getLogger(__name__)

_WINDOWS = (("minute", 60), ("hour", 3600), ("day", 86400))


@dataclass(frozen=True, slots=True)
class LimitDefaults:
    """Configured defaults; an account's own values override the request limits."""

    minute: int | None = 100
    hour: int | None = 1000
    day: int | None = 10000
    lifetime: int | None = None
    model_concurrency: int = 50
    model_concurrency_overrides: tuple[tuple[str, int], ...] = ()
    web_search_rps: int | None = 20
    web_search_minute: int | None = 10
    web_search_hour: int | None = 100
    web_search_day: int | None = 1000
    web_search_lifetime: int | None = None
    token_uses_max_s: int = 86_400
    """The longest a token's use count is kept (``NILAI_NUC_MAX_LIFETIME_S``): the NUC
    verifier refuses a limited token usable for longer, so no count is dropped while its token
    is still accepted, and no count is kept forever."""
    attestation_minute: int | None = 60


class Admission:
    """Applies the limits: per account, per token, web search, and per-model concurrency."""

    def __init__(
        self,
        rate: RateLimiter,
        concurrency: ConcurrencyLimiter,
        defaults: LimitDefaults,
        *,
        fail_open: bool,
    ) -> None:
        self._rate = rate
        self._concurrency = concurrency
        self._defaults = defaults
        self._overrides = dict(defaults.model_concurrency_overrides)
        self._fail_open = fail_open
        consequence = (
            "requests are admitted without checking their limits until it answers"
            if fail_open
            else "requests are refused with 503 until it answers"
        )
        self._outage = OutageLog(logger, "rate limiter", consequence, where=rate.location)

    def account_limits(self, principal: Principal, *, web_search: bool) -> list[Limit]:
        """The limits one request of ``principal`` counts against."""
        tag = f"{{acct:{principal.account_id}}}"
        account = principal.account
        d = self._defaults
        counts = {
            "minute": account.rate_limit_minute
            if account and account.rate_limit_minute
            else d.minute,
            "hour": account.rate_limit_hour if account and account.rate_limit_hour else d.hour,
            "day": account.rate_limit_day if account and account.rate_limit_day else d.day,
        }
        limits = [
            Limit(
                f"{tag}:{window}",
                f"requests per {window} for this account",
                count,
                seconds,
                kind=window,
            )
            for window, seconds in _WINDOWS
            if (count := counts[window])
        ]
        lifetime = account.rate_limit_lifetime if account and account.rate_limit_lifetime else None
        if lifetime := lifetime or d.lifetime:
            limits.append(
                Limit(
                    f"{tag}:lifetime",
                    "requests in total for this account",
                    lifetime,
                    None,
                    kind="lifetime",
                )
            )
        limits += [
            Limit(
                # Keyed by the token alone: replicas agree on it even before they agree on
                # the account (e.g. when each created the account it had not seen yet).
                f"{{token:{token.token_id}}}:uses",
                "uses of this token",
                token.uses,
                None,
                expires_at=self._token_count_expiry(token),
                kind="token",
            )
            for token in principal.token_limits
        ]
        if web_search:
            searches = {
                "minute": d.web_search_minute,
                "hour": d.web_search_hour,
                "day": d.web_search_day,
            }
            limits += [
                Limit(
                    f"{tag}:search:{window}",
                    f"web searches per {window}",
                    count,
                    seconds,
                    kind=f"web_search_{window}",
                )
                for window, seconds in _WINDOWS
                if (count := searches[window])
            ]
            if d.web_search_lifetime:
                limits.append(
                    Limit(
                        f"{tag}:search:lifetime",
                        "web searches in total for this account",
                        d.web_search_lifetime,
                        None,
                        kind="web_search_lifetime",
                    )
                )
        return limits

    def _token_count_expiry(self, token: TokenLimit) -> float:
        """When (Unix time) a token's use count may be dropped.

        With the token (plus a clock skew margin), and never later than the longest a count is
        kept.
        """
        latest = time.time() + self._defaults.token_uses_max_s
        ends = token.expires_at.timestamp() if token.expires_at else latest
        return min(ends, latest) + TOKEN_CLOCK_SKEW_S

    async def admit(self, principal: Principal, *, web_search: bool = False) -> Decision:
        """Count the request against its limits; raise ``RateLimited`` if one is full."""
        limits = self.account_limits(principal, web_search=web_search)
        return await self._check(limits, uuid.uuid4().hex)

    async def admit_search(self) -> Decision:
        """Count one search at the provider against the searches per second of all accounts.

        Called for each search a web search makes (up to one per planned topic), after the
        request was admitted: the provider's quota is in searches, shared by every replica
        (the count is in the limit store), and a request its account's limits refuse never
        gets here, so it uses none of that budget.

        Raises:
            RateLimited: This second's searches are used up (``Retry-After: 1``).
        """
        rps = self._defaults.web_search_rps
        if not rps:
            return ALLOWED
        name = "web searches per second (all accounts)"
        limit = Limit("{search}:second", name, rps, 1, kind="web_search_all_accounts")
        return await self._check([limit], uuid.uuid4().hex)

    def admit_to_model(
        self, principal: Principal, model: str, *, web_search: bool = False
    ) -> contextlib.AbstractAsyncContextManager[Decision]:
        """``admit`` and ``model_slot`` in one step (one store round trip), both or neither.

        The decision is ``admit``'s, for the rate-limit headers; the slot is held until the
        block ends.
        """
        counting = self.account_limits(principal, web_search=web_search)
        return self.model_slot(model, counting=counting)

    async def admit_attestation(self, principal: Principal) -> Decision:
        """Count one attestation report against the account's own budget for reports.

        Reports are budgeted apart from chat requests: each asks the attester or the hardware
        for a fresh quote, while verifying a gateway should not use up an account's chats.
        """
        count = self._defaults.attestation_minute
        if not count:
            return ALLOWED
        tag = f"{{acct:{principal.account_id}}}"
        name = "attestation reports per minute for this account"
        limit = Limit(f"{tag}:attestation:minute", name, count, 60, kind="attestation_minute")
        return await self._check([limit], uuid.uuid4().hex)

    async def _check(self, limits: list[Limit], member: str) -> Decision:
        if not limits:
            # Nothing to count, so the store is not asked: this says nothing about an outage.
            return await self._rate.hit(limits, member)
        started = time.monotonic()
        try:
            decision = await self._rate.hit(limits, member)
        except LimitStoreUnavailable as exc:
            return self._unavailable(exc, started=started)
        self._outage.answered(started=started)
        if not decision.allowed:
            raise RateLimited(decision)
        return decision

    def _unavailable(self, exc: LimitStoreUnavailable, *, started: float) -> Decision:
        """Fail open or closed; the first failure of an outage is logged with its cause."""
        # The log names the store client's own error (a refused connection, a timeout), which
        # is what an operator acts on; the backend-neutral wrapper says nothing more.
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        self._outage.failed(cause, started=started)
        if self._fail_open:
            return ALLOWED
        raise LimitsUnavailable(
            "Rate limiting is unavailable right now (its Redis cannot be reached), so requests "
            "are refused; try again shortly.",
            headers={"Retry-After": "1"},
        ) from exc

    async def aclose(self) -> None:
        """Release the concurrency slots this process holds."""
        await self._concurrency.aclose()

    @contextlib.asynccontextmanager
    async def model_slot(
        self, model: str, *, counting: list[Limit] | None = None
    ) -> AsyncGenerator[Decision]:
        """Hold one of the model's concurrency slots while the block runs.

        With ``counting``, the request is counted against those limits in the same step.
        """
        limit = self._overrides.get(model, self._defaults.model_concurrency)
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as held:
            try:
                lease = self._concurrency.lease(
                    f"{{model:{model}}}:inflight",
                    limit,
                    counting=counting or (),
                    member=uuid.uuid4().hex if counting else "",
                )
                decision = await held.enter_async_context(lease)
            except RateLimited:
                self._outage.answered(started=started)
                raise
            except LimitStoreUnavailable as exc:
                # No slot is held: the block runs (fail open) or is refused (fail closed).
                decision = self._unavailable(exc, started=started)
            else:
                self._outage.answered(started=started)
            # Outside the try: a failure in the block is the block's, not the slot store's.
            yield decision
