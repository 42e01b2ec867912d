"""Every condition in the DynamoDB store that guards against a concurrent run or a retry, with
the race it exists for forced on DynamoDB Local: no test here hopes a schedule hits it.

Each actor (a Lambda container, an operator, a webhook delivery) has its own store and client.
A `Pause` on one actor's client holds one of its calls right before it is sent, after the actor
read and decided; `interleave` lets another actor run to its end meanwhile, then lets the first
one go on. The guard must then refuse (or absorb) the late write, and every unit is counted and
billed once. Races already forced in test_store.py, test_billing_store.py and
test_rejections_store.py are not repeated here.
"""

import json
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.exceptions import ClientError

from devtools.invoke import http_event
from tests.fakes import FakeBilling
from usage_meter.api import read_api, record_api
from usage_meter.billing import PermanentBillingError, TransientBillingError
from usage_meter.errors import IdempotencyConflict
from usage_meter.logic.flush import Flusher
from usage_meter.logic.quarantine import REPLAY_GUARD, ReplayRefused, replay
from usage_meter.logic.record import record_events
from usage_meter.logic.rejections import Rejection, handle_error_report, take_back
from usage_meter.logic.subscriptions import sync
from usage_meter.models.auth import ApiKey, Scope
from usage_meter.models.domain import Counter, Decision, ItemPeriods, SubscriptionRead
from usage_meter.models.input import EventIn
from usage_meter.store.dynamodb import DynamoStore

NOW = 1_795_680_000  # 2026-11-26T08:00:00Z
CUSTOMER = "cus_Race1"
WAIT = 20  # seconds: a paused call or an actor that takes longer than this is a failed test

Request = dict[str, Any]


class Pause:
    """Holds the first call of `operation` on `client` whose request `matches`, right before it
    is sent, until `resume()`. Later calls (the actor's retries, its re-reads) go through."""

    def __init__(
        self, client: Any, operation: str, matches: Callable[[Request], bool] = lambda _: True
    ) -> None:
        self.reached = threading.Event()
        self._resumed = threading.Event()
        self._armed = True
        self._matches = matches
        self._lock = threading.Lock()
        client.meta.events.register(f"before-call.dynamodb.{operation}", self._hold)

    def _hold(self, params: dict[str, Any], **_: Any) -> None:
        with self._lock:
            if not self._armed or not self._matches(json.loads(params["body"])):
                return
            self._armed = False
        self.reached.set()
        if not self._resumed.wait(WAIT):
            raise TimeoutError("the paused call was never resumed")

    def resume(self) -> None:
        self._resumed.set()


def interleave[A, B](first: Callable[[], A], pause: Pause, second: Callable[[], B]) -> tuple[A, B]:
    """Run `first` until `pause` holds its call, run `second` to its end, then let `first`
    finish. Returns both results; raises what `first` raised."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(first)
        while not pause.reached.wait(0.01):
            if held.done():
                held.result()
                raise AssertionError("the first actor finished without reaching the pause")
        try:
            second_result = second()
        finally:
            pause.resume()
        return held.result(timeout=WAIT), second_result


def update_sets(fragment: str) -> Callable[[Request], bool]:
    """An UpdateItem request whose update expression contains `fragment`."""
    return lambda request: fragment in request["UpdateExpression"]


@dataclass
class Actor:
    store: DynamoStore
    client: Any


@pytest.fixture
def actor(local_table, dynamodb_local) -> Callable[..., Actor]:
    """A new actor on the test's table: its own client, so a pause holds only its calls."""

    def make(now: int = NOW) -> Actor:
        client = dynamodb_local.client()
        store = DynamoStore(
            local_table.name, client=client, clock=lambda: now, rng=random.Random(11)
        )
        return Actor(store, client)

    return make


@pytest.fixture
def store(actor) -> DynamoStore:
    """The table as the test itself sets it up and reads it."""
    return actor().store


@dataclass
class Stripe(FakeBilling):
    """Stripe as FakeBilling fakes it; `lose` more calls are taken, with their answer lost."""

    lose: int = 0

    def send(self, request):
        outcome = super().send(request)
        with self.lock:
            lost, self.lose = self.lose > 0, max(self.lose - 1, 0)
        if lost:
            raise TransientBillingError("the connection dropped before Stripe's answer")
        return outcome


REFUSED = PermanentBillingError("No such customer", code="resource_missing")


