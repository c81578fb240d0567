"""Seeded generator of grade-school to early-algebra problems with worked solutions.

Each document is one problem: a statement, numbered steps, and "Answer: ...". Every number in a
solution is computed, never typed, so the arithmetic is right by construction (tests recheck a
sample). ``random.Random(seed)`` is stable across Python versions for integer seeds, so the same
seed gives the same corpus everywhere.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from fractions import Fraction

_NAMES = ["Ada", "Ben", "Chen", "Dara", "Emil", "Fatima", "Gus", "Hana", "Ivan", "Jae", "Kofi",
          "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma",
          "Viktor", "Wen", "Yusuf", "Zoe"]
_ITEMS = [("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"),
          ("ticket", "tickets"), ("book", "books"), ("mug", "mugs"), ("plant", "plants"),
          ("candle", "candles"), ("card", "cards"), ("towel", "towels")]
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _money(cents: int) -> str:
  return f"${cents // 100}.{cents % 100:02d}"


def _p(v: int) -> str:
  """A factor as written in a product: negatives in parentheses."""
  return f"({v})" if v < 0 else str(v)


def _coef(a: int, var: str) -> str:
  """Leading term: "x", "-x", "3x"."""
  return var if a == 1 else f"-{var}" if a == -1 else f"{a}{var}"


def _lin(a: int, b: int, var: str) -> str:
  """Following term: " + 4y", " - y"."""
  mag = "" if abs(b) == 1 else str(abs(b))
  return f" {'+' if b >= 0 else '-'} {mag}{var}"


def _frac(f: Fraction) -> str:
  return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def arithmetic(r: random.Random) -> str:
  a, b, c, d = (r.randint(2, 99) for _ in range(4))
  op1, op2 = r.choice("+-"), r.choice("+-")
  q = r.randint(2, 12)
  prod = b * c
  div = d * q
  expr = f"{a} {op1} {b} * {c} {op2} {div} / {q}"
  s1 = _OPS[op1](a, prod)
  s2 = _OPS[op2](s1, d)
  return (f"Problem: Evaluate {expr}.\n"
          f"Solution:\n"
          f"1. Multiplication and division come first: {b} * {c} = {prod} and "
          f"{div} / {q} = {d}.\n"
          f"2. The expression becomes {a} {op1} {prod} {op2} {d}.\n"
          f"3. Left to right: {a} {op1} {prod} = {s1}.\n"
          f"4. Then {s1} {op2} {d} = {s2}.\n"
          f"Answer: {s2}\n")


def linear_equation(r: random.Random) -> str:
  x = r.randint(-20, 20)
  a = r.choice([i for i in range(-12, 13) if i not in (0, 1)])
  b = r.randint(-50, 50)
  c = a * x + b
  move = f"Subtract {b} from" if b >= 0 else f"Add {-b} to"
  return (f"Problem: Solve for x: {_coef(a, 'x')} {'+' if b >= 0 else '-'} {abs(b)} = {c}.\n"
          f"Solution:\n"
          f"1. {move} both sides: {a}x = {c - b}.\n"
          f"2. Divide both sides by {a}: x = {c - b} / {_p(a)} = {x}.\n"
          f"3. Check: {a} * {_p(x)} {'+' if b >= 0 else '-'} {abs(b)} = {a * x} "
          f"{'+' if b >= 0 else '-'} {abs(b)} = {c}.\n"
          f"Answer: x = {x}\n")


def shopping(r: random.Random) -> str:
  name = r.choice(_NAMES)
  (i1, p1), (i2, p2) = r.sample(_ITEMS, 2)
  n1, n2 = r.randint(2, 9), r.randint(2, 9)
  c1, c2 = r.randint(50, 1500) // 5 * 5, r.randint(50, 1500) // 5 * 5
  total = n1 * c1 + n2 * c2
  paid = (total // 1000 + 1) * 1000 + r.choice([0, 1000, 2000])
  return (f"Problem: {name} buys {n1} {p1} at {_money(c1)} each and {n2} {p2} at "
          f"{_money(c2)} each, and pays with {_money(paid)}. How much change does "
          f"{name} get?\n"
          f"Solution:\n"
          f"1. The {p1} cost {n1} * {_money(c1)} = {_money(n1 * c1)}.\n"
          f"2. The {p2} cost {n2} * {_money(c2)} = {_money(n2 * c2)}.\n"
          f"3. The total is {_money(n1 * c1)} + {_money(n2 * c2)} = {_money(total)}.\n"
          f"4. The change is {_money(paid)} - {_money(total)} = {_money(paid - total)}.\n"
          f"Answer: {_money(paid - total)}\n")


def percentage(r: random.Random) -> str:
  price = r.randint(4, 60) * 5
  pct = r.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
  off = Fraction(price * pct, 100)
  new = price - off
  item = r.choice(_ITEMS)[0]
  return (f"Problem: A {item} costs ${price}. It is discounted by {pct}%. What is the sale "
          f"price?\n"
          f"Solution:\n"
          f"1. {pct}% of ${price} is {pct}/100 * {price} = ${float(off):.2f}.\n"
          f"2. The sale price is ${price} - ${float(off):.2f} = ${float(new):.2f}.\n"
          f"Answer: ${float(new):.2f}\n")


def fractions_sum(r: random.Random) -> str:
  da, db = r.randint(2, 12), r.randint(2, 12)
  a, b = Fraction(r.randint(1, da - 1), da), Fraction(r.randint(1, db - 1), db)
  lcd = math.lcm(a.denominator, b.denominator)
  na, nb = a.numerator * (lcd // a.denominator), b.numerator * (lcd // b.denominator)
  total = a + b
  steps = (f"1. The least common denominator of {a.denominator} and {b.denominator} is "
           f"{lcd}.\n"
           f"2. Rewrite: {_frac(a)} = {na}/{lcd} and {_frac(b)} = {nb}/{lcd}.\n"
           f"3. Add the numerators: {na} + {nb} = {na + nb}, giving {na + nb}/{lcd}.\n")
  g = math.gcd(na + nb, lcd)
  steps += (f"4. Divide numerator and denominator by {g}: {_frac(total)}.\n" if g > 1
            else "4. The fraction is already in lowest terms.\n")
  return (f"Problem: Add {_frac(a)} and {_frac(b)}.\nSolution:\n{steps}"
          f"Answer: {_frac(total)}\n")


def gcd_euclid(r: random.Random) -> str:
  g = r.randint(2, 30)
  a, b = g * r.randint(5, 60), g * r.randint(2, 40)
  a, b = max(a, b), min(a, b)
  if a == b:
    b = g
  lines, x, y, k = [], a, b, 1
  while y:
    q, rem = divmod(x, y)
    lines.append(f"{k}. {x} = {q} * {y} + {rem}.")
    x, y, k = y, rem, k + 1
  return (f"Problem: Find the greatest common divisor of {a} and {b} using Euclid's "
          f"algorithm.\nSolution:\n" + "\n".join(lines) +
          f"\n{k}. The last non-zero remainder is {x}.\nAnswer: {x}\n")


def travel(r: random.Random) -> str:
  speed = r.randint(3, 24) * 5
  halves = r.randint(2, 11)
  dist = Fraction(speed * halves, 2)
  hours = Fraction(halves, 2)
  name = r.choice(_NAMES)
  return (f"Problem: {name} drives at a constant {speed} km/h for {float(hours):g} hours. "
          f"How far does {name} travel?\n"
          f"Solution:\n"
          f"1. Distance = speed * time.\n"
          f"2. Distance = {speed} * {float(hours):g} = {float(dist):g} km.\n"
          f"Answer: {float(dist):g} km\n")


def system_2x2(r: random.Random) -> str:
  x, y = r.randint(-9, 9), r.randint(-9, 9)
  a1, b1, a2, b2 = (r.choice([i for i in range(-6, 7) if i]) for _ in range(4))
  while a1 * b2 - a2 * b1 == 0:
    b2 += 1 if b2 != -1 else 2
  c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y

  def eq(a, b, c):
    return f"{_coef(a, 'x')}{_lin(a, b, 'y')} = {c}"

  m1, m2 = b2, b1  # eliminate y: (eq1 * b2) - (eq2 * b1)
  ax, cx = a1 * m1 - a2 * m2, c1 * m1 - c2 * m2
  return (f"Problem: Solve the system {eq(a1, b1, c1)} and {eq(a2, b2, c2)}.\n"
          f"Solution:\n"
          f"1. Multiply the first equation by {m1} and the second by {m2}, then subtract to "
          f"eliminate y: {ax}x = {cx}.\n"
          f"2. So x = {cx} / {_p(ax)} = {x}.\n"
          f"3. Substitute into the first equation: {a1} * {_p(x)}{_lin(0, b1, 'y')} = {c1}, "
          f"so {_coef(b1, 'y')} = {c1 - a1 * x} and y = {y}.\n"
          f"4. Check the second equation: {a2} * {_p(x)} + {_p(b2)} * {_p(y)} = {c2}.\n"
          f"Answer: x = {x}, y = {y}\n")


def arithmetic_sequence(r: random.Random) -> str:
  a1, d, n = r.randint(-20, 30), r.randint(-7, 12) or 3, r.randint(8, 40)
  an = a1 + (n - 1) * d
  total = n * (a1 + an) // 2  # n * (2*a1 + (n-1)*d) is always even
  return (f"Problem: An arithmetic sequence starts at {a1} with common difference {d}. Find "
          f"term {n} and the sum of the first {n} terms.\n"
          f"Solution:\n"
          f"1. Term n is a1 + (n - 1) * d = {a1} + {n - 1} * {_p(d)} = {an}.\n"
          f"2. The sum is n * (a1 + an) / 2 = {n} * ({a1} + {an}) / 2 = {total}.\n"
          f"Answer: term {n} = {an}, sum = {total}\n")


def rectangle(r: random.Random) -> str:
  w, h = r.randint(2, 40), r.randint(2, 40)
  return (f"Problem: A rectangle is {w} m wide and {h} m long. Find its perimeter and area.\n"
          f"Solution:\n"
          f"1. Perimeter = 2 * ({w} + {h}) = 2 * {w + h} = {2 * (w + h)} m.\n"
          f"2. Area = {w} * {h} = {w * h} square metres.\n"
          f"Answer: perimeter {2 * (w + h)} m, area {w * h} m^2\n")


def prime_factors(r: random.Random) -> str:
  n = 1
  while n < 30:
    n = math.prod(r.choice([2, 2, 3, 3, 5, 7, 11, 13]) for _ in range(r.randint(2, 6)))
  lines, m, k, factors = [], n, 1, []
  p = 2
  while m > 1:
    while m % p == 0:
      lines.append(f"{k}. {m} / {p} = {m // p}.")
      factors.append(p)
      m //= p
      k += 1
    p += 1
  return (f"Problem: Write {n} as a product of primes.\nSolution:\n" + "\n".join(lines) +
          f"\nAnswer: {n} = {' * '.join(map(str, factors))}\n")


def mean(r: random.Random) -> str:
  k = r.randint(3, 7)
  xs = [r.randint(40, 100) for _ in range(k)]
  s = sum(xs)
  avg = Fraction(s, k)
  shown = _frac(avg) if avg.denominator == 1 else f"{s}/{k} = {float(avg):.2f}"
  return (f"Problem: {r.choice(_NAMES)} scored {', '.join(map(str, xs))} on {k} tests. What "
          f"is the mean score?\n"
          f"Solution:\n"
          f"1. Add the scores: {' + '.join(map(str, xs))} = {s}.\n"
          f"2. Divide by the number of tests: {shown}.\n"
          f"Answer: {_frac(avg) if avg.denominator == 1 else f'{float(avg):.2f}'}\n")


def quadratic(r: random.Random) -> str:
  p, q = r.randint(-12, 12), r.randint(-12, 12)
  b, c = -(p + q), p * q

  def term(v, sym):
    return _lin(0, v, sym) if v and sym else f" {'+' if v >= 0 else '-'} {abs(v)}" if v else ""

  def factor(root):
    return "x" if root == 0 else f"(x {'-' if root > 0 else '+'} {abs(root)})"

  roots = sorted({p, q})
  return (f"Problem: Solve x^2{term(b, 'x')}{term(c, '')} = 0.\n"
          f"Solution:\n"
          f"1. The roots r and s satisfy r * s = {c} and r + s = {-b}; they are {p} and {q}.\n"
          f"2. Factor: {factor(p)}{factor(q)} = 0.\n"
          f"3. Set each factor to zero: x = {p} or x = {q}.\n"
          f"Answer: x = {' or x = '.join(map(str, roots))}\n")


GENERATORS: list[Callable[[random.Random], str]] = [
    arithmetic, linear_equation, shopping, percentage, fractions_sum, gcd_euclid, travel,
    system_2x2, arithmetic_sequence, rectangle, prime_factors, mean, quadratic]


def math_docs(budget: int, seed: int = 0) -> list[tuple[str, str]]:
  """Problems until ``budget`` UTF-8 bytes; each (text, "math:<generator>#<n>")."""
  r = random.Random(seed)
  out, used, n = [], 0, 0
  while used < budget:
    gen = GENERATORS[n % len(GENERATORS)]  # round-robin keeps the problem mix even
    text = gen(r)
    out.append((text, f"math:{gen.__name__}#{n}"))
    used += len(text.encode("utf-8"))
    n += 1
  return out
