"""The procedural math corpus: reproducible, well-formed, and every answer independently right."""

import random
import re
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

import pytest

from bam_lightning.data import math_gen
from bam_lightning.data.math_gen import generate_math_documents

N_PER_TYPE = 300


def problems(problem_type, seed=0):
    rng = random.Random(seed)
    return [problem_type(rng) for _ in range(N_PER_TYPE)]


def evaluate(expression, **variables):
    """Python evaluation with every integer literal as an exact Fraction."""
    exact = re.sub(r"\d+(\.\d+)?", lambda m: f"Fraction('{m.group(0)}')", expression)
    return eval(exact, {"Fraction": Fraction}, {k: Fraction(v) for k, v in variables.items()})


def test_reproducible_and_prefix_stable():
    first = generate_math_documents(30_000, seed=7)
    assert first == generate_math_documents(30_000, seed=7)
    assert generate_math_documents(60_000, seed=7)[: len(first)] == first
    assert generate_math_documents(30_000, seed=8) != first


def test_documents_are_batches_of_question_answer_pairs():
    documents = generate_math_documents(20_000, seed=1)
    assert sum(len(d.encode()) for d in documents) >= 20_000
    for document in documents:
        assert document.isascii()
        blocks = document.strip("\n").split("\n\n")
        assert 20 <= len(blocks) <= 50
        for block in blocks:
            question, answer = block.split("\n")
            assert question and answer.startswith("Answer: ")


def test_integer_decimal_and_fraction_arithmetic():
    for question, answer in problems(math_gen.integer_arithmetic):
        expression = re.fullmatch(r"(?:What is|Calculate|Evaluate) (.+)[?.]", question).group(1)
        assert eval(expression) == int(answer), question
    for question, answer in problems(math_gen.decimal_arithmetic):
        left, operator, right = re.fullmatch(
            r"Calculate (\S+) (\S) \(?(.+?)\)?\.", question
        ).groups()
        with localcontext() as context:
            context.prec = 50
            a, b = Decimal(left), Decimal(right)
            expected = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[operator]
        assert expected == Decimal(answer), question
        assert answer == "0" or not answer.endswith("0") or "." not in answer, answer
    for question, answer in problems(math_gen.fraction_arithmetic):
        expression = re.fullmatch(
            r"Calculate (.+)\. Give the answer in lowest terms\.", question
        ).group(1)
        assert evaluate(expression) == Fraction(answer), question
        assert str(Fraction(answer)) == answer  # lowest terms, no "x/1"


def test_equations_and_systems():
    for question, answer in problems(math_gen.linear_equation):
        left, right, variable = re.fullmatch(r"Solve (.+) = (.+) for (\w)\.", question).groups()
        assert evaluate(left, **{variable: answer}) == evaluate(right, **{variable: answer}), (
            question
        )
    for question, answer in problems(math_gen.linear_system):
        first, second, x, y = re.fullmatch(
            r"Solve (.+ = \S+), (.+ = \S+) for (\w) and (\w)\.", question
        ).groups()
        values = dict(part.split(" = ") for part in answer.split(", "))
        assert set(values) == {x, y}
        for equation in (first, second):
            lhs, rhs = equation.split(" = ")
            assert evaluate(lhs, **values) == Fraction(rhs), question


def test_polynomials():
    for question, answer in problems(math_gen.polynomial_evaluation):
        name, var, body, point = re.fullmatch(
            r"Let (\w)\((\w)\) = (.+)\. What is \w\((-?\d+)\)\?", question
        ).groups()
        assert evaluate(body, **{var: point}) == int(answer), question
    for question, answer in problems(math_gen.polynomial_expansion):
        product = re.fullmatch(r"Expand (.+)\.", question).group(1)
        var = re.search(r"[a-z]", product).group(0)
        for x in range(-3, 4):  # degree <= 3: equal at 7 points means equal polynomials
            assert evaluate(product, **{var: x}) == evaluate(answer, **{var: x}), question
    h = Fraction(1, 10**9)
    for question, answer in problems(math_gen.polynomial_derivative):
        body, var = re.fullmatch(
            r"(?:Differentiate|What is the derivative of) (.+) with respect to (\w)[.?]", question
        ).groups()
        for x in (-2, 1, 3):
            slope = (evaluate(body, **{var: x + h}) - evaluate(body, **{var: x - h})) / (2 * h)
            assert abs(slope - evaluate(answer, **{var: x})) < Fraction(1, 10**6), question


