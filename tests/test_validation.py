"""Bad input to fused_linear_logprobs raises an error that names the argument."""

from __future__ import annotations

import pytest
import torch

from wpo_kernels import fused_linear_logprobs


def good() -> dict:
    return {
        "hidden": torch.randn(4, 8),
        "weight": torch.randn(10, 8),
        "targets": torch.tensor([1, 2, -100, 9]),
    }


def call(**changes):
    kwargs = good()
    kwargs.update(changes)
    return fused_linear_logprobs(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets"), **kwargs)


@pytest.mark.parametrize(
    "changes,error,pattern",
    [
        (dict(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
        (dict(hidden=torch.ones(4, 8, dtype=torch.int32)), TypeError, "hidden must be float16"),
        (dict(weight=torch.randn(10, 8, 1)), ValueError, r"weight must have shape \[V, H\]"),
        (dict(weight=torch.randn(10, 7)), ValueError, r"H = hidden.shape\[-1\] = 8"),
        (dict(weight=torch.randn(0, 8)), ValueError, "V >= 1"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), TypeError, "weight must have the dtype"),
        (dict(targets=torch.tensor([1.0, 2.0, 3.0, 4.0])), TypeError, "targets must be an integer tensor"),
        (dict(targets=torch.tensor([1, 2, 3])), ValueError, r"targets must have shape .*\(4,\)"),
        (dict(targets=torch.tensor([1, 2, 10, 0])), ValueError, r"targets must lie in \[0, 10\).*found 10"),
        (dict(targets=torch.tensor([1, -1, 3, 0])), ValueError, "found -1"),
        (dict(bias=torch.randn(9)), ValueError, r"bias must have shape \[V\]"),
        (dict(bias=torch.randn(10, dtype=torch.float64)), TypeError, "bias must have the dtype"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0, got 0.0"),
        (dict(softcap=-30.0), ValueError, "softcap"),
        (dict(logit_scale=float("inf")), ValueError, "logit_scale"),
        (dict(outputs=("logprobs", "max")), ValueError, "outputs must be names among"),
    ],
)
def test_bad_input_names_the_argument(changes: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        call(**changes)


def test_device_mismatch_is_reported() -> None:
    meta = torch.empty(10, 8, device="meta")
    with pytest.raises(ValueError, match=r"weight must be on the device of hidden \(cpu\), got meta"):
        call(weight=meta)


def test_custom_ignore_index_is_respected_by_range_check() -> None:
    out = call(targets=torch.tensor([1, -1, 3, 0]), ignore_index=-1)
    assert out.logprobs[1] == 0
