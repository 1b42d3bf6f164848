"""Worked rationales for the gold training targets: the steps a small model can imitate.

A target of the form ``expression = answer`` teaches a 135M model to guess the result in one
token run; one operation per step (``859 + 467 = 1326, 1326 - 914 = 412, ...``) teaches it to
compute. Each function returns ``None`` when it cannot write exact steps (non-integer
intermediate results, an expression it does not parse), and the caller falls back to a short
generic rationale; every returned text ends in the task's own gold answer, checked here.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping

_OPS: dict[type, tuple[str, Callable[[int, int], float | int]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
}


def _as_int(value: float | int) -> int | None:
    if isinstance(value, float):
        if not value.is_integer():
            return None
        return int(value)
    return value


def _const(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _const(node.operand)
        return None if inner is None else -inner
    return None


def _places(n: int) -> list[int]:
    """The nonzero place values of ``n >= 0``, largest first: 8780 -> [8000, 700, 80]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]


def _long(value: int) -> bool:
    """Worth splitting: two or more nonzero digits and at least three digits."""
    return abs(value) >= 100 and len(_places(abs(value))) >= 2


def add_sub_steps(left: int, sym: str, right: int) -> str:
    """``left sym right`` (``+`` or ``-``) with the addend split by place value, so that each step
    adds or takes away one nonzero digit and never crosses zero: ``1975 - 2183`` becomes
    ``2183 - 1975: 2183 - 1000 = 1183, 1183 - 900 = 283, 283 - 70 = 213, 213 - 5 = 208, so
    1975 - 2183 = -208``. Short operations stay one step (``45 + 23 = 68``)."""
    result = left + right if sym == "+" else left - right
    plain = f"{left} {sym} {right} = {result}"
    y = right if sym == "+" else -right  # the signed addend: result = left + y
    if left == 0 or y == 0:
        return plain
    if (left > 0) == (y > 0):  # same sign: the magnitudes add up
        start, step, sign = left, abs(y), (1 if y > 0 else -1)
        head = ""
    else:  # opposite signs: start from the larger magnitude and take the smaller one away
        big, small = (left, y) if abs(left) >= abs(y) else (y, left)
        start, step, sign = abs(big), abs(small), -1
        head = "" if start == left else f"{abs(big)} - {abs(small)}: "
    if max(abs(left), abs(right)) < 100:
        return plain
    if not _long(step):  # one step, but still the larger magnitude first
        return plain if not head else f"{start} - {step} = {start - step}, so {plain}"
    steps, acc = [], start
    for part in _places(step):
        nxt = acc + sign * part
        steps.append(f"{acc} {'+' if sign > 0 else '-'} {part} = {nxt}")
        acc = nxt
    return head + ", ".join(steps) + f", so {plain}"


def mul_steps(left: int, right: int) -> str:
    """``left * right`` with one factor split by place value into partial products, then the
    partial products added (``47 * 23: 47 * 20 = 940, 47 * 3 = 141, 940 + 141 = 1081, so
    47 * 23 = 1081``). The factor with fewer nonzero digits is split; a product of two one-digit
    factors, or by 0 or 1, stays one step."""
    result = left * right
    plain = f"{left} * {right} = {result}"
    a, b = abs(left), abs(right)
    if a <= 1 or b <= 1 or abs(result) < 100:
        return plain
    keep, split = (a, b) if len(_places(b)) <= len(_places(a)) else (b, a)
    if len(_places(split)) < 2:
        if len(_places(keep)) < 2:
            return plain
        keep, split = split, keep  # 7632 * 8: split 7632, not 8
    parts = [(keep * p, f"{keep} * {p} = {keep * p}" if split == b or keep == a else f"{p} * {keep} = {keep * p}")
             for p in _places(split)]
    steps = [text for _, text in parts]
    acc = parts[0][0]
    for value, _ in parts[1:]:
        steps.append(add_sub_steps(acc, "+", value))
        acc += value
    if result < 0:
        steps.append(f"with the sign, {plain}")
        return ", ".join(steps)
    return ", ".join(steps) + f", so {plain}"


