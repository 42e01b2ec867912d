"""Logger and metrics, created once per container."""

from aws_lambda_powertools import Logger, Metrics

logger = Logger()
metrics = Metrics()
