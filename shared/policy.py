"""The credit policy (信用政策): one versioned YAML document holding everything the business tunes.

Grades, the scorecard, industry outlooks, limits, review cadence, alert thresholds and FX rates
are frozen pydantic models read from it. Money, ratios and thresholds are `Decimal`, parsed
exactly (YAML floats never pass through `float`). Every derived fact records `Policy.version`;
`Policy.digest` identifies the exact content even when someone forgot to bump the version.
"""

from __future__ import annotations

import calendar
import difflib
import hashlib
import json
import re
import string
from collections.abc import Iterable, Mapping
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shared.money import convert, is_currency, minor_units

__all__ = [
    "DEFAULT_POLICY_RESOURCE",
    "OUTLOOK_VALUES",
    "SCORE_INPUTS",
    "AlertRules",
    "Band",
    "CreditReportRules",
    "Direction",
    "FactorScore",
    "FinancialDeteriorationRule",
    "FxRates",
    "Grade",
    "GradeDowngradeRule",
    "Industries",
    "Industry",
    "LegalEventType",
    "LimitBreachRule",
    "LimitRules",
    "NegativeCreditReportRule",
    "Outlook",
    "OverdueRule",
    "PaymentBehaviourRules",
    "PaymentReversedRule",
    "Policy",
    "PolicyError",
    "PolicyProblem",
    "ReviewOverdueRule",
    "ReviewRules",
    "RiskLevel",
    "ScoreFactor",
    "ScoreInput",
    "Severity",
    "UtilizationHighRule",
    "add_months",
    "load_policy",
    "parse_policy",
]

DEFAULT_POLICY_RESOURCE = "default_policy.yaml"

RiskLevel = Literal["low", "medium", "high", "unacceptable"]
Outlook = Literal["positive", "stable", "negative"]
Severity = Literal["info", "warning", "critical"]
Direction = Literal["higher_is_better", "lower_is_better"]
Display = Literal["number", "percent", "days", "count"]
LegalEventType = Literal["bankruptcy", "insolvency", "lawsuit", "lien", "judgement"]
ScoreInput = Literal[
    # financial statements (contract §1 `ratios`)
    "current_ratio",
    "quick_ratio",
    "debt_ratio",
    "debt_to_equity",
    "interest_coverage",
    "net_margin",
    "roa",
    "operating_cash_flow_ratio",
    "revenue_growth",
    "altman_z2",
    # payment behaviour with us
    "avg_days_to_pay",
    "avg_days_beyond_terms",
    "late_payment_share_12m",
    "max_days_overdue_12m",
    # credit reports
    "bureau_score_normalised",
    "delinquencies_12m",
    "defaults",
    "legal_events",
    # industry
    "industry_outlook",
]
SCORE_INPUTS: frozenset[str] = frozenset(get_args(ScoreInput))

# The industry_outlook scorecard input is the outlook as a number, so it can be banded.
OUTLOOK_VALUES: Mapping[Outlook, Decimal] = {
    "positive": Decimal(1),
    "stable": Decimal(0),
    "negative": Decimal(-1),
}

_RISK_ORDER: tuple[RiskLevel, ...] = get_args(RiskLevel)
_REASON_FIELDS = ("label", "value", "op", "threshold", "points", "max_points")
_MISSING_REASON_FIELDS = ("label", "points", "max_points")
DEFAULT_REASON = "{label} {value} {op} {threshold}: {points} of {max_points} points"


# --- errors ------------------------------------------------------------------------------


