"""usage-meter: record usage, report it to Stripe Billing Meters exactly once, serve it back."""
