"""Our own procedural math corpus: seeded, exact and fast.

Why not an existing generator: the one on PyPI needs shims for current sympy/numpy, runs at
tens of KB/s and is not bit-reproducible. This one uses only `random.Random` (whose output is
stable across Python versions for the calls used here) and exact integer/`Fraction` arithmetic,
so a seed always gives the same bytes and every answer is computed, never guessed.

Every problem reads "<question>\nAnswer: <answer>\n"; a document is 20-50 mixed problems
separated by blank lines. All text is ASCII, and expressions use Python syntax (`*`, `**`) so
answers can be re-checked by evaluating them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from fractions import Fraction

# Bump when the output for a given seed changes; it names the cached corpus file.
MATH_GENERATOR_VERSION = 1

Problem = tuple[str, str]

_VARIABLES = "abcdfghjkmnpqrstuvwxyz"  # no e/i/l/o: they read like constants or digits
_FUNCTIONS = "fghpqr"
_SMALL_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31)


def generate_math_documents(n_bytes: int, seed: int = 0) -> list[str]:
    """Documents from one seeded stream until they hold at least `n_bytes` bytes.

    The stream is prefix-stable: a larger `n_bytes` only appends documents.
    """
    rng = random.Random(seed)
    documents: list[str] = []
    total = 0
    while total < n_bytes:
        document = math_document(rng)
        documents.append(document)
        total += len(document)  # ASCII: characters == bytes
    return documents


def math_document(rng: random.Random) -> str:
    return "\n".join(math_problem(rng) for _ in range(rng.randint(20, 50)))


def math_problem(rng: random.Random) -> str:
    question, answer = rng.choice(PROBLEM_TYPES)(rng)
    return f"{question}\nAnswer: {answer}\n"


# --- formatting -------------------------------------------------------------------------------


def format_number(value: int | Fraction, as_fraction: bool = False) -> str:
    """Integers as-is; `Fraction`s as "p/q" or, when the denominator divides a power of ten and
    `as_fraction` is False, as an exact decimal ("-0.125")."""
    value = Fraction(value)
    numerator, denominator = value.numerator, value.denominator
    if denominator == 1:
        return str(numerator)
    places = _decimal_places(denominator)
    if as_fraction or places is None:
        return f"{numerator}/{denominator}"
    return _fixed_point(numerator * (10**places // denominator), places)


def _decimal_places(denominator: int) -> int | None:
    """Digits after the point of p/denominator (in lowest terms), or None if it never ends."""
    twos = fives = 0
    while denominator % 2 == 0:
        denominator //= 2
        twos += 1
    while denominator % 5 == 0:
        denominator //= 5
        fives += 1
    return max(twos, fives) if denominator == 1 else None


def _fixed_point(scaled: int, places: int) -> str:
    """The decimal text of `scaled / 10**places` with exactly `places` digits after the point."""
    sign = "-" if scaled < 0 else ""
    digits = str(abs(scaled)).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}" if places else f"{sign}{digits}"


def _decimal(scaled: int, places: int) -> str:
    """The shortest exact text of `scaled / 10**places` ("1.5", not "1.50"); integer maths only."""
    while places and scaled % 10 == 0:
        scaled //= 10
        places -= 1
    return _fixed_point(scaled, places)


def _operand(text: str) -> str:
    """Parenthesise negatives and fractions so the expression reads (and evaluates) unambiguously."""
    return f"({text})" if text.startswith("-") or "/" in text else text


def format_polynomial(coefficients: dict[int, int], variable: str) -> str:
    """{2: 3, 0: -1} -> "3*x**2 - 1"; highest degree first."""
    return format_terms(
        (coefficients[d], "" if d == 0 else variable if d == 1 else f"{variable}**{d}")
        for d in sorted(coefficients, reverse=True)
    )


def format_terms(terms: Iterable[tuple[int, str]]) -> str:
    """[(2, "x"), (-1, "y"), (5, "")] -> "2*x - y + 5"; zero terms are dropped."""
    text = ""
    for coefficient, symbol in terms:
        if coefficient == 0:
            continue
        magnitude = abs(coefficient)
        body = (
            str(magnitude) if not symbol else symbol if magnitude == 1 else f"{magnitude}*{symbol}"
        )
        if not text:
            text = f"-{body}" if coefficient < 0 else body
        else:
            text += f" - {body}" if coefficient < 0 else f" + {body}"
    return text or "0"


def _multiply(left: dict[int, int], right: dict[int, int]) -> dict[int, int]:
    product: dict[int, int] = {}
    for degree_a, coeff_a in left.items():
        for degree_b, coeff_b in right.items():
            product[degree_a + degree_b] = product.get(degree_a + degree_b, 0) + coeff_a * coeff_b
    return product


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    while True:
        value = rng.randint(low, high)
        if value:
            return value


def _random_polynomial(rng: random.Random, degree: int) -> dict[int, int]:
    coefficients = {d: rng.randint(-9, 9) for d in range(degree)}
    coefficients[degree] = _nonzero(rng, -9, 9)
    return coefficients


# --- problem types: each returns (question, answer) -------------------------------------------


def integer_arithmetic(rng: random.Random) -> Problem:
    values = [rng.randint(-100, 100) for _ in range(rng.randint(2, 4))]
    operators = [rng.choice("+-*") for _ in values[1:]]
    expression = str(values[0])
    terms, signs = [values[0]], [1]  # multiplication binds first: collapse it into terms
    for operator, value in zip(operators, values[1:], strict=True):
        expression += f" {operator} {_operand(str(value))}"
        if operator == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if operator == "+" else -1)
    answer = sum(sign * term for sign, term in zip(signs, terms, strict=True))
    template = rng.choice(("What is {}?", "Calculate {}.", "Evaluate {}."))
    return template.format(expression), str(answer)


def decimal_arithmetic(rng: random.Random) -> Problem:
    # Decimals are (scaled integer, places) pairs: exact, and much faster than Fraction/Decimal.
    operator = rng.choice("+-*/")
    if operator == "/":  # build the dividend from the quotient so the answer is a finite decimal
        divisor, quotient = _nonzero(rng, -99, 99), rng.randint(-9999, 9999)
        left, right, answer = (divisor * quotient, 3), (divisor, 1), (quotient, 2)
    else:
        left = (rng.randint(-9999, 9999), rng.randint(1, 3))
        right = (rng.randint(-9999, 9999), rng.randint(1, 3))
        if operator == "*":
            answer = (left[0] * right[0], left[1] + right[1])
        else:
            places = max(left[1], right[1])
            a, b = left[0] * 10 ** (places - left[1]), right[0] * 10 ** (places - right[1])
            answer = (a + b if operator == "+" else a - b, places)
    expression = f"{_decimal(*left)} {operator} {_operand(_decimal(*right))}"
    return f"Calculate {expression}.", _decimal(*answer)


def fraction_arithmetic(rng: random.Random) -> Problem:
    def fraction() -> Fraction:
        return Fraction(_nonzero(rng, -12, 12), rng.randint(2, 12))

    left, right = fraction(), fraction()
    operator = rng.choice("+-*/")
    if operator == "+":
        answer = left + right
    elif operator == "-":
        answer = left - right
    elif operator == "*":
        answer = left * right
    else:
        answer = left / right
    expression = " ".join(
        (_operand(format_number(left, True)), operator, _operand(format_number(right, True)))
    )
    return f"Calculate {expression}. Give the answer in lowest terms.", format_number(answer, True)


def linear_equation(rng: random.Random) -> Problem:
    variable = rng.choice(_VARIABLES)
    solution = rng.randint(-20, 20)
    slope, offset = _nonzero(rng, -12, 12), rng.randint(-50, 50)
    left = {1: slope, 0: offset}
    if rng.random() < 0.5:
        right = {0: slope * solution + offset}
    else:
        right_slope = rng.randint(-12, 12)
        while right_slope == slope:
            right_slope = rng.randint(-12, 12)
        right = {1: right_slope, 0: slope * solution + offset - right_slope * solution}
    equation = f"{format_polynomial(left, variable)} = {format_polynomial(right, variable)}"
    return f"Solve {equation} for {variable}.", str(solution)


def linear_system(rng: random.Random) -> Problem:
    first, second = rng.sample(_VARIABLES, 2)
    x, y = rng.randint(-10, 10), rng.randint(-10, 10)
    while True:
        a, b, c, d = (rng.randint(-9, 9) for _ in range(4))
        if a * d - b * c != 0:
            break
    equations = [
        f"{format_terms(((p, first), (q, second)))} = {p * x + q * y}" for p, q in ((a, b), (c, d))
    ]
    question = f"Solve {equations[0]}, {equations[1]} for {first} and {second}."
    return question, f"{first} = {x}, {second} = {y}"


def polynomial_evaluation(rng: random.Random) -> Problem:
    name, variable = rng.choice(_FUNCTIONS), rng.choice("xyzt")
    coefficients = _random_polynomial(rng, rng.randint(1, 3))
    point = rng.randint(-6, 6)
    value = sum(coefficient * point**degree for degree, coefficient in coefficients.items())
    definition = f"{name}({variable}) = {format_polynomial(coefficients, variable)}"
    return f"Let {definition}. What is {name}({point})?", str(value)


def polynomial_expansion(rng: random.Random) -> Problem:
    variable = rng.choice("xyzt")
    product = {0: 1}
    factors = []
    for _ in range(rng.randint(2, 3)):
        factor = {1: _nonzero(rng, -5, 5), 0: _nonzero(rng, -9, 9)}
        factors.append(f"({format_polynomial(factor, variable)})")
        product = _multiply(product, factor)
    return f"Expand {'*'.join(factors)}.", format_polynomial(product, variable)


def polynomial_derivative(rng: random.Random) -> Problem:
    variable = rng.choice("xyzt")
    coefficients = _random_polynomial(rng, rng.randint(2, 5))
    derivative = {d - 1: d * c for d, c in coefficients.items() if d > 0}
    template = rng.choice(
        ("Differentiate {} with respect to {}.", "What is the derivative of {} with respect to {}?")
    )
    return template.format(format_polynomial(coefficients, variable), variable), format_polynomial(
        derivative, variable
    )


def gcd_or_lcm(rng: random.Random) -> Problem:
    common = rng.randint(1, 30)
    a, b = common * rng.randint(1, 30), common * rng.randint(1, 30)
    if rng.random() < 0.5:
        return f"What is the greatest common divisor of {a} and {b}?", str(math.gcd(a, b))
    return f"What is the least common multiple of {a} and {b}?", str(math.lcm(a, b))


def prime_factorisation(rng: random.Random) -> Problem:
    primes = sorted(rng.choice(_SMALL_PRIMES) for _ in range(rng.randint(2, 6)))
    number = math.prod(primes)
    if rng.random() < 0.5:
        return f"List the prime factors of {number}.", ", ".join(
            str(p) for p in sorted(set(primes))
        )
    powers = [p if primes.count(p) == 1 else f"{p}**{primes.count(p)}" for p in sorted(set(primes))]
    return f"Write {number} as a product of primes.", " * ".join(str(p) for p in powers)


# Each unit's size in the smallest unit of its quantity (exact integers).
UNITS = {
    "length": {"millimetres": 1, "centimetres": 10, "metres": 1000, "kilometres": 1_000_000},
    "mass": {"milligrams": 1, "grams": 1000, "kilograms": 1_000_000, "tonnes": 1_000_000_000},
    "time": {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400},
    "volume": {"millilitres": 1, "litres": 1000},
}


def unit_conversion(rng: random.Random) -> Problem:
    units = UNITS[rng.choice(tuple(UNITS))]
    source, target = rng.sample(tuple(units), 2)
    scaled, places = rng.randint(1, 9999), rng.randint(0, 2)
    # Draw the number on the larger unit's side, so the other side is an exact integer multiple.
    if units[source] >= units[target]:
        amount, answer = scaled, scaled * (units[source] // units[target])
    else:
        answer, amount = scaled, scaled * (units[target] // units[source])
    template = rng.choice(("How many {t} are there in {a} {s}?", "Convert {a} {s} to {t}."))
    question = template.format(t=target, a=_decimal(amount, places), s=source)
    return question, _decimal(answer, places)


def next_term(rng: random.Random) -> Problem:
    kind = rng.choice(("arithmetic", "geometric", "quadratic"))
    if kind == "arithmetic":
        start, step = rng.randint(-50, 50), _nonzero(rng, -15, 15)
        terms = [start + step * n for n in range(6)]
    elif kind == "geometric":
        start, ratio = _nonzero(rng, -9, 9), rng.choice((-3, -2, 2, 3, 4))
        terms = [start * ratio**n for n in range(6)]
    else:
        a, b, c = _nonzero(rng, -4, 4), rng.randint(-9, 9), rng.randint(-20, 20)
        terms = [a * n * n + b * n + c for n in range(1, 7)]
    shown = ", ".join(str(t) for t in terms[:-1])
    template = rng.choice(("What is the next term in {}?", "What comes next: {}?"))
    return template.format(shown), str(terms[-1])


def _random_value(rng: random.Random) -> tuple[Fraction, str]:
    kind = rng.randrange(3)
    if kind == 0:
        value = Fraction(rng.randint(-30, 30))
        return value, format_number(value)
    if kind == 1:
        value = Fraction(rng.randint(-300, 300), 10 ** rng.randint(1, 2))
        return value, format_number(value)
    value = Fraction(_nonzero(rng, -30, 30), rng.randint(2, 9))
    return value, format_number(value, True)


def comparison(rng: random.Random) -> Problem:
    count = rng.choice((2, 2, 3, 4))
    values: dict[Fraction, str] = {}
    while len(values) < count:
        value, text = _random_value(rng)
        values.setdefault(value, text)
    ordered = sorted(values)
    listing = ", ".join(values.values())
    if count == 2:
        first, second = values.values()
        which = rng.choice(("bigger", "smaller"))
        answer = values[ordered[-1] if which == "bigger" else ordered[0]]
        return f"Which is {which}: {first} or {second}?", answer
    if rng.random() < 0.5:
        return f"Sort {listing} in increasing order.", ", ".join(values[v] for v in ordered)
    return f"What is the largest value in {listing}?", values[ordered[-1]]


def remainder(rng: random.Random) -> Problem:
    divisor = rng.randint(2, 40)
    dividend = rng.randint(divisor, 5000)
    return f"What is the remainder when {dividend} is divided by {divisor}?", str(
        dividend % divisor
    )


def rounding(rng: random.Random) -> Problem:
    scaled, digits = rng.randint(-999999, 999999), rng.randint(3, 5)
    places = rng.randint(0, 2)
    step = 10 ** (digits - places)
    rounded = (2 * abs(scaled) + step) // (2 * step)  # half away from zero
    answer = _fixed_point(rounded if scaled >= 0 else -rounded, places)
    unit = "decimal place" if places == 1 else "decimal places"
    return f"Round {_decimal(scaled, digits)} to {places} {unit}.", answer


PROBLEM_TYPES: tuple[Callable[[random.Random], Problem], ...] = (
    integer_arithmetic,
    decimal_arithmetic,
    fraction_arithmetic,
    linear_equation,
    linear_system,
    polynomial_evaluation,
    polynomial_expansion,
    polynomial_derivative,
    gcd_or_lcm,
    prime_factorisation,
    unit_conversion,
    next_term,
    comparison,
    remainder,
    rounding,
)