class PolicyProblem(NamedTuple):
    """One thing wrong with a policy: the dotted field path and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PolicyError(ValueError):
    """A policy that cannot be used; the message lists every failing field path."""

    def __init__(self, problems: Iterable[PolicyProblem], source: str | None = None) -> None:
        self.problems: tuple[PolicyProblem, ...] = tuple(problems)
        self.source = source
        where = f" ({source})" if source else ""
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"invalid credit policy{where}:\n{lines}")


def _fail(problems: list[tuple[str, str]]) -> None:
    """Raise the problems (paths relative to the model being validated) as one pydantic error.

    `_problems_from` later prefixes each path with the location of that model, so every
    cross-field check reports the exact field at fault rather than its parent.
    """
    if problems:
        summary = "; ".join(f"{path}: {message}" for path, message in problems)
        raise PydanticCustomError("policy", "{summary}", {"summary": summary, "problems": problems})


# --- currencies ----------------------------------------------------------------------------


def _check_currency(code: str) -> str:
    if not is_currency(code):
        raise PydanticCustomError(
            "currency", "'{code}' is not an ISO 4217 currency code", {"code": code}
        )
    return code


# --- field types ---------------------------------------------------------------------------


def _exact(value: object) -> object:
    # A float has already lost the decimal the author wrote; refuse rather than guess.
    if isinstance(value, bool | float):
        raise PydanticCustomError(
            "inexact_number", 'must be an exact decimal (write it as a string, e.g. "0.92")'
        )
    return value


ExactDecimal = Annotated[Decimal, BeforeValidator(_exact)]
NonNegativeDecimal = Annotated[ExactDecimal, Field(ge=0)]
PositiveDecimal = Annotated[ExactDecimal, Field(gt=0)]
Fraction = Annotated[ExactDecimal, Field(ge=0, lt=1)]
CurrencyCode = Annotated[str, AfterValidator(_check_currency)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9+\-]{0,15}$")]
Key = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
IndustryCode = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9.]{0,15}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=500)]


class _PolicyModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _plain(number: Decimal) -> str:
    """`Decimal` as plain text without exponent or trailing zeros: 100 → "100", 0.90 → "0.9"."""
    text = format(number.normalize(), "f")
    return "0" if text == "-0" else text


def _rounded(number: Decimal, places: int) -> str:
    with localcontext() as context:
        context.prec = max(28, number.adjusted() + places + 2)
        return _plain(number.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN))


def _template_problem(template: str, allowed: tuple[str, ...]) -> str | None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        for name in names:
            if name not in allowed:
                return f"unknown placeholder {{{name}}}; allowed: " + ", ".join(
                    f"{{{field}}}" for field in allowed
                )
        template.format(**dict.fromkeys(allowed, "x"))
    except (ValueError, KeyError, IndexError) as exc:
        return f"not a valid template: {exc}"
    return None


# --- grades --------------------------------------------------------------------------------


class Grade(_PolicyModel):
    """A risk grade; `Policy.grades` lists them best first."""

    name: Name
    min_score: Annotated[ExactDecimal, Field(ge=0, le=100)]
    risk_level: RiskLevel
    description: str = ""


# --- scorecard -----------------------------------------------------------------------------


class Band(_PolicyModel):
    threshold: ExactDecimal
    points: NonNegativeDecimal


# Factor scores memoized per factor (see ScoreFactor.score), at most this many values each.
_SCORE_MEMO_MAX = 4096


class FactorScore(NamedTuple):
    points: Decimal
    reason: str


class ScoreFactor(_PolicyModel):
    """One scorecard line: reads `input`, awards up to `max_points`, and says why.

    Bands are listed best first and a value earns the points of the first band it satisfies:
    for ``higher_is_better`` the band with the highest threshold <= value (thresholds strictly
    decrease down the list), for ``lower_is_better`` the band with the lowest threshold >= value
    (thresholds strictly increase). Points never increase down the list and the first band
    awards `max_points`, so improving an input never lowers its points. A value beyond the last
    band earns 0; an absent input earns `missing_points`.
    """

    factor: Key
    input: ScoreInput
    label: str | None = None
    max_points: Annotated[ExactDecimal, Field(gt=0, le=100)]
    direction: Direction
    display: Display = "number"
    bands: Annotated[tuple[Band, ...], Field(min_length=1)]
    missing_points: NonNegativeDecimal
    missing_reason: Text
    reason: Text = DEFAULT_REASON
    value_labels: dict[ExactDecimal, str] = Field(default_factory=dict)
    _memo: dict[Decimal | None, FactorScore] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_bands_and_templates(self) -> ScoreFactor:
        problems: list[tuple[str, str]] = []
        higher = self.direction == "higher_is_better"
        for index, band in enumerate(self.bands):
            if band.points > self.max_points:
                problems.append(
                    (f"bands[{index}].points", f"must be <= max_points ({_plain(self.max_points)})")
                )
            if index == 0:
                continue
            previous = self.bands[index - 1]
            if higher and band.threshold >= previous.threshold:
                problems.append(
                    (
                        f"bands[{index}].threshold",
                        f"must be below the previous band's {_plain(previous.threshold)}: "
                        "higher_is_better bands are listed from the highest threshold down",
                    )
                )
            if not higher and band.threshold <= previous.threshold:
                problems.append(
                    (
                        f"bands[{index}].threshold",
                        f"must be above the previous band's {_plain(previous.threshold)}: "
                        "lower_is_better bands are listed from the lowest threshold up",
                    )
                )
            if band.points > previous.points:
                problems.append(
                    (
                        f"bands[{index}].points",
                        f"must be <= the previous band's {_plain(previous.points)}: a worse value "
                        "may not earn more points",
                    )
                )
        if self.bands[0].points != self.max_points:
            problems.append(
                (
                    "bands[0].points",
                    f"the best band must award max_points ({_plain(self.max_points)})",
                )
            )
        if self.missing_points > self.max_points:
            problems.append(
                ("missing_points", f"must be <= max_points ({_plain(self.max_points)})")
            )
        for field, template, allowed in (
            ("reason", self.reason, _REASON_FIELDS),
            ("missing_reason", self.missing_reason, _MISSING_REASON_FIELDS),
        ):
            problem = _template_problem(template, allowed)
            if problem:
                problems.append((field, problem))
        _fail(problems)
        return self

    @property
    def display_label(self) -> str:
        return self.label or self.input.replace("_", " ")

    def score(self, value: Decimal | None) -> FactorScore:
        """Points for `value` (None: the input is absent) and the plain-language reason.

        A pure function of the value's number (equal Decimals score and read alike: the
        reason shows values normalized or rounded), so the answers are memoized per factor:
        an assessment scores every factor with every event, and most inputs have not moved
        since the customer's last one."""
        if value is not None and not value.is_finite():
            return self._score(value)  # refused there, and a signalling NaN has no hash
        # Straight from the private store: ``self._memo`` goes through pydantic's __getattr__.
        memo: dict[Decimal | None, FactorScore] = self.__pydantic_private__["_memo"]  # type: ignore[index]
        hit = memo.get(value)
        if hit is not None:
            return hit
        scored = self._score(value)
        if len(memo) >= _SCORE_MEMO_MAX:
            memo.clear()
        memo[value] = scored
        return scored

    def _score(self, value: Decimal | None) -> FactorScore:
        if value is None:
            return FactorScore(
                self.missing_points,
                self.missing_reason.format(
                    label=self.display_label,
                    points=_plain(self.missing_points),
                    max_points=_plain(self.max_points),
                ),
            )
        if not value.is_finite():
            raise ValueError(f"{self.factor}: cannot score {value}")
        higher = self.direction == "higher_is_better"
        for band in self.bands:
            if (value >= band.threshold) if higher else (value <= band.threshold):
                return self._scored(value, "≥" if higher else "≤", band.threshold, band.points)
        return self._scored(value, "<" if higher else ">", self.bands[-1].threshold, Decimal(0))

    def _scored(self, value: Decimal, op: str, threshold: Decimal, points: Decimal) -> FactorScore:
        shown_value = self._show(value)
        if any(
            shown_value == self._show(band.threshold) and value != band.threshold
            for band in self.bands
        ):
            # Rounding must not make 1.199 read as the 1.2 of a band it does not reach.
            shown_value = self._show(value, exact=True)
        shown_threshold = self._show(threshold)
        reason = self.reason.format(
            label=self.display_label,
            value=shown_value,
            op=op,
            threshold=shown_threshold,
            points=_plain(points),
            max_points=_plain(self.max_points),
        )
        return FactorScore(points, reason)

    def _show(self, number: Decimal, *, exact: bool = False) -> str:
        if number in self.value_labels:
            return self.value_labels[number]
        if self.display == "percent":
            percent = number * 100
            return f"{_plain(percent) if exact else _rounded(percent, 1)} %"
        if self.display == "days":
            days = _plain(number) if exact else _rounded(number, 0)
            return f"{days} day" if days in ("1", "-1") else f"{days} days"
        return _plain(number) if exact else _rounded(number, 2)


