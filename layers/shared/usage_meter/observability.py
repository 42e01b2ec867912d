"""Logger and metrics, created once per container. The template sets the names; local runs and
tests get the same defaults so metrics never fail for want of a namespace."""

import os
import warnings

from aws_lambda_powertools import Logger, Metrics

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "usage-meter")

logger = Logger(service=SERVICE)
metrics = Metrics(
    service=SERVICE, namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "UsageMeter")
)

# An invocation that publishes nothing (a 401 or 409, a Stripe event this service ignores) would
# make Powertools warn so, with a file path, each time: it reads like a fault and is none.
warnings.filterwarnings("ignore", "No application metrics to publish", UserWarning)