def record(store: DynamoStore, quantity: int, *, key: str | None = None) -> None:
    event = EventIn(stripe_customer_id=CUSTOMER, meter="m", quantity=quantity, idempotency_key=key)
    record_events([event], meters={"m"}, store=store, now=datetime.fromtimestamp(NOW, UTC))


def flush(store: DynamoStore, stripe: FakeBilling, when: int = NOW):
    return Flusher(store, stripe, time_left=lambda: 300, clock=lambda: when).run()


def counter(store: DynamoStore) -> Counter:
    [found] = store.customer_counters(CUSTOMER, "")
    return found


def state(store: DynamoStore) -> tuple[int, int, int, int | None]:
    """The counter's quantity, reported and quarantined units, and the decision in flight."""
    found = counter(store)
    return found.quantity, found.reported, found.quarantined, in_flight(found)


def in_flight(found: Counter) -> int | None:
    """The seq of the decision in flight, if any."""
    return found.sending.seq if found.sending else None


def in_backlog(store: DynamoStore) -> list[str]:
    return [c.id for page in store.backlog() for c in page]


def identifier(store: DynamoStore, seq: int) -> str:
    return counter(store).identifier(Decision(seq=seq, value=0, timestamp=0, decided_at=0))


def held_after_a_lost_answer(store: DynamoStore, stripe: Stripe) -> Counter:
    """The counter once its unsent units went out in a decision Stripe took (its answer lost),
    then refused when resent: the decision is held for a replay."""
    stripe.lose += 1
    flush(store, stripe)
    stripe.script.append(REFUSED)
    flush(store, stripe)
    held = counter(store)
    assert held.held is not None
    return held


def decision_in_flight(store: DynamoStore, *, delivered: bool) -> None:
    """A run sent the counter's units and died without Stripe's answer, which Stripe took
    (`delivered`) or not."""
    stripe = Stripe(lose=1) if delivered else FakeBilling(script=[TransientBillingError("503")])
    flush(store, stripe)
    assert counter(store).sending is not None


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def at_day(day: int, month: int = 11) -> int:
    return int(datetime(2026, month, day, 13, 37, 12, tzinfo=UTC).timestamp())


def subscription(sub_id: str, current: tuple[int, int], read_at: float) -> SubscriptionRead:
    return SubscriptionRead(
        id=sub_id,
        customer=CUSTOMER,
        status="active",
        read_at=read_at,
        start_date=at_day(13, month=10),
        items=(
            ItemPeriods(
                item=f"si_{sub_id}",
                meter="m",
                anchor=current[0],
                interval="month",
                periods=(current,),
            ),
        ),
    )


def record_at(store: DynamoStore, when: int, quantity: int) -> None:
    event = EventIn(stripe_customer_id=CUSTOMER, meter="m", quantity=quantity, timestamp=when)
    record_events([event], meters={"m"}, store=store, now=at(when + 5))


# -- recording ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/events", "/v1/events/batch"])
@pytest.mark.parametrize("same_body", [True, False], ids=["same body", "other body"])
def test_two_requests_with_one_idempotency_key_over_http_store_it_once(actor, route, same_body):
    # Given two record functions (two Lambda containers) on the table; request A has read what
    # it reads and is held right before its write
    first, second = actor(), actor()
    pause = Pause(first.client, "TransactWriteItems")
    event_a = {"stripe_customer_id": CUSTOMER, "meter": "m", "quantity": 3, "idempotency_key": "k"}
    event_b = event_a if same_body else {**event_a, "quantity": 4}

    def post(who: Actor, event: dict) -> tuple[int, Any]:
        app = record_api(meters={"m": {}}, store=who.store, now=lambda: at(NOW))
        body = {"events": [event]} if route.endswith("batch") else event
        response = app.resolve(http_event("POST", route, body))
        return response["statusCode"], json.loads(response["body"])

    # When request B reads, then stores the event while A waits; then A writes
    (status_a, answer_a), (status_b, answer_b) = interleave(
        lambda: post(first, event_a), pause, lambda: post(second, event_b)
    )
    # Then B stored it; A is a replay of it (same body) or a 409 (another body)
    stored = answer_b["results"][0] if route.endswith("batch") else answer_b
    assert status_b == 202 and stored["duplicate"] is False
    if not same_body:
        assert (status_a, answer_a["error"]["code"]) == (409, "idempotency_conflict")
    elif route.endswith("batch"):
        assert (status_a, answer_a["results"]) == (202, [{"id": stored["id"], "duplicate": True}])
    else:
        assert (status_a, answer_a) == (200, {"id": stored["id"], "duplicate": True})
    # and the counter counts B's units once, as a usage read shows
    reader = read_api(included={"m": 0}, store=actor().store, now=lambda: at(NOW))
    usage = json.loads(reader.resolve(http_event("GET", f"/v1/customers/{CUSTOMER}/usage"))["body"])
    assert [m["quantity"] for m in usage["meters"]] == [event_b["quantity"]]