# --- industries ----------------------------------------------------------------------------


class Industry(_PolicyModel):
    name: str
    outlook: Outlook


class Industries(_PolicyModel):
    """Industry code → outlook; an unlisted code falls back on its longest listed prefix."""

    default_outlook: Outlook
    codes: dict[IndustryCode, Industry]

    def outlook_for(self, industry: str | None) -> Outlook:
        if industry:
            code = industry.strip().upper()
            while code:
                found = self.codes.get(code)
                if found is not None:
                    return found.outlook
                code = code[:-1].rstrip(".")
        return self.default_outlook


# --- limits, review, payment behaviour, credit reports ---------------------------------------


class LimitRules(_PolicyModel):
    """Limit rules; amounts are in `Policy.base_currency`."""

    by_grade: dict[str, NonNegativeDecimal]
    unrated_limit: NonNegativeDecimal = Decimal(0)
    eligible_grades: tuple[str, ...]
    review_tolerance: Fraction
    overdue_tolerance_days: Annotated[int, Field(ge=0)]
    overdue_tolerance_amount: NonNegativeDecimal
    reservation_ttl_hours: Annotated[int, Field(gt=0)]
    temporary_limit_max_days: Annotated[int, Field(gt=0)]
    dynamic_adjustment: bool

    def review_allowance(self, limit: Decimal) -> Decimal:
        """How far an order must stay under when it exceeds the available credit, to go to
        review rather than be rejected (strictly less than this)."""
        return limit * self.review_tolerance

    def overdue_beyond_tolerance(self, max_days_overdue: int, overdue_amount: Decimal) -> bool:
        """True when checks must be rejected with ``overdue_beyond_tolerance``.

        `overdue_amount` must be in the base currency.
        """
        return (
            max_days_overdue > self.overdue_tolerance_days
            and overdue_amount > self.overdue_tolerance_amount
        )


