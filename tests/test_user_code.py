"""An exception raised in the user's own code reaches them as theirs: file, line and source."""
import pytest

from mixprec.search import RunConfig, run_search
from mixprec.user_code import UserCodeError, as_user_error, model_files


def test_an_error_in_the_users_forward_names_their_line(tmp_path):
    cfg = RunConfig(model="tests.graph.user_models:FailsInTraining", float_epochs=1, qat_epochs=1)
    with pytest.raises(UserCodeError) as info:
        run_search(cfg, tmp_path / "run")
    assert info.value.where.startswith("user_models.py:") and "`x = x.view(-1, 65)`" in info.value.where
    assert "RuntimeError" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)


def test_errors_outside_the_models_code_stay_as_they_are(tmp_path):
    """An epoch hook's exception (a caller's own control flow) and mixprec's own errors keep their type."""
    class Stop(Exception):
        pass

    def stop(phase, epoch, stats):
        raise Stop

    cfg = RunConfig(model="tests.graph.user_models:DigitsTutorialNet", float_epochs=1, qat_epochs=1)
    with pytest.raises(Stop):
        run_search(cfg, tmp_path / "run", epoch_hook=stop)
    files = model_files("tests.graph.user_models:DigitsTutorialNet")
    assert len(files) == 1 and next(iter(files)).endswith("user_models.py")
    try:
        {}["missing"]
    except KeyError as exc:
        assert as_user_error(exc, files) is exc and model_files("digits-cnn") == set()