def held_batch(actor) -> tuple[Pause, Callable[[], list]]:
    """A batch request of keys `old` (2 units) and `new` (5), held right before its write,
    having found neither key stored: its pause, and the request to run."""
    batch = actor()
    pause = Pause(batch.client, "TransactWriteItems")
    events = [
        EventIn(stripe_customer_id=CUSTOMER, meter="m", quantity=q, idempotency_key=k)
        for q, k in ((2, "old"), (5, "new"))
    ]
    return pause, lambda: record_events(
        events, meters={"m"}, store=batch.store, now=at(NOW), batch=True
    )


def test_a_batch_that_meets_a_replay_at_its_write_stores_the_rest_and_counts_the_replay_once(
    actor, store
):
    # Given a batch request held right before its write
    pause, send_batch = held_batch(actor)
    # When a single request stores the first key meanwhile
    results, _ = interleave(send_batch, pause, lambda: record(store, 2, key="old"))
    # Then the batch answers it as a replay, stores the other, and the counter counts 7
    assert [r.duplicate for r in results] == [True, False]
    assert state(store)[0] == 7


def test_a_batch_whose_key_another_request_stored_with_another_body_stores_nothing(actor, store):
    # Given a batch request held right before its write
    pause, send_batch = held_batch(actor)
    # When a single request stores the first key with another body meanwhile
    with pytest.raises(IdempotencyConflict):
        interleave(send_batch, pause, lambda: record(store, 3, key="old"))
    # Then the batch answered 409 and stored none of its events: only the other request's 3
    assert state(store)[0] == 3


def test_a_record_that_read_the_period_before_a_cut_leaves_the_cut_end_in_the_periods_index(
    actor, store
):
    # Given a customer on a subscription renewing on the 13th, with usage after the renewal
    renewal, following = at_day(13), at_day(13, month=12)
    sync(subscription("sub_1", (renewal, following), read_at=1), store, now=renewal)
    record_at(store, renewal + 60, 4)
    # and a record request that read that period and is held right before its write
    late = actor()
    pause = Pause(late.client, "TransactWriteItems")
    # When an anchor reset cuts the period on the 20th meanwhile
    reset = at_day(20)
    cut = subscription("sub_1", (reset, at_day(20, month=12)), read_at=2)

    interleave(
        lambda: record_at(late.store, reset - 10, 1), pause, lambda: sync(cut, store, now=reset)
    )
    # Then the counter keeps the cut end, and the periods index files it under that day
    [counted] = store.customer_counters(CUSTOMER, "")
    assert (counted.quantity, counted.period_end) == (5, reset)
    ending = [c.id for page in store.counters_ending_on("2026-11-20") for c in page]
    assert ending == [counted.id]
    assert list(store.counters_ending_on("2026-12-13")) == []


# -- the flush ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reported_before", [0, 3], ids=["first decision", "later decision"])
def test_two_runs_that_read_the_same_counter_decide_once_and_bill_once(
    actor, store, reported_before
):
    # Given 4 new units (after 3 reported, or none), and run 1 held right before it decides
    stripe = FakeBilling()
    if reported_before:
        record(store, reported_before)
        flush(store, stripe)
    record(store, 4)
    run1, run2 = actor(), actor()
    pause = Pause(run1.client, "UpdateItem", update_sets("sending_seq = :next"))
    # When run 2 decides, sends, confirms and releases the counter meanwhile
    first, second = interleave(
        lambda: flush(run1.store, stripe), pause, lambda: flush(run2.store, stripe)
    )
    # Then run 1's decision is refused: one Stripe call, the units reported once
    assert (first.sent, second.sent) == (0, 1) and len(stripe.calls) == 1 + bool(reported_before)
    total = reported_before + 4
    assert stripe.totals() == {(CUSTOMER, "m"): total}
    assert state(store) == (total, total, 0, None) and in_backlog(store) == []