class ReviewRules(_PolicyModel):
    cadence_months: dict[str, Annotated[int, Field(ge=1, le=120)]]


class PaymentBehaviourRules(_PolicyModel):
    late_after_days: Annotated[int, Field(ge=0)] = 0
    window_months: Annotated[int, Field(ge=1, le=60)] = 12


def _default_legal_event_weights() -> dict[LegalEventType, Decimal]:
    return {
        "bankruptcy": Decimal(5),
        "insolvency": Decimal(5),
        "judgement": Decimal(2),
        "lien": Decimal(1),
        "lawsuit": Decimal(1),
    }


class CreditReportRules(_PolicyModel):
    """How credit reports feed the scorecard.

    ``bureau_score_normalised`` is (score − score_min) / (score_max − score_min);
    ``legal_events`` is the sum of `legal_event_weights` over the events dated within
    `legal_event_lookback_months` (an event type without a weight counts 1).
    """

    legal_event_weights: dict[LegalEventType, NonNegativeDecimal] = Field(
        default_factory=_default_legal_event_weights
    )
    legal_event_lookback_months: Annotated[int, Field(ge=1, le=240)] = 36

    def weighted_legal_events(self, event_types: Iterable[str]) -> Decimal:
        weights = {str(kind): weight for kind, weight in self.legal_event_weights.items()}
        return sum((weights.get(kind, Decimal(1)) for kind in event_types), Decimal(0))


# --- alerts --------------------------------------------------------------------------------


class _Rule(_PolicyModel):
    enabled: bool = True


class LimitBreachRule(_Rule):
    severity: Severity = "critical"


class UtilizationHighRule(_Rule):
    """Raised at utilization >= `raise_at`, held until it drops below `clear_below`."""

    severity: Severity = "warning"
    raise_at: PositiveDecimal = Decimal("0.90")
    clear_below: PositiveDecimal = Decimal("0.85")

    @model_validator(mode="after")
    def _check_hysteresis(self) -> UtilizationHighRule:
        if self.clear_below >= self.raise_at:
            _fail([("clear_below", f"must be below raise_at ({_plain(self.raise_at)})")])
        return self

    def holds(self, utilization: Decimal, *, alert_open: bool) -> bool:
        return utilization >= (self.clear_below if alert_open else self.raise_at)


class OverdueRule(_Rule):
    """More than `warning_days` overdue: warning; more than `critical_days`: critical."""

    warning_days: Annotated[int, Field(ge=0)] = 30
    critical_days: Annotated[int, Field(ge=1)] = 90

    @model_validator(mode="after")
    def _check_days(self) -> OverdueRule:
        if self.critical_days <= self.warning_days:
            _fail([("critical_days", f"must be above warning_days ({self.warning_days})")])
        return self

    def severity_for(self, days_overdue: int) -> Severity | None:
        if days_overdue > self.critical_days:
            return "critical"
        if days_overdue > self.warning_days:
            return "warning"
        return None


class GradeDowngradeRule(_Rule):
    severity: Severity = "warning"
    critical_notches: Annotated[int, Field(ge=1)] = 2
    critical_on_worst_grade: bool = True


class FinancialDeteriorationRule(_Rule):
    """Raised when any enabled condition holds on the latest statement."""

    severity: Severity = "warning"
    z2_distress: ExactDecimal = Decimal("1.1")
    z2_safe: ExactDecimal = Decimal("2.6")
    current_ratio_below: NonNegativeDecimal = Decimal(1)
    revenue_drop: Annotated[ExactDecimal, Field(gt=0, le=1)] = Decimal("0.20")
    negative_equity: bool = True
    negative_operating_cash_flow: bool = True

    @model_validator(mode="after")
    def _check_zones(self) -> FinancialDeteriorationRule:
        if self.z2_distress >= self.z2_safe:
            _fail([("z2_distress", f"must be below z2_safe ({_plain(self.z2_safe)})")])
        return self

    def z2_zone(self, z2: Decimal) -> Literal["distress", "grey", "safe"]:
        if z2 < self.z2_distress:
            return "distress"
        return "safe" if z2 > self.z2_safe else "grey"


