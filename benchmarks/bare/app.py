"""The yardstick of `benchmarks.coldstart`: a bare Python 3.13 handler whose init only creates a
boto3 DynamoDB client, and whose request is one GetItem. Not deployed; the benchmark runs it in
the same Runtime Interface Emulator as the built functions."""

import os

import boto3

client = boto3.client("dynamodb")


def lambda_handler(event: dict, context: object) -> dict:
    key = {"pk": {"S": "BENCH#bare"}, "sk": {"S": "BENCH"}}
    answer = client.get_item(TableName=os.environ["TABLE_NAME"], Key=key)
    return {"found": "Item" in answer}