def test_a_run_cannot_decide_over_a_held_decision_an_operator_put_back_in_flight(actor, store):
    # Given a decision Stripe took with its answer lost, then refused when resent: it is held
    record(store, 4)
    stripe = Stripe()
    held_after_a_lost_answer(store, stripe)
    # and 2 more units, which run 1 read and is about to decide on
    record(store, 2)
    run = actor()
    pause = Pause(run.client, "UpdateItem", update_sets("sending_seq = :next"))
    # When an operator replays the held decision meanwhile (back in flight, as it was)
    late = actor(NOW + REPLAY_GUARD).store
    interleave(
        lambda: flush(run.store, stripe),
        pause,
        lambda: replay(late, counter(store).id, now=NOW + REPLAY_GUARD),
    )
    # Then run 1's decision is refused, the held one is in flight, and once every run is done
    # Stripe has each unit once
    assert state(store) == (6, 0, 0, 1)
    for _ in range(2):
        flush(store, stripe)
    assert stripe.totals() == {(CUSTOMER, "m"): 6}
    assert state(store) == (6, 6, 0, None)


def test_a_resend_after_the_decision_was_taken_back_keeps_the_rejection_in_the_log(actor, store):
    # Given 9 units reported, then 4 whose call Stripe took with its answer lost
    record(store, 9)
    flush(store, FakeBilling())
    record(store, 4)
    stripe = Stripe(lose=1)
    flush(store, stripe)
    # and a run resending that decision, held right before it logs it
    run = actor()
    pause = Pause(run.client, "PutItem")
    # When Stripe's error report for it takes it out of flight meanwhile
    rejected = Rejection(identifier(store, 2), "meter_event_customer_not_found")
    interleave(lambda: flush(run.store, stripe), pause, lambda: take_back(rejected, store, NOW))
    # Then the resend logged nothing over the rejection, so a repeated report changes nothing
    sent = store.sent(rejected.identifier)
    assert sent is not None and sent.rejected_at == NOW
    assert take_back(rejected, store, NOW + 1) == "already"
    assert state(store) == (13, 9, 4, None)


def test_a_stale_confirm_after_another_run_confirmed_reports_the_units_once(actor, store):
    # Given run 1 whose call Stripe took, held right before it confirms
    record(store, 4)
    run1, run2, stripe = actor(), actor(), FakeBilling()
    pause = Pause(run1.client, "UpdateItem", update_sets("ADD reported"))
    # When run 2 resends the decision in flight (Stripe: already delivered) and confirms it
    first, second = interleave(
        lambda: flush(run1.store, stripe), pause, lambda: flush(run2.store, stripe)
    )
    # Then run 1's confirm is refused: 4 units reported, not 8
    assert (first.sent, second.sent) == (0, 1)
    assert state(store) == (4, 4, 0, None) and stripe.totals() == {(CUSTOMER, "m"): 4}


def test_a_stale_quarantine_after_another_run_confirmed_quarantines_nothing(actor, store):
    # Given run 1 whose call Stripe refused, held right before it quarantines the decision
    record(store, 4)
    run1, run2 = actor(), actor()
    stripe = FakeBilling(script=[REFUSED])
    pause = Pause(run1.client, "TransactWriteItems")
    # When run 2 resends the same decision, Stripe takes it, and run 2 confirms it
    first, second = interleave(
        lambda: flush(run1.store, stripe), pause, lambda: flush(run2.store, stripe)
    )
    # Then the quarantine is refused: the units are reported, and nothing waits for an operator
    assert (first.quarantined, second.sent) == (0, 1)
    assert state(store) == (4, 4, 0, None) and store.quarantined() == []


def test_a_second_refused_resend_is_not_held_over_the_decision_already_held(store):
    # Given a held decision (seq 1), and a later decision (seq 2) in flight on the same counter
    record(store, 4)
    read = counter(store)
    first = Decision(seq=1, value=4, timestamp=NOW, decided_at=NOW)
    assert store.decide(read, first) and store.quarantine(read, first, "refused", NOW, hold=True)
    record(store, 2)
    read = counter(store)
    second = Decision(seq=2, value=2, timestamp=NOW, decided_at=NOW)
    assert store.decide(read, second)
    # When the resend of seq 2 is refused too / Then it is not held: seq 1 stays the held one
    assert store.quarantine(read, second, "refused", NOW, hold=True) is False
    kept = counter(store)
    assert (kept.held, in_flight(kept), kept.quarantined) == (first, 2, 4)


