"""parity.check's bf16 rule: a value beyond its row passes only within twice the row and only as
close to the fp32 run as the one-device bf16 run is (within BF16_FACTOR); on synthetic results."""

from __future__ import annotations

import pytest

from tests.distributed.parity import TOL_BF16, check


def result(logits=0.01, grad=0.01, logits_fp32=None, grad_fp32=None):
    r = {"case": "synthetic", "rank": 0, "logits": logits, "loss": 1e-4, "grad": grad}
    if logits_fp32 is not None:
        r["logits_vs_fp32"] = {"logits": (logits, *logits_fp32)}
    if grad_fp32 is not None:
        r["grad_vs_fp32"] = grad_fp32
    return r


def test_values_within_their_rows_pass_without_an_fp32_run():
    r = result()
    check(r, TOL_BF16)
    assert "passed_by_fp32" not in r


def test_logits_beyond_the_row_pass_when_no_further_from_fp32_than_twice_the_reference():
    r = result(logits=0.0276, logits_fp32=(0.030, 0.0217))  # autosp 0.030 from fp32, the reference 0.0217
    check(r, TOL_BF16)
    assert r["passed_by_fp32"] == ["logits"]


@pytest.mark.parametrize("r", [
    result(logits=0.0276),  # no fp32 run to judge by
    result(logits=0.0276, logits_fp32=(0.050, 0.0217)),  # more than twice as far from fp32
    result(logits=0.041, logits_fp32=(0.02, 0.02)),  # beyond twice the row: a wrong mask, not rounding
], ids=["no-fp32", "far-from-fp32", "beyond-twice-the-row"])
def test_logits_beyond_the_row_fail_otherwise(r):
    with pytest.raises(AssertionError):
        check(r, TOL_BF16)


def test_gradients_are_judged_parameter_by_parameter():
    ok = {"w": (0.01, 0.5, 0.0001),  # within the row: its fp32 ratio does not matter
          "b": (0.07, 0.03, 0.02)}  # beyond the row, within twice it, as close to fp32 as allowed
    r = result(grad=0.07, grad_fp32=ok)
    check(r, TOL_BF16)
    assert r["passed_by_fp32"] == ["grad"]
    bad = dict(ok, b=(0.07, 0.05, 0.02))
    with pytest.raises(AssertionError):
        check(result(grad=0.07, grad_fp32=bad), TOL_BF16)
