"""On-demand list prices the benchmark's $ figures use (us-east-1, looked up November 2026).

- DynamoDB on-demand, Standard table class: $0.625 per million write request units, $0.125 per
  million read request units (after the November 2024 on-demand price cut; AWS's DynamoDB
  pricing page, "Pricing for On-Demand Capacity").
- Lambda, arm64 (the template's default Architecture): $0.20 per million requests and
  $0.0000133334 per GB-second, first pricing tier (https://aws.amazon.com/lambda/pricing/).
  The functions have 512 MB (template.yaml Globals).
- API Gateway HTTP API: $1.00 per million requests, first 300 million a month
  (https://aws.amazon.com/api-gateway/pricing/).
Free tiers, data transfer, storage, PITR, CloudWatch and the authorizer (its answers are cached
per key for ReauthorizeEvery) are left out: they do not depend on the flush design.
"""

REGION = "us-east-1"
DYNAMODB_PER_WRU = 0.625 / 1e6
DYNAMODB_PER_RRU = 0.125 / 1e6
LAMBDA_PER_REQUEST = 0.20 / 1e6
LAMBDA_PER_GB_SECOND = 0.0000133334
LAMBDA_MEMORY_GB = 0.5
HTTP_API_PER_REQUEST = 1.00 / 1e6

NOTE = (
    "Prices: DynamoDB on-demand $0.625 per million write and $0.125 per million read request "
    "units; Lambda arm64 $0.20 per million requests and $0.0000133334 per GB-s; HTTP API "
    "$1.00 per million requests (us-east-1 list prices, see benchmarks/prices.py). The flush's "
    "fixed 288 scheduled invocations a day, free tiers, storage and data transfer are left out."
)
