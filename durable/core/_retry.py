"""Retry policy for activities and sub-orchestrations (the official SDK's ``RetryOptions``)."""

from __future__ import annotations

from datetime import timedelta


class RetryOptions:
    """Retry with exponential backoff: attempt n (n >= 1) waits
    ``first_retry_interval * backoff_coefficient**(n-1)``, capped at ``max_retry_interval``;
    retries stop after ``max_number_of_attempts`` attempts or once ``retry_timeout`` has passed
    since the first attempt was scheduled."""

    def __init__(
        self,
        first_retry_interval_in_milliseconds: int,
        max_number_of_attempts: int,
        backoff_coefficient: float = 1.0,
        max_retry_interval_in_milliseconds: int | None = None,
        retry_timeout_in_milliseconds: int | None = None,
    ) -> None:
        if first_retry_interval_in_milliseconds <= 0:
            raise ValueError("first_retry_interval_in_milliseconds must be greater than 0")
        if max_number_of_attempts < 1:
            raise ValueError("max_number_of_attempts must be at least 1")
        if backoff_coefficient < 1.0:
            raise ValueError("backoff_coefficient must be at least 1.0")
        self.first_retry_interval_in_milliseconds = first_retry_interval_in_milliseconds
        self.max_number_of_attempts = max_number_of_attempts
        self.backoff_coefficient = backoff_coefficient
        self.max_retry_interval_in_milliseconds = max_retry_interval_in_milliseconds
        self.retry_timeout_in_milliseconds = retry_timeout_in_milliseconds

    def delay_before_retry(self, attempt: int, elapsed: timedelta) -> timedelta | None:
        """How long to wait after failed attempt number ``attempt`` (1-based); None: give up."""
        if attempt >= self.max_number_of_attempts:
            return None
        delay_ms = self.first_retry_interval_in_milliseconds * self.backoff_coefficient ** (attempt - 1)
        if self.max_retry_interval_in_milliseconds is not None:
            delay_ms = min(delay_ms, self.max_retry_interval_in_milliseconds)
        delay = timedelta(milliseconds=delay_ms)
        if self.retry_timeout_in_milliseconds is not None and elapsed + delay > timedelta(
            milliseconds=self.retry_timeout_in_milliseconds
        ):
            return None
        return delay
