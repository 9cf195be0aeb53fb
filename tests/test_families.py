"""Every family trains every task it supports in fp32 too (tiny shapes, two steps): the precision
``auto`` picks on CPUs without native bf16. The bf16 and GPU tiers are in test_precision.py."""

import pytest
from test_precision import cases, check_run, train_in


@pytest.mark.parametrize(("profile", "task"), cases())
def test_every_family_trains_every_task_in_fp32(profile, task, tmp_path):
    run = train_in("fp32", "cpu", profile, task, tmp_path)
    check_run(run, task, "fp32")
