"""Engine settings that need no processes: FSDP2's mixed-precision policy per precision."""

import pytest
import torch

from phi3v.train.engine import mixed_precision_policy


def test_bf16_computes_in_bf16_and_reduces_in_fp32_while_fp32_casts_nothing():
    bf16 = mixed_precision_policy("bf16")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp16 = mixed_precision_policy("fp16")
    assert (fp16.param_dtype, fp16.reduce_dtype) == (torch.float16, torch.float32)
    fp32 = mixed_precision_policy("fp32")
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, None)  # the parameters' own dtype throughout


def test_an_unknown_precision_is_named():
    with pytest.raises(ValueError, match=r"precision='int8': expected bf16, fp16 or fp32"):
        mixed_precision_policy("int8")