def test_a_release_after_an_event_arrived_keeps_the_counter_in_the_backlog(actor, store):
    # Given a run that confirmed 4 units, held right before it releases the counter
    record(store, 4)
    run, stripe = actor(), FakeBilling()
    pause = Pause(run.client, "UpdateItem", update_sets("REMOVE backlog_pk"))
    # When a new event is recorded meanwhile
    summary, _ = interleave(lambda: flush(run.store, stripe), pause, lambda: record(store, 1))
    # Then the release is refused, and the next run bills the new unit
    assert (summary.sent, summary.released) == (1, 0)
    assert in_backlog(store) == [counter(store).id]
    flush(store, stripe)
    assert stripe.totals() == {(CUSTOMER, "m"): 5} and in_backlog(store) == []


def test_a_release_on_a_read_older_than_the_last_decision_is_refused(store):
    # Given a run's read of a counter all reported (seq 1)
    record(store, 4)
    flush(store, FakeBilling())
    read = counter(store)
    # When Stripe takes seq 1 back, an operator replays it and another run reports it as seq 2
    rejection = Rejection(identifier(store, 1), "archived_meter")
    assert take_back(rejection, store, NOW) == "quarantined"
    assert store.replay(counter(store))
    flush(store, FakeBilling())
    assert (counter(store).seq, state(store)) == (2, (4, 4, 0, None))
    # Then the read's release is refused: same quantity, nothing in flight, but another decision
    assert store.release(read) is False


def test_a_release_read_before_a_rejection_took_units_back_is_refused(store):
    # Given a run's read of a counter all reported
    record(store, 4)
    flush(store, FakeBilling())
    read = counter(store)
    # When Stripe's asynchronous rejection takes the units back, and an operator replays them
    assert take_back(Rejection(identifier(store, 1), "archived_meter"), store, NOW) == "quarantined"
    assert store.replay(counter(store))
    # Then the read's release is refused: the units are unsent again and stay in the backlog
    assert store.release(read) is False
    assert in_backlog(store) == [counter(store).id] and counter(store).unsent == 4


# -- asynchronous rejections and their webhook deliveries ----------------------------------------


def reported_twice(store: DynamoStore) -> str:
    """18 units reported in two decisions of 9; the first one's identifier."""
    for _ in range(2):
        record(store, 9)
        flush(store, FakeBilling())
    return identifier(store, 1)


def test_two_deliveries_of_one_error_report_take_the_units_back_once(actor, store):
    # Given two confirmed decisions, and a delivery of Stripe's error report for the first one
    # that passed the handled-events check and is held right before its write
    rejected = Rejection(reported_twice(store), "no_meter")
    delivery = actor()
    pause = Pause(delivery.client, "TransactWriteItems")
    # When the same report is delivered again and handled meanwhile
    first, second = interleave(
        lambda: handle_error_report("evt_1", [rejected], delivery.store, NOW),
        pause,
        lambda: handle_error_report("evt_1", [rejected], store, NOW),
    )
    # Then one delivery took the 9 units back; the other found it done
    assert (dict(first or {}), dict(second or {})) == ({"already": 1}, {"quarantined": 1})
    assert state(store) == (18, 9, 9, None)


def test_a_rejection_of_a_decision_confirmed_meanwhile_takes_back_the_confirmed_units(actor, store):
    # Given a decision in flight, and the handler of its rejection holding its read of that
    record(store, 4)
    decision_in_flight(store, delivered=False)
    handler = actor()
    pause = Pause(handler.client, "TransactWriteItems")
    rejected = Rejection(identifier(store, 1), "archived_meter")
    # When a run resends and confirms the decision meanwhile
    outcome, _ = interleave(
        lambda: take_back(rejected, handler.store, NOW), pause, lambda: flush(store, FakeBilling())
    )
    # Then the handler read again and took the units out of `reported`, once
    assert outcome == "quarantined" and state(store) == (4, 0, 4, None)


def test_a_rejection_of_a_decision_quarantined_meanwhile_takes_nothing_more(actor, store):
    # Given a decision in flight, and the handler of its rejection holding its read of that
    record(store, 4)
    decision_in_flight(store, delivered=True)
    handler = actor()
    pause = Pause(handler.client, "TransactWriteItems")
    rejected = Rejection(identifier(store, 1), "archived_meter")
    # When a run resends it, Stripe refuses it, and the run quarantines it meanwhile
    outcome, _ = interleave(
        lambda: take_back(rejected, handler.store, NOW),
        pause,
        lambda: flush(store, FakeBilling(script=[REFUSED])),
    )
    # Then nothing is left to take back: the 4 units are quarantined once, none reported
    assert outcome == "unresolved" and state(store) == (4, 0, 4, None)


