"""The HTTP contract's properties (tests/unit/test_properties.py) over the DynamoDB store on
DynamoDB Local: the same properties, each on a tenth of its examples, every example on an empty
table. A difference from the in-memory fake store is a bug in one of the two."""

import json
import random
from collections.abc import Iterator
from itertools import batched
from typing import Any

import pytest

from tests.unit import test_properties as contract
from usage_meter.store.dynamodb import DynamoStore

# Every property of the HTTP contract, as its DynamoDB twin, under the same name.
for _name, _test in vars(contract).items():
    if _name.startswith("test_") and hasattr(_test, "on_dynamodb"):
        globals()[_name] = _test.on_dynamodb


class TableStore:
    """The DynamoDB store on a DynamoDB Local table, read back item by item."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self.store = DynamoStore(table.name, client=table.client, rng=random.Random(1))

    def items(self) -> Iterator[dict[str, Any]]:
        for page in self._table.client.get_paginator("scan").paginate(TableName=self._table.name):
            yield from page["Items"]

    def snapshot(self) -> object:
        return sorted(json.dumps(item, sort_keys=True) for item in self.items())

    def event_times(self) -> list[int]:
        return [
            int(item["event_time"]["N"])
            for item in self.items()
            if item["pk"]["S"].startswith("EVENT#")
        ]

    def units_recorded(self) -> int:
        return sum(
            int(item["quantity"]["N"])
            for item in self.items()
            if item["sk"]["S"].startswith("PERIOD#")
        )

    def put_counter(
        self, customer: str, period: str, meter: str, quantity: int, reported: int
    ) -> None:
        self._table.client.put_item(
            TableName=self._table.name,
            Item={
                "pk": {"S": f"USAGE#{customer}"},
                "sk": {"S": f"PERIOD#{period}#METER#{meter}#0"},
                "customer": {"S": customer},
                "meter": {"S": meter},
                "period_start": {"S": period},
                "period_end": {"N": "0"},
                "counter_shard": {"N": "0"},
                "quantity": {"N": str(quantity)},
                "reported": {"N": str(reported)},
            },
        )

    def empty(self) -> "TableStore":
        keys = [{"pk": item["pk"], "sk": item["sk"]} for item in self.items()]
        for chunk in batched(keys, 25, strict=False):
            pending = {self._table.name: [{"DeleteRequest": {"Key": key}} for key in chunk]}
            while pending:
                answer = self._table.client.batch_write_item(RequestItems=pending)
                pending = answer.get("UnprocessedItems") or {}
        return self


@pytest.fixture
def fresh(local_table) -> contract.Fresh:
    """One table per property; each example starts with it emptied."""
    table = TableStore(local_table)
    return table.empty