class _Stepper:
    """Reduces an integer arithmetic expression one operation at a time, in Python's evaluation
    order (left operand before right), writing ``a op b = c`` for each operation."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    def value(self, node: ast.AST) -> int | None:
        c = _const(node)
        if c is not None:
            return c
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = self.value(node.operand)
            if inner is None:
                return None
            self.steps.append(f"-({inner}) = {-inner}")
            return -inner
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd):
            return self.value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left = self.value(node.left)
            right = self.value(node.right)
            if left is None or right is None:
                return None
            sym, fn = _OPS[type(node.op)]
            if sym == "/" and right == 0:
                return None
            result = _as_int(fn(left, right))
            if result is None:
                return None
            if sym in "+-":
                self.steps.append(add_sub_steps(left, sym, right))
            elif sym == "*":
                self.steps.append(mul_steps(left, right))
            else:
                self.steps.append(f"{left} {sym} {right} = {result}")
            return result
        return None


def arithmetic_steps(expression: str, answer: str) -> str | None:
    """``a op b = c`` steps for an integer expression (+, -, *, /, unary minus, parentheses)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None
    stepper = _Stepper()
    result = stepper.value(tree.body)
    if result is None or str(result) != str(answer).strip():
        return None
    if not stepper.steps:
        return f"The value is {result}."
    return ", ".join(stepper.steps) + "."


def leg_steps(animals: Mapping[str, int], legs: Mapping[str, int], answer: str) -> str | None:
    """Legs per animal kind, then a running total."""
    parts: list[str] = []
    products: list[int] = []
    for name, count in animals.items():
        if name not in legs:
            return None
        n = int(count) * legs[name]
        parts.append(f"{count} {name} x {legs[name]} legs = {n}")
        products.append(n)
    total = 0
    sums: list[str] = []
    for i, p in enumerate(products):
        if i == 0:
            total = p
            continue
        sums.append(f"{total} + {p} = {total + p}")
        total += p
    if str(total) != str(answer).strip():
        return None
    text = "; ".join(parts) + "."
    if sums:
        text += " Total: " + ", ".join(sums) + "."
    return text


def equation_steps(equation: str, variable: str, answer: str) -> str | None:
    """For a linear equation in one variable: collect the terms into ``a*x = c``, then divide."""
    try:
        import sympy
    except ImportError:  # reasoning-gym depends on sympy; without it, no worked steps
        return None
    try:
        lhs_text, rhs_text = equation.split("=")
        x = sympy.Symbol(variable)
        lhs = sympy.Poly(sympy.expand(sympy.sympify(lhs_text, locals={variable: x})), x)
        rhs = sympy.Poly(sympy.expand(sympy.sympify(rhs_text, locals={variable: x})), x)
    except (ValueError, TypeError, sympy.SympifyError, sympy.PolynomialError):
        return None
    poly = lhs - rhs
    if poly.degree() != 1:
        return None
    a, k = (int(c) for c in poly.all_coeffs())
    c = -k
    if a == 0 or c % a != 0 or str(c // a) != str(answer).strip():
        return None
    kl, kr = int(lhs.coeff_monomial(1)), int(rhs.coeff_monomial(1))
    collected = f"{a}*{variable} = {c}"
    if rhs.degree() <= 0 and kl != 0:  # ``a*x + kl = kr``: the constant moves over, one worked subtraction
        collected = f"{a}*{variable} = {kr} - {kl}; {add_sub_steps(kr, '-', kl)}"
        if not collected.endswith(f"= {c}"):
            return None
    if a == 1:
        return f"{equation} gives {collected}, so {variable} = {c}."
    return f"{equation} gives {collected}, so {variable} = {c} / {a} = {c // a}."


def count_plus_self_steps(answer: str, question: str) -> str | None:
    """Alice-in-Wonderland questions: the group asked about also contains the woman herself."""
    try:
        n = int(str(answer).strip())
    except ValueError:
        return None
    who = question.split(" ", 1)[0]
    asked = re.search(r"How many ([a-z ]+?) does", question)
    if not who.isalpha() or asked is None:
        return None
    return f"{who}'s {n - 1} {asked.group(1)} plus {who} herself: {n - 1} + 1 = {n}."
