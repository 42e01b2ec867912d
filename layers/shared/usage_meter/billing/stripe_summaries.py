"""Stripe's meter event summaries, for reconciliation (the operators' command imports it)."""

from typing import Any

from usage_meter.billing.stripe_client import stripe_client


class StripeSummaries:
    def __init__(self, api_key: str, *, api_base: str | None = None) -> None:
        self._client = stripe_client(api_key, api_base=api_base)
        self._meters: dict[str, str] | None = None

    def meter_id(self, event_name: str) -> str | None:
        """The active meter Stripe bills `event_name` with."""
        if self._meters is None:
            meters = self._client.v1.billing.meters.list(params={"status": "active", "limit": 100})
            self._meters = {m.event_name: m.id for m in meters.auto_paging_iter()}
        return self._meters.get(event_name)

    def total(self, meter_id: str, customer: str, start: int, end: int) -> int:
        """What Stripe aggregated for the customer in [start, end), minute-aligned bounds."""
        summaries: Any = self._client.v1.billing.meters.event_summaries.list(
            meter_id, params={"customer": customer, "start_time": start, "end_time": end}
        )
        return sum(int(s.aggregated_value) for s in summaries.auto_paging_iter())
