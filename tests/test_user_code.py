"""An exception raised in the user's own code reaches them as theirs: file, line and source."""
import pytest

from mixprec.search import RunConfig, run_search
from mixprec.user_code import UserCodeError, as_user_error


def test_an_error_in_the_users_forward_names_their_line(tmp_path):
    cfg = RunConfig(model="tests.graph.user_models:FailsInTraining", float_epochs=1, qat_epochs=1)
    with pytest.raises(UserCodeError) as info:
        run_search(cfg, tmp_path / "run")
    assert info.value.where.startswith("user_models.py:") and "`x = x.view(-1, 65)`" in info.value.where
    assert "RuntimeError" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)


def test_errors_that_never_passed_through_user_code_stay_as_they_are():
    import mixprec.graph.ir as ir

    try:
        ir.Graph([], "x")["nowhere"]
    except KeyError as exc:
        assert isinstance(as_user_error(exc), UserCodeError)  # called from here: this test is "user code"
        inside = exc.with_traceback(exc.__traceback__.tb_next)  # as run_search sees it: mixprec frames only
        assert as_user_error(inside) is inside  # a bug to report, not the user's
