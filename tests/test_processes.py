"""What a failed process tells its user: the reason as a sentence, never a JSON body."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from bentoml.exceptions import BentoMLException

from t2i_task.jobs.failures import describe_failure


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        # What BentoML's client raises when the model service answers 504 (its body is JSON).
        (BentoMLException('{"error":"Not able to process the request in 600.0 seconds"}',
                          error_code=HTTPStatus.GATEWAY_TIMEOUT),
         "Not able to process the request in 600.0 seconds"),
        (RuntimeError("OutOfMemoryError: CUDA out of memory"), "OutOfMemoryError: CUDA out of memory"),
        (NotADirectoryError(20, "Not a directory", "/data/images"), "NotADirectoryError: Not a directory (images)"),
        (RuntimeError('["a", "list"]'), '["a", "list"]'),
        (RuntimeError(), "RuntimeError"),
    ],
)
def test_a_failure_is_told_as_a_plain_sentence(failure, reason):
    assert describe_failure(failure) == reason