def test_number_theory():
    for question, answer in problems(math_gen.gcd_or_lcm):
        kind, a, b = re.fullmatch(
            r"What is the (greatest common divisor|least common multiple) of (\d+) and (\d+)\?",
            question,
        ).groups()
        a, b = int(a), int(b)
        divisor = max(d for d in range(1, min(a, b) + 1) if a % d == 0 and b % d == 0)
        assert int(answer) == (divisor if kind.startswith("greatest") else a * b // divisor), (
            question
        )
    for question, answer in problems(math_gen.prime_factorisation):
        number = int(re.search(r"\d+", question).group(0))
        factors, rest, p = set(), number, 2
        while rest > 1:  # trial division
            if rest % p == 0:
                factors.add(p)
                rest //= p
            else:
                p += 1
        if question.startswith("List"):
            assert [int(p) for p in answer.split(", ")] == sorted(factors), question
        else:
            assert (
                eval(answer) == number
                and {int(t.split("**")[0]) for t in answer.split(" * ")} == factors
            )
    for question, answer in problems(math_gen.remainder):
        dividend, divisor = map(int, re.findall(r"\d+", question))
        assert int(answer) == dividend - divisor * (dividend // divisor)


SIZES = {
    "millimetres": 1,
    "centimetres": 10,
    "metres": 1000,
    "kilometres": 10**6,
    "milligrams": 1,
    "grams": 1000,
    "kilograms": 10**6,
    "tonnes": 10**9,
    "seconds": 1,
    "minutes": 60,
    "hours": 3600,
    "days": 86400,
    "millilitres": 1,
    "litres": 1000,
}


def test_units_sequences_comparisons_rounding():
    for question, answer in problems(math_gen.unit_conversion):
        match = re.fullmatch(
            r"How many (\w+) are there in (\S+) (\w+)\?", question
        ) or re.fullmatch(r"Convert (\S+) (\w+) to (\w+)\.", question)
        if question.startswith("How"):
            target, amount, source = match.groups()
        else:
            amount, source, target = match.groups()
        assert Fraction(amount) * SIZES[source] / SIZES[target] == Fraction(answer), question
    for question, answer in problems(math_gen.next_term):
        terms = [int(t) for t in re.search(r"(-?\d+(?:, -?\d+)+)", question).group(1).split(", ")]
        ratios = (
            {Fraction(b, a) for a, b in zip(terms, terms[1:], strict=False)}
            if 0 not in terms
            else set()
        )
        if len(ratios) == 1 and ratios != {1}:
            expected = terms[-1] * ratios.pop()
        else:  # arithmetic or quadratic: second differences are constant
            d1 = [b - a for a, b in zip(terms, terms[1:], strict=False)]
            d2 = [b - a for a, b in zip(d1, d1[1:], strict=False)]
            assert len(set(d2)) == 1, question
            expected = terms[-1] + d1[-1] + d2[-1]
        assert int(answer) == expected, question
    for question, answer in problems(math_gen.comparison):
        listing = re.fullmatch(
            r"(?:Which is \w+: |Sort |What is the largest value in )(.+?)(?: in increasing order)?[.?]",
            question,
        ).group(1)
        texts = listing.split(" or ") if " or " in listing else listing.split(", ")
        ordered = sorted(texts, key=Fraction)
        if "smaller" in question:
            assert answer == ordered[0], question
        elif "increasing" in question:
            assert answer == ", ".join(ordered), question
        else:
            assert answer == ordered[-1], question
    for question, answer in problems(math_gen.rounding):
        value, places = re.fullmatch(r"Round (\S+) to (\d) decimal places?\.", question).groups()
        expected = Decimal(value).quantize(Decimal(1).scaleb(-int(places)), rounding=ROUND_HALF_UP)
        assert Decimal(answer) == expected and len(answer.partition(".")[2]) == int(places), (
            question
        )


@pytest.mark.parametrize(
    "value, text",
    [
        (Fraction(-1, 8), "-0.125"),
        (Fraction(1, 3), "1/3"),
        (7, "7"),
        (Fraction(-3, 1000), "-0.003"),
        (Fraction(123456, 100), "1234.56"),
    ],
)
def test_format_number(value, text):
    assert math_gen.format_number(value) == text
