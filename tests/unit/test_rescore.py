"""dot64's two code paths (one accumulate for small inputs, a loop for large) agree bit for
bit, so a request's row and the same row inside a large batch get the same scores."""

from __future__ import annotations

import numpy as np
import pytest

from qarm_features.codes import rescore as _rescore


@pytest.mark.parametrize("d, n, c", [(64, 1, 42), (64, 7, 42), (384, 3, 17), (16, 1, 1)])
def test_accumulate_path_equals_the_loop(monkeypatch, d, n, c):
    rng = np.random.default_rng(d * n + c)
    x = rng.standard_normal((n, d))
    cand = rng.standard_normal((d, n, c)).astype(np.float32)
    small = _rescore.dot64(x, cand)
    monkeypatch.setattr(_rescore, "_ACCUMULATE_MAX", -1)  # force the loop
    loop = _rescore.dot64(x, cand)
    assert small.tobytes() == loop.tobytes()
    # and both are within float64 rounding of the exact products' sum
    np.testing.assert_allclose(small, np.einsum("nd,dnc->nc", x, cand), rtol=1e-12, atol=1e-12)
