"""The DynamoDB adapter's own client (botocore, from the environment) under moto: fast checks of
the item layout that DynamoDB Local tests cover in depth."""

from datetime import UTC, datetime

from usage_meter.logic.record import record_events
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import DynamoStore

NOW = datetime(2026, 11, 26, 8, tzinfo=UTC)


def test_the_adapter_builds_its_client_from_the_environment(moto_table):
    # Given a store that creates its own client, as in Lambda
    store = DynamoStore(moto_table.name)
    # When an event is recorded
    request = EventIn(stripe_customer_id="cus_A", meter="m", quantity=2, idempotency_key="k")
    [result] = record_events([request], meters={"m"}, store=store, now=NOW)
    # Then the event item, keyed by the idempotency key, and its counter, in the backlog, are
    # in the table
    item = moto_table.client.get_item(
        TableName=moto_table.name, Key={"pk": {"S": f"EVENT#{result.id}"}, "sk": {"S": "EVENT"}}
    )["Item"]
    assert item["quantity"] == {"N": "2"} and "backlog_pk" not in item
    counter = moto_table.client.get_item(
        TableName=moto_table.name,
        Key={"pk": {"S": "USAGE#cus_A"}, "sk": {"S": "PERIOD#2026-11-01T00:00:00Z#METER#m#0"}},
    )["Item"]
    assert counter["quantity"] == {"N": "2"} and counter["backlog_pk"]["S"].startswith("U#")
    assert [
        (t.meter, t.quantity) for t in store.period_totals("cus_A", "2026-11-01T00:00:00Z")
    ] == [("m", 2)]