def test_a_rejection_read_before_a_resend_went_back_in_flight_takes_it_out_of_flight(actor, store):
    # Given 9 units reported, then a decision of 5 Stripe took (answer lost), then refused when
    # resent: held in the quarantine
    record(store, 9)
    flush(store, FakeBilling())
    record(store, 5)
    held_after_a_lost_answer(store, Stripe())
    # and the handler of its rejection, which read it not in flight, held before its write
    handler = actor()
    pause = Pause(handler.client, "TransactWriteItems")
    rejected = Rejection(identifier(store, 2), "meter_event_customer_not_found")
    # When an operator puts the held decision back in flight meanwhile
    outcome, _ = interleave(
        lambda: take_back(rejected, handler.store, NOW),
        pause,
        lambda: store.replay(counter(store), resend=True),
    )
    # Then the handler read again and took it out of flight: the 9 reported units stay reported
    assert outcome == "quarantined" and state(store) == (14, 9, 5, None)


def test_a_rejection_whose_log_expired_meanwhile_changes_nothing(actor, store, local_table):
    # Given a confirmed decision, and the handler of its rejection held before its write
    record(store, 4)
    flush(store, FakeBilling())
    handler = actor()
    pause = Pause(handler.client, "TransactWriteItems")
    rejected = Rejection(identifier(store, 1), "archived_meter")
    key = {"pk": {"S": f"SENT#{rejected.identifier}"}, "sk": {"S": "SENT"}}

    # When the decision's log expires meanwhile (TTL)
    def expire() -> None:
        local_table.client.delete_item(TableName=local_table.name, Key=key)

    outcome, _ = interleave(lambda: take_back(rejected, handler.store, NOW), pause, expire)
    # Then the rejection is unknown, the units stay reported, and no log is made up
    assert outcome == "unknown" and state(store) == (4, 4, 0, None)
    assert store.sent(rejected.identifier) is None


# -- operators' replays -------------------------------------------------------------------------


def quarantined_by_a_run(store: DynamoStore, quantity: int = 4) -> Counter:
    record(store, quantity)
    flush(store, FakeBilling(script=[REFUSED]))
    return counter(store)


def test_a_replay_read_before_another_replay_and_a_new_refusal_is_refused(actor, store):
    # Given units Stripe refused, and an operator's replay held right before its write
    quarantined_by_a_run(store)
    later = NOW + REPLAY_GUARD
    operator1, operator2 = actor(later), actor(later)
    pause = Pause(operator1.client, "TransactWriteItems")

    # When another operator replays them, and the next run is refused again, meanwhile
    def replay_then_refused_again() -> None:
        replay(operator2.store, counter(store).id, now=later)
        flush(store, FakeBilling(script=[REFUSED]), when=later + 60)

    with pytest.raises(ReplayRefused):
        interleave(
            lambda: replay(operator1.store, counter(store).id, now=later),
            pause,
            replay_then_refused_again,
        )
    # Then the new refusal waits for its own replay guard, and nothing is unsent
    held = counter(store)
    assert (held.quarantined, held.quarantined_at, held.unsent) == (4, later + 60, 0)


def test_a_replay_of_a_read_with_fewer_quarantined_units_is_refused(store):
    # Given an operator's read of 4 quarantined units
    read = quarantined_by_a_run(store)
    # When, in the same second, a decision for 3 more units is refused too
    quarantined_by_a_run(store, 3)
    assert (counter(store).quarantined, counter(store).quarantined_at) == (7, read.quarantined_at)
    # Then the read's replay is refused: it would put back units it never saw
    assert store.replay(read) is False
    assert state(store) == (7, 0, 7, None)