def _legal_types(*names: LegalEventType) -> tuple[LegalEventType, ...]:
    return names


class NegativeCreditReportRule(_Rule):
    critical_types: tuple[LegalEventType, ...] = _legal_types("bankruptcy", "insolvency")
    warning_types: tuple[LegalEventType, ...] = _legal_types("lawsuit", "lien", "judgement")
    defaults_severity: Severity = "warning"

    @model_validator(mode="after")
    def _check_disjoint(self) -> NegativeCreditReportRule:
        both = sorted(set(self.critical_types) & set(self.warning_types))
        if both:
            _fail([("warning_types", f"{', '.join(both)} already listed in critical_types")])
        return self

    def severity_for(self, legal_event_type: str) -> Severity | None:
        if legal_event_type in self.critical_types:
            return "critical"
        if legal_event_type in self.warning_types:
            return "warning"
        return None


class PaymentReversedRule(_Rule):
    severity: Severity = "warning"


class ReviewOverdueRule(_Rule):
    severity: Severity = "info"
    grace_days: Annotated[int, Field(ge=0)] = 0


class AlertRules(_PolicyModel):
    """Thresholds of the default alert rules; an absent rule keeps the contract's defaults."""

    limit_breach: LimitBreachRule = LimitBreachRule()
    utilization_high: UtilizationHighRule = UtilizationHighRule()
    overdue: OverdueRule = OverdueRule()
    grade_downgrade: GradeDowngradeRule = GradeDowngradeRule()
    financial_deterioration: FinancialDeteriorationRule = FinancialDeteriorationRule()
    negative_credit_report: NegativeCreditReportRule = NegativeCreditReportRule()
    payment_reversed: PaymentReversedRule = PaymentReversedRule()
    review_overdue: ReviewOverdueRule = ReviewOverdueRule()


# --- fx ------------------------------------------------------------------------------------

_PAIR = re.compile(r"^([A-Z]{3})/([A-Z]{3})$")


class FxRates(_PolicyModel):
    """``"USD/EUR": 0.92`` means 1 USD = 0.92 EUR; inverses and crosses are derived."""

    rates: dict[str, PositiveDecimal]

    @model_validator(mode="after")
    def _check_pairs(self) -> FxRates:
        problems: list[tuple[str, str]] = []
        seen: set[frozenset[str]] = set()
        for pair in self.rates:
            match = _PAIR.match(pair)
            if match is None:
                problems.append((f"rates.{pair}", "must be a pair of ISO 4217 codes like USD/EUR"))
                continue
            base, quote = match.groups()
            unknown = [code for code in (base, quote) if not is_currency(code)]
            if unknown:
                problems.append(
                    (f"rates.{pair}", f"{', '.join(unknown)} is not an ISO 4217 currency code")
                )
            elif base == quote:
                problems.append((f"rates.{pair}", "a currency has no rate against itself"))
            elif frozenset((base, quote)) in seen:
                problems.append((f"rates.{pair}", f"the pair {quote}/{base} is already given"))
            seen.add(frozenset((base, quote)))
        _fail(problems)
        return self


# --- the policy ----------------------------------------------------------------------------


