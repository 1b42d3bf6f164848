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
        expr = sympy.expand(sympy.sympify(lhs_text, locals={variable: x})
                            - sympy.sympify(rhs_text, locals={variable: x}))
        poly = sympy.Poly(expr, x)
    except (ValueError, TypeError, sympy.SympifyError, sympy.PolynomialError):
        return None
    if poly.degree() != 1:
        return None
    a, k = (int(c) for c in poly.all_coeffs())
    c = -k
    if a == 0 or c % a != 0 or str(c // a) != str(answer).strip():
        return None
    collected = f"{a}*{variable} = {c}"
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
