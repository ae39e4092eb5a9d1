"""The credit policy: loading, validation that names the field at fault, and its pure helpers."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from datetime import date, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.policy import (
    Policy,
    PolicyError,
    ScoreFactor,
    add_months,
    load_policy,
    parse_policy,
)

DEFAULT = load_policy()
DEFAULT_TEXT = resources.files("shared").joinpath("default_policy.yaml").read_text("utf-8")

Mutation = Callable[[dict[str, Any]], None]


def default_content() -> dict[str, Any]:
    """The default policy as plain data, ready to be broken by a test."""
    return copy.deepcopy(DEFAULT.model_dump())


def problems_of(mutate: Mutation) -> list[str]:
    content = default_content()
    mutate(content)
    with pytest.raises(PolicyError) as caught:
        Policy.from_mapping(content)
    return [str(problem) for problem in caught.value.problems]


def problems_of_text(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    return [str(problem) for problem in caught.value.problems]


def factor_index(content: dict[str, Any], key: str) -> int:
    return next(i for i, factor in enumerate(content["scorecard"]) if factor["factor"] == key)


# --- the default policy ----------------------------------------------------------------------


def test_default_policy_loads_and_validates() -> None:
    policy = load_policy(None)

    assert policy.version == "2026.1"
    assert policy.base_currency == "EUR"
    assert [grade.name for grade in policy.grades] == [
        "AAA", "AA", "A", "BBB", "BB", "B", "CCC", "D",
    ]  # fmt: skip
    assert sum(factor.max_points for factor in policy.scorecard) == 100
    assert policy.limits.by_grade[policy.worst_grade.name] == 0
    assert re.fullmatch(r"[0-9a-f]{64}", policy.digest)


def test_default_policy_ships_inside_the_shared_package() -> None:
    resource = resources.files("shared").joinpath("default_policy.yaml")

    assert resource.is_file()
    assert load_policy(Path(str(resource))).digest == DEFAULT.digest


def test_default_policy_covers_every_grade_and_the_contracts_alert_thresholds() -> None:
    alerts = DEFAULT.alerts

    assert set(DEFAULT.review.cadence_months) == {grade.name for grade in DEFAULT.grades}
    assert alerts.utilization_high.raise_at == Decimal("0.90")
    assert alerts.utilization_high.clear_below == Decimal("0.85")
    assert (alerts.overdue.warning_days, alerts.overdue.critical_days) == (30, 90)
    assert (alerts.financial_deterioration.z2_distress, alerts.financial_deterioration.z2_safe) == (
        Decimal("1.1"),
        Decimal("2.6"),
    )
    assert alerts.limit_breach.severity == "critical"
    assert alerts.review_overdue.severity == "info"


def test_default_scorecard_altman_bands_align_with_the_z2_zones() -> None:
    z2 = next(factor for factor in DEFAULT.scorecard if factor.input == "altman_z2")

    assert z2.score(Decimal("2.6")).points == z2.max_points
    assert z2.score(Decimal("2.59")).points < z2.max_points
    assert z2.score(Decimal("1.1")).points > 0
    assert z2.score(Decimal("1.09")).points == 0


def test_an_unknown_customer_with_no_data_gets_a_small_but_nonzero_limit() -> None:
    # Given nothing but a stable industry, every factor is scored as missing
    score = sum(
        (
            factor.score(Decimal(0) if factor.input == "industry_outlook" else None).points
            for factor in DEFAULT.scorecard
        ),
        Decimal(0),
    )

    grade = DEFAULT.grade_for_score(score)

    assert grade.name == "B"
    assert 0 < DEFAULT.limit_for_grade(grade) < DEFAULT.limit_for_grade("BBB")


# --- validation names the field at fault ----------------------------------------------------


def test_missing_grade_limit_is_reported_at_its_path() -> None:
    problems = problems_of(lambda content: content["limits"]["by_grade"].pop("BB"))

    assert problems == ["limits.by_grade.BB: missing: every grade needs a value"]


def test_negative_grade_limit_is_reported_at_its_path() -> None:
    problems = problems_of(lambda content: content["limits"]["by_grade"].update(B="-1"))

    assert problems == ["limits.by_grade.B: must be >= 0"]


def test_worst_grade_must_have_no_credit() -> None:
    problems = problems_of(lambda content: content["limits"]["by_grade"].update(D="10.00"))

    assert problems == ["limits.by_grade.D: the worst grade's limit must be 0"]


def test_limit_with_more_decimals_than_the_base_currency_is_rejected() -> None:
    problems = problems_of(lambda content: content["limits"]["by_grade"].update(A="100.005"))

    assert problems == ["limits.by_grade.A: 100.005 has more decimals than EUR allows (2)"]


def test_scorecard_points_not_summing_to_100_are_rejected() -> None:
    def give_liquidity_one_more_point(content: dict[str, Any]) -> None:
        factor = content["scorecard"][factor_index(content, "liquidity")]
        factor["max_points"] = Decimal(9)
        factor["bands"][0]["points"] = Decimal(9)

    problems = problems_of(give_liquidity_one_more_point)

    assert problems == ["scorecard: max_points must sum to exactly 100, they sum to 101"]


def test_bands_out_of_order_for_their_direction_are_rejected() -> None:
    def raise_second_threshold(content: dict[str, Any]) -> None:
        factor = content["scorecard"][factor_index(content, "liquidity")]
        factor["bands"][1]["threshold"] = Decimal("2.5")  # above the first band's 2.0

    problems = problems_of(raise_second_threshold)

    assert len(problems) == 1
    assert problems[0].startswith("scorecard[liquidity].bands[1].threshold: must be below")


def test_bands_where_a_worse_value_earns_more_points_are_rejected() -> None:
    def reward_worse_debt_ratio(content: dict[str, Any]) -> None:
        factor = content["scorecard"][factor_index(content, "leverage")]
        factor["bands"][2]["points"] = Decimal(6)  # the band before awards 5

    problems = problems_of(reward_worse_debt_ratio)

    assert len(problems) == 1
    assert problems[0].startswith("scorecard[leverage].bands[2].points: must be <= ")


def test_reason_template_with_an_unknown_placeholder_is_rejected() -> None:
    def misspell(content: dict[str, Any]) -> None:
        content["scorecard"][0]["reason"] = "{labl} {value}: {points} of {max_points}"

    problems = problems_of(misspell)

    assert len(problems) == 1
    assert problems[0].startswith("scorecard[liquidity].reason: unknown placeholder {labl}")


def test_clear_below_at_or_above_raise_at_is_rejected() -> None:
    problems = problems_of(
        lambda content: content["alerts"]["utilization_high"].update(clear_below="0.90")
    )

    assert problems == ["alerts.utilization_high.clear_below: must be below raise_at (0.9)"]


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("USD/XYZ", "fx.rates.USD/XYZ: XYZ is not an ISO 4217 currency code"),
        ("USDEUR", "fx.rates.USDEUR: must be a pair of ISO 4217 codes like USD/EUR"),
        ("EUR/EUR", "fx.rates.EUR/EUR: a currency has no rate against itself"),
        ("EUR/USD", "fx.rates.EUR/USD: the pair USD/EUR is already given"),
    ],
)
def test_bad_fx_pair_is_reported_at_its_key(pair: str, expected: str) -> None:
    problems = problems_of(lambda content: content["fx"]["rates"].update({pair: "1.5"}))

    assert problems == [expected]


def test_fx_rate_must_be_positive() -> None:
    problems = problems_of(lambda content: content["fx"]["rates"].update({"AUD/EUR": "0"}))

    assert problems == ["fx.rates.AUD/EUR: must be > 0"]


def test_unknown_key_typo_is_rejected_with_a_suggestion() -> None:
    text = DEFAULT_TEXT.replace("reservation_ttl_hours: 72", "reservation_ttl_hour: 72")

    problems = problems_of_text(text)

    assert "limits.reservation_ttl_hour: unknown key; did you mean 'reservation_ttl_hours'?" in (
        problems
    )
    assert "limits.reservation_ttl_hours: missing (required)" in problems


def test_unknown_scorecard_input_suggests_the_closest_one() -> None:
    text = DEFAULT_TEXT.replace("input: current_ratio", "input: current_raito")

    problems = problems_of_text(text)

    assert len(problems) == 1
    assert problems[0].startswith(
        "scorecard[liquidity].input: 'current_raito': did you mean 'current_ratio'?"
    )


def test_grades_out_of_order_are_reported_by_grade_name() -> None:
    problems = problems_of(lambda content: content["grades"][3].update(min_score=Decimal(80)))

    assert problems == ["grades[BBB].min_score: must be below A's 65: grades are listed best first"]


def test_worst_grade_must_start_at_zero() -> None:
    problems = problems_of(lambda content: content["grades"][-1].update(min_score=Decimal(5)))

    assert problems == [
        "grades[D].min_score: the worst grade must start at 0 so that every score gets a grade"
    ]


def test_a_python_float_is_refused_as_inexact() -> None:
    problems = problems_of(lambda content: content["limits"].update(review_tolerance=0.05))

    assert problems == [
        'limits.review_tolerance: must be an exact decimal (write it as a string, e.g. "0.92")'
    ]


def test_unquoted_yaml_numbers_are_read_exactly() -> None:
    text = DEFAULT_TEXT.replace('review_tolerance: "0.05"', "review_tolerance: 0.05")

    policy = parse_policy(text)

    assert policy.limits.review_tolerance == Decimal("0.05")
    assert str(policy.limits.review_tolerance) == "0.05"


def test_an_unquoted_version_is_rejected_because_it_would_be_a_number() -> None:
    problems = problems_of_text(DEFAULT_TEXT.replace('version: "2026.1"', "version: 2026.1"))

    assert problems == ["version: must be a string (quote it in YAML)"]


def test_a_repeated_yaml_key_is_rejected_rather_than_silently_overwritten() -> None:
    text = DEFAULT_TEXT.replace('    BB: "50000.00"\n', '    BB: "50000.00"\n    BB: "90000.00"\n')

    problems = problems_of_text(text)

    assert len(problems) == 1
    assert "duplicate key 'BB'" in problems[0]


def test_every_failing_field_is_listed_in_one_error() -> None:
    def break_three_things(content: dict[str, Any]) -> None:
        content["limits"]["by_grade"]["B"] = "-1"
        content["alerts"]["overdue"]["warning_days"] = -1
        content["base_currency"] = "EURO"

    with pytest.raises(PolicyError) as caught:
        content = default_content()
        break_three_things(content)
        Policy.from_mapping(content, source="candidate.yaml")

    message = str(caught.value)
    assert "candidate.yaml" in message
    for path in ("limits.by_grade.B", "alerts.overdue.warning_days", "base_currency"):
        assert f"{path}: " in message
    assert isinstance(caught.value, ValueError)


def test_an_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


# --- grades ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "grade"),
    [
        ("100", "AAA"),
        ("85", "AAA"),
        ("84.99", "AA"),
        ("75", "AA"),
        ("55", "BBB"),
        ("54.999", "BB"),
        ("20", "CCC"),
        ("19.99", "D"),
        ("0", "D"),
    ],
)
def test_a_score_exactly_on_min_score_gets_that_grade(score: str, grade: str) -> None:
    assert DEFAULT.grade_for_score(Decimal(score)).name == grade


@pytest.mark.parametrize("score", ["-0.01", "100.01"])
def test_a_score_outside_0_to_100_is_refused(score: str) -> None:
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        DEFAULT.grade_for_score(Decimal(score))


def test_notches_are_positive_for_a_downgrade_and_negative_for_an_upgrade() -> None:
    assert DEFAULT.notches_between("AA", "BBB") == 2
    assert DEFAULT.notches_between("BBB", "AA") == -2
    assert DEFAULT.notches_between("BB", "BB") == 0
    assert DEFAULT.notches_between(DEFAULT.best_grade, DEFAULT.worst_grade) == 7
    assert DEFAULT.grade_index("AAA") == 0
    assert DEFAULT.worst_grade.name == "D"


def test_an_unknown_grade_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown grade 'Z'"):
        DEFAULT.notches_between("A", "Z")


@pytest.mark.parametrize(
    ("old", "new", "severity"),
    [
        ("A", "BBB", "warning"),
        ("A", "BB", "critical"),
        ("CCC", "D", "critical"),
        ("BBB", "A", None),
        ("A", "A", None),
    ],
)
def test_downgrade_severity_follows_the_policy(old: str, new: str, severity: str | None) -> None:
    assert DEFAULT.downgrade_severity(old, new) == severity


# --- review dates ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grade", "from_date", "expected"),
    [
        ("BBB", date(2026, 8, 31), date(2027, 2, 28)),  # 6 months, clamped to February
        ("BBB", date(2027, 8, 31), date(2028, 2, 29)),  # leap year
        ("AAA", date(2028, 2, 29), date(2029, 2, 28)),  # 12 months from a leap day
        ("B", date(2026, 11, 30), date(2027, 2, 28)),  # 3 months across a year end
        ("B", date(2026, 1, 15), date(2026, 4, 15)),
        ("D", date(2026, 10, 31), date(2027, 1, 31)),
    ],
)
def test_next_review_date_adds_calendar_months_clamped_to_month_end(
    grade: str, from_date: date, expected: date
) -> None:
    assert DEFAULT.next_review_date(grade, from_date) == expected


@given(st.dates(min_value=date(1900, 1, 1), max_value=date(2200, 1, 1)), st.integers(0, 240))
def test_add_months_never_overflows_the_target_month(start: date, months: int) -> None:
    result = add_months(start, months)

    months_apart = (result.year * 12 + result.month) - (start.year * 12 + start.month)
    assert months_apart == months
    is_month_end = add_months(result.replace(day=1), 1) - result == timedelta(days=1)
    assert result.day == start.day or (result.day < start.day and is_month_end)


# --- scorecard -------------------------------------------------------------------------------


def test_score_factor_explains_the_band_it_used() -> None:
    points, reason = DEFAULT.score_factor("liquidity", Decimal("1.42"))

    assert points == 4
    assert reason == "current ratio 1.42 ≥ 1.2: 4 of 8 points"


def test_score_factor_for_lower_is_better_uses_the_lowest_threshold_at_or_above() -> None:
    points, reason = DEFAULT.score_factor("payment_delay", Decimal("15"))

    assert points == 5
    assert reason == "average days beyond terms 15 days ≤ 15 days: 5 of 10 points"


def test_a_value_beyond_the_last_band_scores_zero() -> None:
    points, reason = DEFAULT.score_factor("liquidity", Decimal("0.7"))

    assert points == 0
    assert reason == "current ratio 0.7 < 1: 0 of 8 points"


def test_a_missing_input_scores_the_policys_missing_points() -> None:
    points, reason = DEFAULT.score_factor("liquidity", None)

    assert points == 3
    assert reason == ("no current ratio (no financial statement yet): scored 3 of 8 as policy says")


def test_rounding_never_makes_a_value_look_like_a_band_it_did_not_reach() -> None:
    _, reason = DEFAULT.score_factor("liquidity", Decimal("1.199"))

    assert reason == "current ratio 1.199 ≥ 1: 2 of 8 points"


def test_industry_outlook_is_looked_up_by_longest_listed_prefix() -> None:
    assert DEFAULT.outlook_for("J") == "positive"
    assert DEFAULT.outlook_for("f41.2") == "negative"
    assert DEFAULT.outlook_for("ZZ") == DEFAULT.industries.default_outlook
    assert DEFAULT.outlook_for(None) == DEFAULT.industries.default_outlook

    points, reason = DEFAULT.score_factor("industry", DEFAULT.industry_outlook_value("J"))
    assert (points, reason) == (Decimal(5), "industry outlook positive: 5 of 5 points")


def test_legal_events_are_counted_with_their_policy_weights() -> None:
    weighted = DEFAULT.credit_reports.weighted_legal_events(["lawsuit", "bankruptcy"])

    assert weighted == 6
    assert DEFAULT.score_factor("legal_record", weighted).points == 0


finite_inputs = st.decimals(
    min_value=Decimal("-1000"), max_value=Decimal("1000"), places=4, allow_nan=False
)


@settings(max_examples=300)
@given(st.sampled_from(DEFAULT.scorecard), finite_inputs, finite_inputs)
def test_improving_an_input_never_lowers_its_points(
    factor: ScoreFactor, first: Decimal, second: Decimal
) -> None:
    worse, better = sorted((first, second))
    if factor.direction == "lower_is_better":
        worse, better = better, worse

    assert factor.score(worse).points <= factor.score(better).points


@given(st.sampled_from(DEFAULT.scorecard), st.one_of(st.none(), finite_inputs))
def test_points_always_stay_within_zero_and_max_points(
    factor: ScoreFactor, value: Decimal | None
) -> None:
    points, reason = factor.score(value)

    assert 0 <= points <= factor.max_points
    assert reason


@st.composite
def arbitrary_factors(draw: st.DrawFn) -> dict[str, Any]:
    band_count = draw(st.integers(1, 5))
    thresholds = draw(st.lists(finite_inputs, min_size=band_count, max_size=band_count))
    points = draw(
        st.lists(st.integers(0, 20).map(Decimal), min_size=band_count, max_size=band_count)
    )
    return {
        "factor": "anything",
        "input": "current_ratio",
        "max_points": draw(st.integers(1, 20).map(Decimal)),
        "direction": draw(st.sampled_from(["higher_is_better", "lower_is_better"])),
        "bands": [{"threshold": t, "points": p} for t, p in zip(thresholds, points, strict=True)],
        "missing_points": Decimal(0),
        "missing_reason": "absent",
    }


@settings(max_examples=300)
@given(arbitrary_factors(), finite_inputs, finite_inputs)
def test_any_factor_the_policy_accepts_is_monotone(
    content: dict[str, Any], first: Decimal, second: Decimal
) -> None:
    try:
        factor = ScoreFactor.model_validate(content)
    except ValueError:
        return  # rejected: exactly the policies this property is not about

    worse, better = sorted((first, second))
    if factor.direction == "lower_is_better":
        worse, better = better, worse
    assert factor.score(worse).points <= factor.score(better).points
    assert 0 <= factor.score(worse).points <= factor.max_points


# --- limits, alerts, fx ----------------------------------------------------------------------


def test_limits_come_from_the_grade_and_unrated_customers_get_the_unrated_limit() -> None:
    assert DEFAULT.limit_for_grade("BBB") == Decimal("100000.00")
    assert DEFAULT.limit_for_grade(None) == DEFAULT.limits.unrated_limit == 0
    assert DEFAULT.is_eligible("CCC")
    assert not DEFAULT.is_eligible("D")


def test_overdue_tolerance_needs_both_days_and_amount_beyond_it() -> None:
    limits = DEFAULT.limits

    assert not limits.overdue_beyond_tolerance(30, Decimal("100000"))
    assert not limits.overdue_beyond_tolerance(31, Decimal("500.00"))
    assert limits.overdue_beyond_tolerance(31, Decimal("500.01"))
    assert limits.review_allowance(Decimal("100000.00")) == Decimal("5000")


def test_alert_thresholds_read_as_the_contract_says() -> None:
    alerts = DEFAULT.alerts

    assert [alerts.overdue.severity_for(days) for days in (30, 31, 90, 91)] == [
        None, "warning", "warning", "critical",
    ]  # fmt: skip
    assert alerts.utilization_high.holds(Decimal("0.90"), alert_open=False)
    assert not alerts.utilization_high.holds(Decimal("0.89"), alert_open=False)
    assert alerts.utilization_high.holds(Decimal("0.85"), alert_open=True)
    assert not alerts.utilization_high.holds(Decimal("0.849"), alert_open=True)
    assert alerts.negative_credit_report.severity_for("insolvency") == "critical"
    assert alerts.negative_credit_report.severity_for("lien") == "warning"
    assert alerts.financial_deterioration.z2_zone(Decimal("1.09")) == "distress"
    assert alerts.financial_deterioration.z2_zone(Decimal("2.6")) == "grey"
    assert alerts.financial_deterioration.z2_zone(Decimal("2.61")) == "safe"


def test_fx_rates_are_exact_decimals_and_convert_through_the_base_currency() -> None:
    rates = DEFAULT.fx_rates()

    assert rates["USD/EUR"] == Decimal("0.92")
    assert all(isinstance(rate, Decimal) for rate in rates.values())
    assert DEFAULT.convert(Decimal("100.00"), "USD", "EUR") == Decimal("92.00")
    assert DEFAULT.convert(Decimal("92.00"), "EUR", "USD") == Decimal("100.00")
    assert DEFAULT.convert(Decimal("92.00"), "GBP", "USD") == Decimal("117.00")  # via EUR
    assert DEFAULT.convert(Decimal("1.00"), "AUD", "EUR") is None


# --- identity --------------------------------------------------------------------------------


def test_digest_ignores_formatting_but_not_content() -> None:
    reformatted = DEFAULT_TEXT.replace('raise_at: "0.90"', "raise_at: 0.9").replace(
        "# Early-warning rules", "# Early warning rules, reworded"
    )
    edited = DEFAULT_TEXT.replace('raise_at: "0.90"', 'raise_at: "0.95"')

    assert parse_policy(reformatted).digest == DEFAULT.digest
    edited_policy = parse_policy(edited)
    assert edited_policy.version == DEFAULT.version
    assert edited_policy.digest != DEFAULT.digest


def test_the_policy_is_immutable() -> None:
    with pytest.raises(ValueError, match="frozen"):
        DEFAULT.version = "2099.1"  # type: ignore[misc]


def test_a_factor_scores_a_value_once_and_equal_numbers_alike() -> None:
    """The scorecard's answers are memoized per factor: the same number (whatever its
    exponent) gets the very answer computed the first time, and the same answer a fresh
    computation gives; values that are not finite are refused every time, never kept."""
    policy = load_policy()
    for factor in policy.scorecard:
        for value in (Decimal("1.5"), Decimal("0.123456"), Decimal("-3"), Decimal("250"), None):
            first = factor.score(value)
            again = factor.score(value if value is None else value * Decimal("1.00"))
            assert again is first
            assert first == factor._score(value)
        for bad in (Decimal("NaN"), Decimal("sNaN"), Decimal("Infinity")):
            with pytest.raises(ValueError, match="cannot score"):
                factor.score(bad)
        assert all(v is None or v.is_finite() for v in factor._memo)