class Policy(_PolicyModel):
    """The whole credit policy. Build it with `load_policy` / `parse_policy`."""

    version: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
    base_currency: CurrencyCode
    grades: tuple[Grade, ...]
    scorecard: tuple[ScoreFactor, ...]
    industries: Industries
    limits: LimitRules
    review: ReviewRules
    alerts: AlertRules = AlertRules()
    fx: FxRates
    payment_behaviour: PaymentBehaviourRules = PaymentBehaviourRules()
    credit_reports: CreditReportRules = CreditReportRules()

    _grade_positions: dict[str, int] = PrivateAttr(default_factory=dict)
    _factors: dict[str, ScoreFactor] = PrivateAttr(default_factory=dict)
    _digest: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_consistency(self) -> Policy:
        problems: list[tuple[str, str]] = []
        problems += self._grade_problems()
        problems += self._scorecard_problems()
        if self.grades:
            problems += self._per_grade_problems()
        problems += self._money_problems()
        _fail(problems)
        return self

    def _grade_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if len(self.grades) < 2:
            problems.append(("grades", "at least two grades are needed"))
        seen: set[str] = set()
        for index, grade in enumerate(self.grades):
            where = f"grades[{grade.name}]"
            if grade.name in seen:
                problems.append((f"{where}.name", "duplicate grade"))
            seen.add(grade.name)
            if index == 0:
                continue
            previous = self.grades[index - 1]
            if grade.min_score >= previous.min_score:
                problems.append(
                    (
                        f"{where}.min_score",
                        f"must be below {previous.name}'s {_plain(previous.min_score)}: grades are "
                        "listed best first",
                    )
                )
            if _RISK_ORDER.index(grade.risk_level) < _RISK_ORDER.index(previous.risk_level):
                problems.append(
                    (
                        f"{where}.risk_level",
                        f"{grade.risk_level} is lower than {previous.name}'s {previous.risk_level}",
                    )
                )
        if self.grades and self.grades[-1].min_score != 0:
            problems.append(
                (
                    f"grades[{self.grades[-1].name}].min_score",
                    "the worst grade must start at 0 so that every score gets a grade",
                )
            )
        return problems

    def _scorecard_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.scorecard:
            return [("scorecard", "at least one factor is needed")]
        seen: set[str] = set()
        for factor in self.scorecard:
            if factor.factor in seen:
                problems.append((f"scorecard[{factor.factor}].factor", "duplicate factor"))
            seen.add(factor.factor)
        total = sum((factor.max_points for factor in self.scorecard), Decimal(0))
        if total != 100:
            problems.append(
                (
                    "scorecard",
                    f"max_points must sum to exactly 100, they sum to {_plain(total)}",
                )
            )
        return problems

    def _per_grade_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        names = [grade.name for grade in self.grades]
        listed = ", ".join(names)
        for section, table in (
            ("limits.by_grade", self.limits.by_grade),
            ("review.cadence_months", self.review.cadence_months),
        ):
            problems += [
                (f"{section}.{name}", "missing: every grade needs a value")
                for name in names
                if name not in table
            ]
            problems += [
                (f"{section}.{name}", f"unknown grade (grades are {listed})")
                for name in table
                if name not in names
            ]
        worst = names[-1]
        if self.limits.by_grade.get(worst, Decimal(0)) != 0:
            problems.append((f"limits.by_grade.{worst}", "the worst grade's limit must be 0"))
        seen: set[str] = set()
        for name in self.limits.eligible_grades:
            if name not in names:
                problems.append(
                    (f"limits.eligible_grades[{name}]", f"unknown grade (grades are {listed})")
                )
            elif name in seen:
                problems.append((f"limits.eligible_grades[{name}]", "listed twice"))
            seen.add(name)
        return problems

    def _money_problems(self) -> list[tuple[str, str]]:
        if not is_currency(self.base_currency):
            return []
        places = minor_units(self.base_currency)
        amounts = {
            f"limits.by_grade.{name}": amount for name, amount in self.limits.by_grade.items()
        }
        amounts["limits.unrated_limit"] = self.limits.unrated_limit
        amounts["limits.overdue_tolerance_amount"] = self.limits.overdue_tolerance_amount
        return [
            (path, f"{amount} has more decimals than {self.base_currency} allows ({places})")
            for path, amount in amounts.items()
            if amount != amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
        ]

    def model_post_init(self, context: Any, /) -> None:
        self._grade_positions = {grade.name: index for index, grade in enumerate(self.grades)}
        self._factors = {factor.factor: factor for factor in self.scorecard}

    # --- grades ----------------------------------------------------------------------------

    @property
    def best_grade(self) -> Grade:
        return self.grades[0]

    @property
    def worst_grade(self) -> Grade:
        return self.grades[-1]

    def grade(self, name: str) -> Grade:
        return self.grades[self.grade_index(name)]

    def grade_index(self, grade: str | Grade) -> int:
        """Position in the best-first list: 0 is the best grade."""
        name = grade.name if isinstance(grade, Grade) else grade
        try:
            return self._grade_positions[name]
        except KeyError:
            raise ValueError(f"unknown grade {name!r} in policy {self.version}") from None

    def grade_for_score(self, score: Decimal) -> Grade:
        """The best grade whose `min_score` the score reaches (reaching it exactly counts)."""
        if not 0 <= score <= 100:
            raise ValueError(f"score must be within 0..100, got {score}")
        for grade in self.grades:
            if score >= grade.min_score:
                return grade
        return self.worst_grade  # unreachable: the worst grade starts at 0

    def notches_between(self, old: str | Grade, new: str | Grade) -> int:
        """Grades moved from `old` to `new`; positive is a downgrade, negative an upgrade."""
        return self.grade_index(new) - self.grade_index(old)

    def downgrade_severity(self, old: str | Grade, new: str | Grade) -> Severity | None:
        """Severity of the grade_downgrade alert for this move, None when it is no downgrade."""
        notches = self.notches_between(old, new)
        if notches <= 0:
            return None
        rule = self.alerts.grade_downgrade
        onto_worst = self.grade_index(new) == len(self.grades) - 1
        if notches >= rule.critical_notches or (rule.critical_on_worst_grade and onto_worst):
            return "critical"
        return rule.severity

    # --- scorecard and industries ----------------------------------------------------------

    def factor(self, key: str) -> ScoreFactor:
        try:
            return self._factors[key]
        except KeyError:
            raise ValueError(f"unknown scorecard factor {key!r} in policy {self.version}") from None

    def score_factor(self, factor: str | ScoreFactor, value: Decimal | None) -> FactorScore:
        """Points and reason for one factor; see `ScoreFactor` for how bands apply."""
        return (self.factor(factor) if isinstance(factor, str) else factor).score(value)

    def outlook_for(self, industry: str | None) -> Outlook:
        return self.industries.outlook_for(industry)

    def industry_outlook_value(self, industry: str | None) -> Decimal:
        """The ``industry_outlook`` scorecard input for an industry code."""
        return OUTLOOK_VALUES[self.outlook_for(industry)]

    # --- limits and review -----------------------------------------------------------------

    def limit_for_grade(self, grade: str | Grade | None) -> Decimal:
        """The policy limit in `base_currency`; None (not assessed yet) → `unrated_limit`."""
        if grade is None:
            return self.limits.unrated_limit
        return self.limits.by_grade[self._known_grade_name(grade)]

    def is_eligible(self, grade: str | Grade) -> bool:
        return self._known_grade_name(grade) in self.limits.eligible_grades

    def next_review_date(self, grade: str | Grade, from_date: date) -> date:
        """`from_date` plus the grade's cadence in calendar months (day clamped to month end)."""
        return add_months(from_date, self.review.cadence_months[self._known_grade_name(grade)])

    def _known_grade_name(self, grade: str | Grade) -> str:
        return self.grades[self.grade_index(grade)].name

    # --- fx --------------------------------------------------------------------------------

    def fx_rates(self) -> dict[str, Decimal]:
        return dict(self.fx.rates)

    def convert(self, amount: Decimal, from_currency: str, to_currency: str) -> Decimal | None:
        """`amount` in `to_currency` at the policy's rates, quantised to its minor units.

        None when no rate path exists (→ ``no_fx_rate``); see `shared.money.convert`.
        """
        return convert(amount, from_currency, to_currency, self.fx.rates)

    # --- identity --------------------------------------------------------------------------

    def canonical_json(self) -> str:
        """The content as canonical JSON: sorted keys, numbers as normalised decimal strings."""
        return json.dumps(
            _canonical(self.model_dump()),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @property
    def digest(self) -> str:
        """sha256 (hex) of `canonical_json`: equal for equal content, however it is written."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()
        return self._digest

    @classmethod
    def from_mapping(cls, data: object, source: str | None = None) -> Policy:
        """Validate already-parsed content, raising `PolicyError` with every field at fault."""
        if not isinstance(data, Mapping):
            raise PolicyError([PolicyProblem("", "a policy must be a mapping of sections")], source)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(_problems_from(exc, data), source) from None


def add_months(day: date, months: int) -> date:
    """Calendar month arithmetic, clamping the day to the end of the target month."""
    month_index = day.year * 12 + day.month - 1 + months
    year, month_zero = divmod(month_index, 12)
    last_day = calendar.monthrange(year, month_zero + 1)[1]
    return date(year, month_zero + 1, min(day.day, last_day))


def _canonical(value: object) -> object:
    if isinstance(value, Decimal):
        return _plain(value)
    if isinstance(value, Mapping):
        return {str(_canonical(key)): _canonical(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    return value


# --- error paths ---------------------------------------------------------------------------

_FIELD_NAMES: frozenset[str] = frozenset(
    name
    for model in (
        Policy,
        Grade,
        Band,
        ScoreFactor,
        Industries,
        Industry,
        LimitRules,
        ReviewRules,
        PaymentBehaviourRules,
        CreditReportRules,
        AlertRules,
        LimitBreachRule,
        UtilizationHighRule,
        OverdueRule,
        GradeDowngradeRule,
        FinancialDeteriorationRule,
        NegativeCreditReportRule,
        PaymentReversedRule,
        ReviewOverdueRule,
        FxRates,
    )
    for name in model.model_fields
)


def _render_path(loc: tuple[int | str, ...], data: object) -> str:
    """Dotted path; list items show their `name`/`factor` key when they have one."""
    path = ""
    node: object = data
    for part in loc:
        if isinstance(part, int):
            label = str(part)
            item = node[part] if isinstance(node, list | tuple) and 0 <= part < len(node) else None
            if isinstance(item, Mapping):
                key = item.get("name", item.get("factor"))
                if isinstance(key, str):
                    label = key
            path += f"[{label}]"
            node = item
        else:
            path += f".{part}" if path else part
            node = node.get(part) if isinstance(node, Mapping) else None
    return path


def _join(prefix: str, relative: str) -> str:
    if not prefix:
        return relative
    return f"{prefix}{relative}" if relative.startswith("[") else f"{prefix}.{relative}"


def _problems_from(exc: ValidationError, data: object) -> list[PolicyProblem]:
    problems: list[PolicyProblem] = []
    for error in exc.errors():
        # A dict key's own error is reported at the key's path.
        loc = tuple(part for part in error["loc"] if part != "[key]")
        path = _render_path(loc, data)
        kind = error["type"]
        context = error.get("ctx") or {}
        if kind == "policy":
            problems += [
                PolicyProblem(_join(path, relative), message)
                for relative, message in context["problems"]
            ]
            continue
        message = error["msg"]
        if kind == "missing":
            message = "missing (required)"
        elif kind == "extra_forbidden":
            message = "unknown key"
            key = str(loc[-1]) if loc else ""
            close = difflib.get_close_matches(key, _FIELD_NAMES, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        elif kind == "greater_than_equal":
            message = f"must be >= {context['ge']}"
        elif kind == "greater_than":
            message = f"must be > {context['gt']}"
        elif kind == "less_than_equal":
            message = f"must be <= {context['le']}"
        elif kind == "less_than":
            message = f"must be < {context['lt']}"
        elif kind == "string_type" and isinstance(error["input"], int | float | Decimal):
            message = "must be a string (quote it in YAML)"
        elif kind == "string_pattern_mismatch":
            message = f"must match the pattern {context['pattern']}"
        elif kind == "literal_error" and isinstance(error["input"], str):
            allowed = re.findall(r"'([^']*)'", str(context.get("expected", "")))
            message = f"{error['input']!r} is not one of " + ", ".join(allowed)
            close = difflib.get_close_matches(error["input"], allowed, n=1)
            if close:
                message = f"{error['input']!r}: did you mean {close[0]!r}? ({message})"
        else:
            message = message.removeprefix("Value error, ").replace("Input should be", "must be")
        problems.append(PolicyProblem(path, message))
    return problems


# --- YAML ----------------------------------------------------------------------------------


class _PolicyYamlLoader(yaml.SafeLoader):
    """Safe YAML with exact decimals for floats and an error on a repeated mapping key."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> object:
    text = str(loader.construct_scalar(node)).replace("_", "")
    special = {".inf": "Infinity", "+.inf": "Infinity", "-.inf": "-Infinity", ".nan": "NaN"}
    try:
        return Decimal(special.get(text.lower(), text))
    except InvalidOperation:
        return loader.construct_yaml_float(node)  # e.g. sexagesimal; refused as inexact later


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict[Any, Any]:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(None, None, "expected a mapping", node.start_mark)
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"duplicate key {key!r}",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_PolicyYamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)
_PolicyYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def parse_policy(text: str, source: str | None = None) -> Policy:
    """Parse and validate policy YAML; `source` (a file name) only appears in errors."""
    try:
        data = yaml.load(text, Loader=_PolicyYamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError([PolicyProblem("", f"not valid YAML: {exc}")], source) from None
    return Policy.from_mapping(data, source)


def load_policy(path: str | Path | None = None) -> Policy:
    """Load a policy file; None loads the default policy packaged with `shared`."""
    if path is None:
        resource = resources.files("shared").joinpath(DEFAULT_POLICY_RESOURCE)
        source = f"shared/{DEFAULT_POLICY_RESOURCE}"
        return parse_policy(resource.read_text(encoding="utf-8"), source)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(
            [PolicyProblem("", f"cannot read: {exc.strerror or exc}")], str(path)
        ) from None
    return parse_policy(text, str(path))
