"""RetentionMonitor's options fail at construction (before any model is loaded), each naming its flag."""

from __future__ import annotations

import pytest

from retention.callbacks.monitor import RetentionMonitor


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, r"^monitor\.batch_size=0: must be >= 1$"),
    ({"max_new_tokens": 0}, r"^monitor\.max_new_tokens=0: must be >= 1$"),
    ({"protocols": ["top1", "bogus"]}, r"^monitor\.protocols: unknown protocol\(s\) bogus"),
    ({"protocols": []}, r"^monitor\.protocols is empty"),
    ({"every_n_steps": -1}, r"^monitor\.every_n_steps=-1: must be >= 0$"),
])
def test_option_errors_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetentionMonitor(**kwargs)
