"""Environment settings, read and validated once per container (DESIGN §3)."""

import gc
import json
import os
from collections.abc import Callable, Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, field_validator

MeterName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")]


class MeterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    included: Annotated[int, Field(ge=0, strict=True)] = 0


class ConfigError(RuntimeError):
    """The environment does not describe a working deployment."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    table_name: Annotated[str, Field(min_length=3)]
    meters: Annotated[dict[MeterName, MeterSettings], Field(min_length=1)]
    retention_days: Annotated[int, Field(ge=40)] = 400
    stripe_api_key: SecretStr | None = None
    stripe_api_key_secret: str | None = None
    stripe_api_base: str | None = None
    stripe_timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 20.0
    portal_token_secret: SecretStr | None = None
    portal_token_secret_name: str | None = None
    portal_origins: tuple[str, ...] = ()
    stripe_webhook_secret: SecretStr | None = None  # locally; several may be comma-separated
    stripe_webhook_secret_name: str | None = None  # deployed: the Secrets Manager secret
    # Usage for a period whose invoice Stripe finalized: refused (422) or billed in the current
    # period. The grace period must match the one set in Stripe (1 h by default, up to 72 h).
    late_usage_policy: Literal["reject", "current_period"] = "reject"
    invoice_grace_hours: Annotated[float, Field(ge=0, le=72)] = 1.0
    # How long a warm container trusts a secret it fetched from Secrets Manager (rotation).
    secrets_max_age_seconds: Annotated[float, Field(gt=0, le=3600)] = 300.0

    @field_validator("portal_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(origin.strip() for origin in value.split(",") if origin.strip())
        return value

    # Stripe allows 25 meter-event calls/s in test mode and 1,000/s live; stay under both.
    stripe_max_requests_per_second: Annotated[float, Field(gt=0)] | None = None

    @field_validator("meters", mode="before")
    @classmethod
    def _parse_meters(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"METERS is not valid JSON: {error.msg}") from error
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        raw = {
            "table_name": env.get("TABLE_NAME"),
            "meters": env.get("METERS"),
            "retention_days": env.get("RETENTION_DAYS") or 400,
            "stripe_api_key": env.get("STRIPE_API_KEY") or None,
            "stripe_api_key_secret": env.get("STRIPE_API_KEY_SECRET") or None,
            "stripe_api_base": env.get("STRIPE_API_BASE") or None,
            "stripe_timeout_seconds": env.get("STRIPE_TIMEOUT_SECONDS") or 20.0,
            "stripe_max_requests_per_second": env.get("STRIPE_MAX_REQUESTS_PER_SECOND") or None,
            "portal_token_secret": env.get("PORTAL_TOKEN_SECRET") or None,
            "portal_token_secret_name": env.get("PORTAL_TOKEN_SECRET_NAME") or None,
            "portal_origins": env.get("PORTAL_ORIGINS") or None,
            "secrets_max_age_seconds": env.get("SECRETS_MAX_AGE_SECONDS") or None,
            "stripe_webhook_secret": env.get("STRIPE_WEBHOOK_SECRET") or None,
            "stripe_webhook_secret_name": env.get("STRIPE_WEBHOOK_SECRET_NAME") or None,
            "late_usage_policy": env.get("LATE_USAGE_POLICY") or None,
            "invoice_grace_hours": env.get("INVOICE_GRACE_HOURS") or None,
        }
        try:
            return cls.model_validate({k: v for k, v in raw.items() if v is not None})
        except ValueError as error:
            raise ConfigError(f"invalid configuration: {error}") from error

    @property
    def invoice_grace_seconds(self) -> int:
        return int(self.invoice_grace_hours * 3600)

    def included(self, meter: str) -> int:
        return self.meters[meter].included


# -- the end of a function's init ---------------------------------------------------------------


def init_done() -> None:
    """Called last by a handler module, which called gc.disable() before its first import.

    Init makes some 100,000 objects (modules, classes, functions) that live as long as the
    container. Left on, the collector would pass over all of them again and again while they are
    made: about 20 ms of every cold start (issue 13). Frozen, no later collection looks at them
    either, so the first requests don't pay for them. Init's few garbage cycles are kept, once."""
    gc.freeze()
    gc.enable()


# -- Lambda SnapStart (template parameter SnapStart) ---------------------------------------------


def snap_start(environ: Mapping[str, str] | None = None) -> bool:
    """Whether Lambda is initializing this environment to snapshot it (SnapStart): what init
    does is then paid once per published version, not at each cold start."""
    env = os.environ if environ is None else environ
    return env.get("AWS_LAMBDA_INITIALIZATION_TYPE") == "snap-start"


def on_snap_start(
    *,
    before_snapshot: Callable[[], object] | None = None,
    after_restore: Callable[[], object] | None = None,
) -> bool:
    """Register SnapStart's runtime hooks, when this environment is to be snapshotted; otherwise
    do nothing, and import nothing. snapshot_restore_py comes with Lambda's Python runtimes (and
    with awslambdaric). Whether they were registered."""
    if not snap_start():
        return False
    import snapshot_restore_py

    if before_snapshot is not None:
        snapshot_restore_py.register_before_snapshot(before_snapshot)
    if after_restore is not None:
        snapshot_restore_py.register_after_restore(after_restore)
    return True
