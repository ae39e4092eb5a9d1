"""Financial ratios of the assessment service, checked against statements computed by hand."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from services.assessment import domain
from services.assessment.domain import Statement, altman_z2, altman_zone, ratios
from shared.events import DeadLetter, FinancialStatementPublished
from shared.policy import load_policy

POLICY = load_policy()
RECEIVED = datetime(2026, 2, 1, tzinfo=UTC)
D = Decimal


def statement(**changes: Any) -> Statement:
    """A healthy year: CA 500, CL 250, TA 1000, TL 600, equity 400, RE 200, EBIT 100."""
    base = Statement(
        statement_id="S-2025",
        period_end=date(2025, 12, 31),
        period_months=12,
        currency="EUR",
        received_at=RECEIVED,
        current_assets=D("500.00"),
        total_assets=D("1000.00"),
        current_liabilities=D("250.00"),
        total_liabilities=D("600.00"),
        equity=D("400.00"),
        revenue=D("1200.00"),
        net_income=D("60.00"),
        inventory=D("100.00"),
        retained_earnings=D("200.00"),
        ebit=D("100.00"),
        interest_expense=D("20.00"),
        operating_cash_flow=D("150.00"),
    )
    return replace(base, **changes)


def published(**changes: Any) -> FinancialStatementPublished:
    data: dict[str, Any] = {
        "statement_id": "S-2025",
        "customer_id": "C-1",
        "period_end": "2025-12-31",
        "period_months": 12,
        "currency": "EUR",
        "balance_sheet": {
            "current_assets": "500.00",
            "total_assets": "1000.00",
            "current_liabilities": "250.00",
            "total_liabilities": "600.00",
            "equity": "400.00",
            "retained_earnings": "200.00",
            "inventory": "100.00",
        },
        "income_statement": {
            "revenue": "1200.00",
            "ebit": "100.00",
            "interest_expense": "20.00",
            "net_income": "60.00",
        },
        "cash_flow": {"operating_cash_flow": "150.00"},
    }
    data.update(changes)
    return FinancialStatementPublished.model_validate(data)


# ---- the contract's formulas --------------------------------------------------------------


def test_given_a_healthy_statement_when_ratios_are_computed_then_each_matches_the_hand_computation() -> (
    None
):
    # Given the statement above (no prior statement)
    # When
    result = ratios(statement())
    # Then: CA/CL 500/250, (CA − inventory)/CL 400/250, TL/TA 600/1000, TL/equity 600/400,
    # EBIT/interest 100/20, NI/revenue 60/1200, NI/TA 60/1000, OCF/CL 150/250
    assert result == {
        "current_ratio": D("2.0000"),
        "quick_ratio": D("1.6000"),
        "debt_ratio": D("0.6000"),
        "debt_to_equity": D("1.5000"),
        "interest_coverage": D("5.0000"),
        "net_margin": D("0.0500"),
        "roa": D("0.0600"),
        "operating_cash_flow_ratio": D("0.6000"),
        "altman_z2": D("3.6640"),
    }


def test_given_a_statement_when_z2_is_computed_then_it_uses_the_published_coefficients() -> None:
    # By hand, for the statement above:
    #   X1 = (CA − CL)/TA = (500 − 250)/1000 = 0.25
    #   X2 = RE/TA        = 200/1000         = 0.20
    #   X3 = EBIT/TA      = 100/1000         = 0.10
    #   X4 = equity/TL    = 400/600          = 0.6666…
    #   Z'' = 6.56·0.25 + 3.26·0.20 + 6.72·0.10 + 1.05·0.6666…
    #       = 1.64     + 0.652     + 0.672     + 0.70         = 3.664  → safe (> 2.6)
    z2 = altman_z2(statement())
    assert z2 is not None
    assert z2.quantize(D("0.000001")) == D("3.664000")
    assert (D("6.56"), D("3.26"), D("6.72"), D("1.05")) == domain.Z2_COEFFICIENTS
    assert altman_zone(z2, POLICY) == "safe"


def test_given_a_weak_statement_when_z2_is_computed_then_it_lands_in_the_distress_zone() -> None:
    # X1 = (200 − 300)/1000 = −0.1, X2 = −50/1000 = −0.05, X3 = 10/1000 = 0.01,
    # X4 = 100/900 = 0.1111…
    # Z'' = −0.656 − 0.163 + 0.0672 + 0.116666… = −0.635133… → distress (< 1.1)
    weak = statement(
        current_assets=D("200"),
        current_liabilities=D("300"),
        total_liabilities=D("900"),
        equity=D("100"),
        retained_earnings=D("-50"),
        ebit=D("10"),
    )
    assert ratios(weak)["altman_z2"] == D("-0.6351")
    z2 = altman_z2(weak)
    assert z2 is not None and altman_zone(z2, POLICY) == "distress"


@pytest.mark.parametrize(
    ("z2", "zone"),
    [("2.61", "safe"), ("2.6", "grey"), ("1.85", "grey"), ("1.1", "grey"), ("1.09", "distress")],
)
def test_given_the_zone_cut_offs_when_z2_sits_around_them_then_the_zone_follows_2_6_and_1_1(
    z2: str, zone: str
) -> None:
    assert altman_zone(D(z2), POLICY) == zone


def test_given_a_ratio_with_many_decimals_when_published_then_it_is_rounded_to_4_places() -> None:
    # CA/CL = 200/300 = 0.66666…, (CA − inventory)/CL = 100/300 = 0.33333…
    result = ratios(
        statement(current_assets=D("200"), current_liabilities=D("300"), inventory=D("100"))
    )
    assert result["current_ratio"] == D("0.6667")
    assert result["quick_ratio"] == D("0.3333")


# ---- absent keys --------------------------------------------------------------------------


def test_given_zero_current_liabilities_when_ratios_are_computed_then_those_keys_are_absent() -> (
    None
):
    result = ratios(statement(current_liabilities=D("0")))
    assert "current_ratio" not in result
    assert "quick_ratio" not in result
    assert "operating_cash_flow_ratio" not in result
    assert result["debt_ratio"] == D("0.6000")


@pytest.mark.parametrize(
    ("changes", "absent"),
    [
        ({"equity": D("0")}, {"debt_to_equity"}),
        ({"interest_expense": D("0")}, {"interest_coverage"}),
        ({"revenue": D("0")}, {"net_margin"}),
        ({"total_liabilities": D("0")}, {"altman_z2"}),  # X4 = equity/TL
    ],
)
def test_given_a_zero_denominator_when_ratios_are_computed_then_the_key_is_absent(
    changes: dict[str, Decimal], absent: set[str]
) -> None:
    result = ratios(statement(**changes))
    assert absent.isdisjoint(result)
    assert len(result) == 9 - len(absent)


@pytest.mark.parametrize(
    ("missing", "absent"),
    [
        ("inventory", {"quick_ratio"}),
        ("interest_expense", {"interest_coverage"}),
        ("ebit", {"interest_coverage", "altman_z2"}),
        ("retained_earnings", {"altman_z2"}),
        ("operating_cash_flow", {"operating_cash_flow_ratio"}),
    ],
)
def test_given_a_missing_input_when_ratios_are_computed_then_the_keys_needing_it_are_absent(
    missing: str, absent: set[str]
) -> None:
    result = ratios(statement(**{missing: None}))
    assert absent.isdisjoint(result)
    assert len(result) == 9 - len(absent)


# ---- revenue growth -------------------------------------------------------------------------


def test_given_a_prior_statement_of_the_same_length_when_ratios_are_computed_then_growth_is_on_it() -> (
    None
):
    prior = statement(statement_id="S-2024", period_end=date(2024, 12, 31), revenue=D("1000"))
    assert ratios(statement(), prior)["revenue_growth"] == D("0.2000")  # (1200 − 1000)/1000


def test_given_a_prior_of_another_length_when_ratios_are_computed_then_there_is_no_growth() -> None:
    quarter = statement(
        statement_id="Q3", period_end=date(2025, 9, 30), period_months=3, revenue=D("300")
    )
    assert "revenue_growth" not in ratios(statement(), quarter)


def test_given_a_prior_with_zero_revenue_when_ratios_are_computed_then_growth_is_absent() -> None:
    prior = statement(statement_id="S-2024", period_end=date(2024, 12, 31), revenue=D("0"))
    assert "revenue_growth" not in ratios(statement(), prior)


def test_given_statements_of_several_lengths_when_the_prior_is_chosen_then_it_is_the_latest_earlier_one_of_the_same_length() -> (
    None
):
    state = domain.new_customer("C-1", POLICY)
    history = [
        statement(statement_id="FY2023", period_end=date(2023, 12, 31), revenue=D("800")),
        statement(statement_id="FY2024", period_end=date(2024, 12, 31), revenue=D("1000")),
        statement(
            statement_id="Q3-2025", period_end=date(2025, 9, 30), period_months=3, revenue=D("250")
        ),
        statement(
            statement_id="Q4-2025", period_end=date(2025, 12, 31), period_months=3, revenue=D("350")
        ),
        statement(statement_id="FY2025"),
    ]
    state = replace(state, statements={s.statement_id: s for s in history})
    latest = domain.latest_statement(state)
    assert latest is not None and latest.statement_id == "FY2025"  # 12 months beat 3 months
    prior = domain.prior_statement(state, latest)
    assert prior is not None and prior.statement_id == "FY2024"
    assert domain.financial_ratios(state, POLICY)["revenue_growth"] == D("0.2000")
    quarter = state.statements["Q4-2025"]
    assert domain.ratios(quarter, domain.prior_statement(state, quarter))["revenue_growth"] == D(
        "0.4000"
    )  # (350 − 250)/250


def test_given_a_prior_in_another_currency_when_growth_is_computed_then_it_is_converted() -> None:
    # 1000 USD at 0.92 = 920 EUR; (1200 − 920)/920 = 0.304347…
    prior = statement(
        statement_id="S-2024", period_end=date(2024, 12, 31), revenue=D("1000"), currency="USD"
    )
    assert ratios(statement(), prior, POLICY)["revenue_growth"] == D("0.3043")


# ---- from the event ---------------------------------------------------------------------------


def evolve(state: domain.CustomerState, data: Any) -> domain.CustomerState:
    event = domain.Event("financial_statement.published", data, RECEIVED)
    return domain.evolve(state, event, POLICY)


def test_given_a_statement_in_another_currency_when_folded_then_it_is_converted_and_ratios_hold() -> (
    None
):
    state = domain.new_customer("C-1", POLICY)  # credit currency EUR
    folded = evolve(state, published(currency="USD"))
    converted = folded.statements["S-2025"]
    assert converted.currency == "EUR"
    assert converted.total_assets == D("920.00")  # 1000 USD at 0.92
    assert domain.financial_ratios(folded, POLICY)["current_ratio"] == D("2.0000")


def test_given_a_statement_in_a_currency_without_rate_when_folded_then_it_is_a_no_fx_rate_dead_letter() -> (
    None
):
    state = domain.new_customer("C-1", POLICY)
    with pytest.raises(DeadLetter) as caught:
        evolve(state, published(currency="KRW"))
    assert caught.value.reason == "no_fx_rate"
    assert "KRW" in caught.value.error


def test_given_a_restated_statement_when_folded_then_it_replaces_the_earlier_figures() -> None:
    state = domain.new_customer("C-1", POLICY)
    state = evolve(state, published())
    restated = published(income_statement={"revenue": "1200.00", "net_income": "-60.00"})
    state = evolve(state, restated)
    assert len(state.statements) == 1
    assert domain.financial_ratios(state, POLICY)["net_margin"] == D("-0.0500")
