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


def test_a_model_module_that_does_not_import_is_said_as_such(tmp_path, monkeypatch):
    """``mixprec search --model mypkg.nets:Net`` finds ``mypkg`` in the current directory as ``python -m``
    would; a module found nowhere is a ValueError naming it, not an internal error."""
    import sys

    from mixprec.models import get_model

    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torch\n\ndef net():\n    return torch.nn.Linear(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert get_model("mynets.nets:net").in_features == 4
    assert model_files("nowhere.nets:Net") == set()
    with pytest.raises(ValueError, match="Cannot import model 'nowhere.nets:Net'"):
        get_model("nowhere.nets:Net")
