"""`optim.fma` against exact rational arithmetic: eagerly (ATen's add_/addcmul_) and compiled (prims.fma).

Wrong here means a multiply-add of the Sophia kernels rounds twice somewhere. Random rows mix exponents over
2^-40 … 2^10, so that every alignment of product and addend occurs; crafted rows put the exact value just
off a halfway point that a product rounded first (or a sum rounded in a wider type) lands on, so that one
extra rounding picks the other neighbour.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch._inductor.inductor_prims  # registers prims.fma for the functions compiled here

from optim.fma import add_, addcmul_

DTYPES = [torch.float32, torch.float64]


def exactly_rounded(x: Fraction, dtype: torch.dtype) -> float:
    """x rounded once to `dtype`, to nearest, ties to even (float(Fraction) is correctly rounded to double).
    """
    if dtype == torch.float64:
        return float(x)
    guess = np.float32(float(x))  # within one float32 of the answer
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - x),
                                                int(np.array(c).view(np.int32)) & 1)))


def tie_breaker(dtype: torch.dtype) -> tuple[float, float, float]:
    """(a, b, c) with a·b = half an ulp of c less a hair and c odd: a·b + c lies just below a halfway point.
    Rounding a·b first lands on the halfway point, which ties up, to the even neighbour: the wrong one."""
    p = 23 if dtype == torch.float32 else 52  # mantissa bits
    k = (p + 1) // 2 + 6
    return 1 - 2.0 ** -k, 2.0 ** -(p + 1) * (1 + 2.0 ** -k), 1 + 2.0 ** -p


def random_rows(dtype: torch.dtype, seed: int, n: int = 3000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-40, 10, (n,), generator=generator).to(dtype))
    return torch.randn(n, generator=generator, dtype=dtype) * scale


def with_ties(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (t1, t2, c) rows, then the crafted ones in every sign combination."""
    a, b, c = tie_breaker(dtype)
    signs = [(1, 1, 1), (-1, 1, -1), (1, -1, -1), (-1, -1, 1)]
    crafted = [torch.tensor([s * v for s in column], dtype=dtype)
               for column, v in zip(zip(*signs, strict=True), (a, b, c), strict=True)]
    return tuple(torch.cat([random_rows(dtype, seed), tail]) for seed, tail in enumerate(crafted))


def exact_add(c: torch.Tensor, other: torch.Tensor, alpha: float) -> torch.Tensor:
    """ATen's `c.add_(other, alpha=alpha)`, exactly: the Python scalar meets the tensors in their dtype."""
    alpha = Fraction(exactly_rounded(Fraction(alpha), c.dtype))
    return torch.tensor([exactly_rounded(Fraction(x) * alpha + Fraction(y), c.dtype)
                         for x, y in zip(other.tolist(), c.tolist(), strict=True)], dtype=c.dtype)


def exact_addcmul_cpu(c: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: float) -> torch.Tensor:
    """ATen's CPU `c.addcmul_(t1, t2, value=value)`: c + (value·t1)·t2, value·t1 rounded, the rest once."""
    value = Fraction(exactly_rounded(Fraction(value), c.dtype))
    rows = zip(t1.tolist(), t2.tolist(), c.tolist(), strict=True)
    return torch.tensor([exactly_rounded(Fraction(exactly_rounded(value * Fraction(x), c.dtype)) * Fraction(y)
                                         + Fraction(z), c.dtype) for x, y, z in rows], dtype=c.dtype)


def moment(average: torch.Tensor, value: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    return add_(average.clone(), value, alpha)


def product(average: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, value: float | torch.Tensor
            ) -> torch.Tensor:
    return addcmul_(average.clone(), t1, t2, value)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ["sophia", "tie"])
def test_add_rounds_once_eagerly_and_compiled(dtype, alpha):
    # alpha: Sophia's 1 − β1, or the crafted a, with which the crafted rows (other = ±b, c = ±c) tie.
    _, other, c = with_ties(dtype)
    alpha = 1 - 0.965 if alpha == "sophia" else tie_breaker(dtype)[0]
    expected = exact_add(c, other, alpha)
    assert not torch.equal(c + other * alpha, expected), "these rows cannot tell one rounding from two"
    assert torch.equal(moment(c, other, alpha), expected)  # eager: ATen's add_(other, alpha=...)
    as_tensor = torch.tensor(alpha, dtype=torch.float64)  # how optim.fused.MultiTensorKernel passes floats
    assert torch.equal(torch.compile(moment, fullgraph=True, dynamic=False)(c, other, as_tensor), expected)
    assert torch.equal(torch.compile(moment, fullgraph=True, dynamic=True)(c, other, alpha), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [1.0, 1 - 0.99, -6e-4])  # exact (the ties count), Sophia's 1 − β2, −lr
def test_addcmul_rounds_like_atens_cpu_kernel_eagerly_and_compiled(dtype, value):
    t1, t2, c = with_ties(dtype)
    expected = exact_addcmul_cpu(c, t1, t2, value)
    assert not torch.equal(c + t1 * t2 * value, expected), "these rows cannot tell one rounding from two"
    assert torch.equal(product(c, t1, t2, value), expected)  # eager: ATen's addcmul_
    as_tensor = torch.tensor(value, dtype=torch.float64)
    assert torch.equal(torch.compile(product, fullgraph=True, dynamic=False)(c, t1, t2, as_tensor), expected)


def test_rounding_through_float64_is_not_one_rounding():
    # Why the compiled path asks Inductor for a true fused multiply-add instead of computing in float64 and
    # rounding to float32: the crafted row's float64 sum lands exactly on a float32 halfway point.
    a, b, c = (torch.tensor([v], dtype=torch.float32) for v in tie_breaker(torch.float32))
    through_double = (a.double() * b.double() + c.double()).float()
    assert not torch.equal(through_double, exact_add(c, b, float(a)))
