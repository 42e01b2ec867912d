"""The one way the adapters build a Stripe client (it imports `stripe`)."""

import stripe


def stripe_client(
    api_key: str,
    *,
    api_base: str | None = None,
    timeout_seconds: float = 20.0,
    max_network_retries: int = 2,
) -> stripe.StripeClient:
    """A client with a timeout well under a Lambda's, and the SDK's own retries (connection
    errors, 409s, 5xx). `api_base` points every Stripe host at one server (the local stand-in)."""
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": api_base, "meter_events": api_base} if api_base else {},
        max_network_retries=max_network_retries,
        http_client=stripe.RequestsClient(timeout=timeout_seconds),
    )