def test_a_resend_replay_read_before_a_new_decision_went_in_flight_is_refused(actor, store):
    # Given a held decision, 2 new units, and an operator's resend held right before its write
    stripe = Stripe()
    record(store, 4)
    held_after_a_lost_answer(store, stripe)
    record(store, 2)
    later = NOW + REPLAY_GUARD
    operator = actor(later)
    pause = Pause(operator.client, "TransactWriteItems")
    # When a run decides the 2 units meanwhile, and Stripe takes them with the answer lost
    stripe.lose += 1
    with pytest.raises(ReplayRefused):
        interleave(
            lambda: replay(operator.store, counter(store).id, now=later),
            pause,
            lambda: flush(store, stripe, when=later),
        )
    # Then the new decision stays in flight, and the runs that follow bill each unit once
    assert in_flight(counter(store)) == 2
    flush(store, stripe, when=later)
    assert stripe.totals() == {(CUSTOMER, "m"): 6}


def test_a_resend_replay_of_a_read_whose_held_decision_was_replaced_is_refused(store):
    # Given an operator's read of held decision 1
    stripe = Stripe()
    record(store, 4)
    read = held_after_a_lost_answer(store, stripe)
    # When another operator replays its units afresh, and their new decision 2 is held in turn,
    # in the same second
    assert store.replay(read)
    replaced = held_after_a_lost_answer(store, stripe)
    assert replaced.held is not None and replaced.held.seq == 2
    assert (replaced.quarantined, replaced.quarantined_at) == (
        read.quarantined,
        read.quarantined_at,
    )
    # Then the first read's resend is refused: decision 2 stays the one held
    assert store.replay(read, resend=True) is False
    assert counter(store).held == replaced.held and counter(store).sending is None


# -- customers' billing periods -----------------------------------------------------------------


@pytest.mark.parametrize("known", [False, True], ids=["first sync", "later sync"])
def test_two_syncs_of_one_customer_at_once_keep_both_subscriptions(actor, store, known):
    # Given a customer never synced, or synced once; and a sync held right before its write
    period = (at_day(13), at_day(13, month=12))
    if known:
        sync(subscription("sub_0", period, read_at=1), store, now=NOW)
    syncing = actor()
    pause = Pause(syncing.client, "UpdateItem", update_sets("subscriptions = :subs"))
    # When a sync of another subscription of the customer is written meanwhile
    interleave(
        lambda: sync(subscription("sub_1", period, read_at=2), syncing.store, now=NOW),
        pause,
        lambda: sync(subscription("sub_2", period, read_at=2), store, now=NOW),
    )
    # Then the held sync read again and merged: every subscription is kept
    billing = store.customer_billing(CUSTOMER)
    assert sorted(billing.subscriptions) == ["sub_0"] * known + ["sub_1", "sub_2"]
    assert billing.version == 2 + known


def test_a_cut_on_a_stale_read_does_not_move_the_period_end_again(store):
    # Given a counter ending on Dec 13th, read by two syncs
    sync(subscription("sub_1", (at_day(13), at_day(13, month=12)), read_at=1), store, now=NOW)
    record_at(store, at_day(14), 4)
    read = counter(store)
    # When one cuts it on the 20th, then the other, on its old read, on the 25th
    assert store.cut(read, at_day(20)) is True
    assert store.cut(read, at_day(25)) is False
    # Then the first cut stands
    assert counter(store).period_end == at_day(20)


# -- server keys --------------------------------------------------------------------------------


def api_key(secret_hash: str) -> ApiKey:
    return ApiKey(
        key_id="k1",
        name="ci",
        scopes=frozenset({Scope("admin")}),
        secret_hash=secret_hash,
        created_at=NOW,
    )


def test_a_key_id_already_taken_is_refused_and_the_first_key_kept(store):
    store.put_api_key(api_key("first"))
    with pytest.raises(ClientError, match="ConditionalCheckFailed"):
        store.put_api_key(api_key("second"))
    assert store.get_api_key("k1") == api_key("first")


def test_two_operators_revoking_one_key_at_once_revoke_it_once(actor, store):
    # Given a key, and an operator's revoke held right before its write
    store.put_api_key(api_key("h"))
    operator = actor()
    pause = Pause(operator.client, "UpdateItem")
    # When another operator revokes it meanwhile, a second later
    first, second = interleave(
        lambda: operator.store.revoke_api_key("k1", NOW),
        pause,
        lambda: store.revoke_api_key("k1", NOW + 1),
    )
    # Then only one revoke is written, and its time stands
    assert (first, second) == (False, True)
    assert store.get_api_key("k1").revoked_at == NOW + 1  # type: ignore[union-attr]


def test_revoking_an_unknown_key_writes_nothing(store):
    assert store.revoke_api_key("nope", NOW) is False
    assert store.get_api_key("nope") is None
