"""Orchestration versioning, with the semantics of Durable Functions' ``host.json`` settings
``defaultVersion``, ``versionMatchStrategy`` and ``versionFailureStrategy``.

An instance gets a version when it is created (``start_new(version=)``, a sub-orchestration's
``version=``, or else the creating app's default version) and keeps it for its whole life,
continue-as-new and restarts included. A worker whose app declares a default version only runs
the instances whose version matches it; the others it leaves for a compatible worker (Reject) or
fails (Fail). Without a default version every instance runs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class VersionMatchStrategy(str, enum.Enum):
    NONE = "None"  # run every instance, whatever its version
    STRICT = "Strict"  # only instances of exactly the default version
    CURRENT_OR_OLDER = "CurrentOrOlder"  # instances of the default version or an older one


class VersionFailureStrategy(str, enum.Enum):
    REJECT = "Reject"  # leave the instance as it is, for a compatible worker to run later
    FAIL = "Fail"  # fail the instance


class VersionMismatchError(Exception):
    """An instance's version does not match the worker's, and the failure strategy is Fail."""


def compare_versions(left: str | None, right: str | None) -> int:
    """-1, 0 or 1 as ``left`` is older than, the same as, or newer than ``right``.

    The documented rules: empty and missing versions are equal and older than any other; two
    versions that parse as .NET ``System.Version`` (2 to 4 dot-separated numbers) compare
    numerically; anything else compares as case-insensitive text."""
    if not left or not right:
        return (bool(left) > bool(right)) - (bool(left) < bool(right))
    left_parts, right_parts = _dotnet_version(left), _dotnet_version(right)
    if left_parts is not None and right_parts is not None:
        return (left_parts > right_parts) - (left_parts < right_parts)
    left_key, right_key = left.casefold(), right.casefold()
    return (left_key > right_key) - (left_key < right_key)


def _dotnet_version(text: str) -> tuple[int, ...] | None:
    parts = text.strip().split(".")
    if not 2 <= len(parts) <= 4 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    # A missing component is lower than any present one ("1.0" < "1.0.0"), as tuples compare.
    return tuple(int(p) for p in parts)


def _strategy(enum_type: type[enum.Enum], value: Any, setting: str) -> Any:
    if isinstance(value, enum_type):
        return value
    for member in enum_type:
        if isinstance(value, str) and value.strip().casefold() == str(member.value).casefold():
            return member
    allowed = ", ".join(str(m.value) for m in enum_type)
    raise ValueError(f"extensions.durableTask.{setting} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class VersioningOptions:
    """The app's orchestration versioning settings (``extensions.durableTask`` in ``host.json``)."""

    default_version: str | None = None
    match_strategy: VersionMatchStrategy = VersionMatchStrategy.CURRENT_OR_OLDER
    failure_strategy: VersionFailureStrategy = VersionFailureStrategy.REJECT

    @classmethod
    def from_settings(
        cls, default_version: Any = None, match_strategy: Any = None, failure_strategy: Any = None
    ) -> VersioningOptions:
        """Build from ``host.json`` values (strategy names are case-insensitive); ``ValueError``
        names the setting that is wrong."""
        if default_version is not None and not isinstance(default_version, (str, int, float)):
            raise ValueError(f"extensions.durableTask.defaultVersion must be a string, got {default_version!r}")
        return cls(
            default_version=str(default_version) if default_version not in (None, "") else None,
            match_strategy=_strategy(VersionMatchStrategy, match_strategy or "CurrentOrOlder", "versionMatchStrategy"),
            failure_strategy=_strategy(VersionFailureStrategy, failure_strategy or "Reject", "versionFailureStrategy"),
        )

    def matches(self, version: str | None) -> bool:
        """Whether this app runs an instance of ``version``."""
        if self.default_version is None or self.match_strategy is VersionMatchStrategy.NONE:
            return True
        order = compare_versions(version, self.default_version)
        return order == 0 if self.match_strategy is VersionMatchStrategy.STRICT else order <= 0

    def rejects(self, version: str | None) -> bool:
        """The instance is not run here and stays as it is (to be retried later)."""
        return self.failure_strategy is VersionFailureStrategy.REJECT and not self.matches(version)

    def fails(self, version: str | None) -> bool:
        """The instance is failed with a ``VersionMismatchError``."""
        return self.failure_strategy is VersionFailureStrategy.FAIL and not self.matches(version)

    def mismatch(self, version: str | None) -> VersionMismatchError:
        return VersionMismatchError(
            f"the orchestration's version {version!r} does not match this app's default version "
            f"{self.default_version!r} (versionMatchStrategy {self.match_strategy.value})"
        )
