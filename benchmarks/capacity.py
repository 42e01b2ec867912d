"""DynamoDB request units priced by AWS's rules, for calls the code really makes.

`meter(client, index)` wraps one botocore client: every call it makes is priced as on-demand
DynamoDB would bill it, from the items before and after the write (read on the side, unmetered):

- item size: attribute names + values (strings UTF-8, numbers 1 byte per 2 significant digits
  + 1, lists/maps 3 bytes + 1 per element), per AWS's "DynamoDB item sizes and formats";
- a write costs ceil(size / 1 KB) units, size being the larger of the item before and after
  (PutItem, UpdateItem) or the deleted item; twice that inside TransactWriteItems;
- a global secondary index entry (index keys + table keys + projected attributes + 100 bytes)
  costs one more write when the write adds, changes or removes it: a changed index key is a
  delete and a put, a removed key one delete, an entry whose content is unchanged nothing.
  Index writes are asynchronous propagation, not part of the transaction: not doubled;
- a write whose condition fails still costs its units (the stored item's size);
- reads: ceil(size / 4 KB) per item for GetItem/BatchGetItem (a missing item still costs the
  minimum), the page's total size in 4 KB steps for Query/Scan; half for eventually consistent
  reads (every GSI query).

The wrapper replaces the client's `_make_api_call` on that instance only, so paginators and
every method go through it. Sizes come from the table, so it prices what the code stores, not
what it meant to store. Not thread-safe by design: meter single-threaded scenarios only.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

Item = dict[str, Any]
KB = 1024
READ_STEP = 4 * KB
INDEX_ENTRY_OVERHEAD = 100
_WRITES = {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}


def _number_size(text: str) -> int:
    digits = str(Decimal(text).normalize()).lstrip("-").replace(".", "")
    digits = digits.split("E")[0].strip("0") or "0"
    return math.ceil(len(digits) / 2) + 1


def value_size(value: dict[str, Any]) -> int:
    ((kind, data),) = value.items()
    if kind == "S":
        return len(data.encode())
    if kind == "N":
        return _number_size(data)
    if kind == "B":
        return len(data)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(s.encode()) for s in data)
    if kind == "NS":
        return sum(_number_size(n) for n in data)
    if kind == "BS":
        return sum(len(b) for b in data)
    if kind == "L":
        return 3 + sum(value_size(v) + 1 for v in data)
    if kind == "M":
        return 3 + sum(len(k.encode()) + value_size(v) + 1 for k, v in data.items())
    raise ValueError(f"unknown attribute type {kind}")


def item_size(item: Item | None) -> int:
    if not item:
        return 0
    return sum(len(name.encode()) + value_size(value) for name, value in item.items())


def write_units(size: int) -> int:
    return max(1, math.ceil(size / KB))


@dataclass(frozen=True)
class IndexSpec:
    """A GSI as the template defines it: its key attributes and what it projects."""

    name: str
    keys: tuple[str, ...]
    table_keys: tuple[str, ...]
    projection: str  # KEYS_ONLY | INCLUDE | ALL
    non_key: tuple[str, ...] = ()

    @classmethod
    def from_table(cls, create_kwargs: dict[str, Any]) -> list[IndexSpec]:
        table_keys = tuple(k["AttributeName"] for k in create_kwargs["KeySchema"])
        return [
            cls(
                name=index["IndexName"],
                keys=tuple(k["AttributeName"] for k in index["KeySchema"]),
                table_keys=table_keys,
                projection=index["Projection"]["ProjectionType"],
                non_key=tuple(index["Projection"].get("NonKeyAttributes", ())),
            )
            for index in create_kwargs.get("GlobalSecondaryIndexes", [])
        ]

    def entry(self, item: Item | None) -> Item | None:
        if not item or any(k not in item for k in self.keys):
            return None
        if self.projection == "ALL":
            return dict(item)
        names = set(self.keys) | set(self.table_keys) | set(self.non_key)
        return {k: v for k, v in item.items() if k in names}

    def writes(self, old: Item | None, new: Item | None) -> int:
        before, after = self.entry(old), self.entry(new)
        if before == after:
            return 0

        def units(entry: Item) -> int:
            return write_units(item_size(entry) + INDEX_ENTRY_OVERHEAD)

        if before is None:
            return units(after or {})
        if after is None:
            return units(before)
        if any(before[k] != after[k] for k in self.keys):
            return units(before) + units(after)
        return units(after)


@dataclass
class Bill:
    """Request units by kind, and how many calls made them."""

    table_writes: float = 0.0
    index_writes: float = 0.0
    reads: float = 0.0
    failed_writes: float = 0.0  # units of writes whose condition failed (included in totals)
    calls: Tally[str] = field(default_factory=Tally)

    @property
    def writes(self) -> float:
        return self.table_writes + self.index_writes

    def snapshot(self) -> Bill:
        return Bill(
            self.table_writes, self.index_writes, self.reads, self.failed_writes, Tally(self.calls)
        )

    def __sub__(self, other: Bill) -> Bill:
        return Bill(
            self.table_writes - other.table_writes,
            self.index_writes - other.index_writes,
            self.reads - other.reads,
            self.failed_writes - other.failed_writes,
            self.calls - other.calls,
        )


class Meter:
    def __init__(self, client: Any, indexes: Iterable[IndexSpec], table_keys: tuple[str, ...]):
        self.bill = Bill()
        self._indexes = list(indexes)
        self._table_keys = table_keys
        self._call: Callable[[str, dict[str, Any]], Any] = client._make_api_call
        client._make_api_call = self._make_api_call

    # -- the wrapper -------------------------------------------------------------------------

    def _make_api_call(self, operation: str, params: dict[str, Any]) -> Any:
        self.bill.calls[operation] += 1
        if operation not in _WRITES:
            response = self._call(operation, params)
            self._price_read(operation, params, response)
            return response
        writes = self._write_targets(operation, params)
        before = self._images(writes)
        try:
            response = self._call(operation, params)
        except ClientError as error:
            code = error.response["Error"]["Code"]
            if code in ("ConditionalCheckFailedException", "TransactionCanceledException"):
                factor = 2 if operation == "TransactWriteItems" else 1
                units = sum(factor * write_units(item_size(before.get(k))) for k, _ in writes)
                self.bill.table_writes += units
                self.bill.failed_writes += units
            raise
        after = self._images(writes)
        factor = 2 if operation == "TransactWriteItems" else 1
        for key, _ in writes:
            old, new = before.get(key), after.get(key)
            self.bill.table_writes += factor * write_units(max(item_size(old), item_size(new)))
            self.bill.index_writes += sum(index.writes(old, new) for index in self._indexes)
        return response

    # -- writes ------------------------------------------------------------------------------

    def _key(self, item: Item) -> tuple[tuple[str, str], ...]:
        return tuple((k, str(item[k])) for k in self._table_keys)

    def _write_targets(self, operation: str, params: dict[str, Any]) -> list[tuple[Any, Item]]:
        """(hashable key, key item) of every item the call writes; ConditionCheck writes none."""
        keys: list[Item] = []
        if operation == "PutItem":
            keys.append({k: params["Item"][k] for k in self._table_keys})
        elif operation in ("UpdateItem", "DeleteItem"):
            keys.append(params["Key"])
        elif operation == "TransactWriteItems":
            for entry in params["TransactItems"]:
                if "Put" in entry:
                    keys.append({k: entry["Put"]["Item"][k] for k in self._table_keys})
                elif "Update" in entry:
                    keys.append(entry["Update"]["Key"])
                elif "Delete" in entry:
                    keys.append(entry["Delete"]["Key"])
        elif operation == "BatchWriteItem":
            for requests in params["RequestItems"].values():
                for request in requests:
                    if "PutRequest" in request:
                        item = request["PutRequest"]["Item"]
                        keys.append({k: item[k] for k in self._table_keys})
                    else:
                        keys.append(request["DeleteRequest"]["Key"])
        self._table = _table_of(operation, params)
        return [(self._key(k), k) for k in keys]

    def _images(self, writes: list[tuple[Any, Item]]) -> dict[Any, Item]:
        images: dict[Any, Item] = {}
        keys = [k for _, k in writes]
        for start in range(0, len(keys), 100):
            pending: dict[str, Any] = {
                self._table: {"Keys": keys[start : start + 100], "ConsistentRead": True}
            }
            while pending:
                response = self._call("BatchGetItem", {"RequestItems": pending})
                for item in response["Responses"].get(self._table, []):
                    images[self._key(item)] = item
                pending = response.get("UnprocessedKeys") or {}
        return images

    # -- reads -------------------------------------------------------------------------------

    def _price_read(self, operation: str, params: dict[str, Any], response: Any) -> None:
        if operation == "GetItem":
            factor = 1.0 if params.get("ConsistentRead") else 0.5
            self.bill.reads += factor * _read_units(item_size(response.get("Item")))
        elif operation == "BatchGetItem":
            for table, request in params["RequestItems"].items():
                factor = 1.0 if request.get("ConsistentRead") else 0.5
                found = response["Responses"].get(table, [])
                unprocessed = len(
                    (response.get("UnprocessedKeys") or {}).get(table, {}).get("Keys", [])
                )
                missing = len(request["Keys"]) - len(found) - unprocessed
                self.bill.reads += factor * (
                    sum(_read_units(item_size(i)) for i in found) + missing
                )
        elif operation in ("Query", "Scan"):
            consistent = params.get("ConsistentRead") and "IndexName" not in params
            factor = 1.0 if consistent else 0.5
            size = sum(item_size(i) for i in response.get("Items", []))
            self.bill.reads += factor * _read_units(size)


def _read_units(size: int) -> int:
    return max(1, math.ceil(size / READ_STEP))


def _table_of(operation: str, params: dict[str, Any]) -> str:
    if operation == "TransactWriteItems":
        (entry,) = params["TransactItems"][0].values()
        return str(entry["TableName"])
    if operation == "BatchWriteItem":
        return str(next(iter(params["RequestItems"])))
    return str(params["TableName"])
