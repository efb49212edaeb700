"""The dense reference ``Pi`` is an orthogonal projection, and the library never imports it."""

import re
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import orthonormal

from fora_lightning.core.reference import dense_pi

PACKAGE = Path(__file__).resolve().parents[1] / "fora_lightning"


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 12), st.integers(0, 4), st.integers(0, 2**16))
def test_dense_pi_is_an_orthogonal_projection(d_out, d_in, k, r, seed):
    gen = torch.Generator().manual_seed(seed)
    k, r = min(k, d_in), min(r, d_out, d_in)
    q, u, v = orthonormal(d_in, k, gen), orthonormal(d_out, r, gen), orthonormal(d_in, r, gen)
    g = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    p = dense_pi(g, q, u, v)
    torch.testing.assert_close(dense_pi(p, q, u, v), p, atol=1e-12, rtol=0)  # idempotent
    assert abs(float(((g - p) * p).sum())) < 1e-10 * (1 + float(g.norm()) ** 2)  # residual orthogonal to the image
    torch.testing.assert_close(
        dense_pi(g.float(), q.float(), u.float(), v.float()), p, atol=1e-5, rtol=0
    )  # float64 inside


def test_the_library_does_not_import_the_reference():
    importers = [
        str(f.relative_to(PACKAGE))
        for f in PACKAGE.rglob("*.py")
        if f.name != "reference.py" and re.search(r"core\.reference|core import .*\breference\b", f.read_text())
    ]
    assert importers == []
