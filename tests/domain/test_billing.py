"""Property tests of the billing arithmetic: the amount formula and segment bookkeeping."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from domain.billing import Ledger, amount_minor, limit_ms

PAYER, PROVIDER = "payer", "provider"


@given(st.integers(0, 10**10), st.integers(0, 10**7))
def test_amount_is_the_exact_ceiling(billable_ms, rate):
    exact = Fraction(billable_ms * rate, 60_000)
    assert amount_minor(billable_ms, rate) == math.ceil(exact)
    assert isinstance(amount_minor(billable_ms, rate), int)


def test_amount_examples():
    assert amount_minor(0, 100) == 0
    assert amount_minor(1, 100) == 1  # any started fraction of a minor unit is charged
    assert amount_minor(60_000, 100) == 100
    assert amount_minor(60_001, 100) == 101
    assert amount_minor(90_000, 3) == 5  # 4.5 → 5


@given(st.integers(1, 10**9), st.integers(1, 10**7))
def test_limit_ms_is_the_longest_time_within_budget(budget, rate):
    most = limit_ms(budget, rate)
    assert amount_minor(most, rate) <= budget
    assert amount_minor(most + 1, rate) > budget or rate == 0


# A session's presence history: (milliseconds later, who, joined?)
events = st.lists(
    st.tuples(st.integers(0, 600_000), st.sampled_from([PAYER, PROVIDER]), st.booleans()),
    max_size=40,
)


def both_present_ms(history, end_at):
    """The reference: brute force over the history, independent of Ledger."""
    present = {PAYER: False, PROVIDER: False}
    total, now, since = 0, 0, None
    for delta, who, joined in history:
        now += delta
        present[who] = joined
        both = present[PAYER] and present[PROVIDER]
        if both and since is None:
            since = now
        elif not both and since is not None:
            total += now - since
            since = None
    if since is not None:
        total += end_at - since
    return total


def replay(history, ledger, end_extra):
    present = {PAYER: False, PROVIDER: False}
    now = 0
    checkpoints = []
    for delta, who, joined in history:
        now += delta
        present[who] = joined
        if present[PAYER] and present[PROVIDER]:
            ledger.open(now)
        else:
            ledger.close(now)
        checkpoints.append((now, ledger.snapshot_segments(now)))
    end_at = now + end_extra
    ledger.close(end_at)
    return end_at, checkpoints


@settings(max_examples=300)
@given(events, st.integers(0, 600_000))
def test_billable_time_is_exactly_the_both_present_time(history, end_extra):
    ledger = Ledger(rate_per_minute=100)
    end_at, checkpoints = replay(history, ledger, end_extra)
    expected = both_present_ms(history, end_at)
    assert ledger.closed_ms == expected
    assert ledger.billable_ms(end_at) == expected
    assert expected <= end_at  # never more than the wall time of the session
    # segments are ordered, disjoint and non-empty
    for (s1, e1), (s2, e2) in zip(ledger.segments, ledger.segments[1:]):
        assert s1 < e1 <= s2 < e2
    # a checkpoint never holds more than was billable at that instant
    for at, segments in checkpoints:
        assert sum(e - s for s, e in segments) <= expected
        assert all(e <= at for _, e in segments)


@settings(max_examples=300)
@given(events, st.integers(0, 600_000), st.integers(1, 500), st.integers(1, 1000))
def test_a_budget_is_never_exceeded(history, end_extra, budget, rate):
    ledger = Ledger(rate_per_minute=rate, max_amount_minor=budget)
    end_at, _ = replay(history, ledger, end_extra)
    uncapped = both_present_ms(history, end_at)
    assert ledger.closed_ms == min(uncapped, limit_ms(budget, rate))
    assert amount_minor(ledger.closed_ms, rate) <= budget


def test_limit_and_warning_instants():
    ledger = Ledger(rate_per_minute=60, max_amount_minor=3)  # 1 per second: 3 s of budget
    ledger.open(10_000)
    assert ledger.limit_at() == 13_000
    assert ledger.warning_at() == 13_000 - 60_000  # due at once: less than a minute is left
    ledger.close(11_000)
    ledger.open(20_000)
    assert ledger.limit_at() == 22_000
    assert ledger.billable_ms(30_000) == 3_000
