"""GET /v1/customers/{stripe_customer_id}/usage and POST /v1/portal-tokens."""

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from usage_meter.api import read_api
from usage_meter.config import Settings
from usage_meter.observability import logger
from usage_meter.secrets import Secrets
from usage_meter.store.dynamodb import DynamoStore

settings = Settings.from_env()
secrets = Secrets(settings)
app = read_api(
    included={name: meter.included for name, meter in settings.meters.items()},
    store=DynamoStore(settings.table_name),
    token_secret=secrets.portal_token_signing_secret,  # fetched when a token is first issued
    portal_origins=settings.portal_origins,
)


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
def lambda_handler(event: dict, context: LambdaContext) -> dict:
    return app.resolve(event, context)
