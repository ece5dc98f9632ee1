"""The training loop: per-epoch checkpoints that resume exactly, rollback on a non-finite loss."""
import pytest
import torch

from mixprec.models import get_model
from mixprec.train import Callback, TrainConfig, TrainingDiverged, fit, load_checkpoint
from mixprec.train.loop import Trainer, params_finite


def _data(digits, n=512):
    return digits.x_train[:n], digits.y_train[:n], digits.x_val, digits.y_val


def _model(seed=0):
    torch.manual_seed(seed)
    return get_model("digits-cnn")


class StopAfter(Callback):
    """Stops the process's work at a given step, as a kill would (the epoch never completes)."""

    def __init__(self, step):
        self.stop_at = step

    def after_step(self, step):
        if step == self.stop_at:
            raise KeyboardInterrupt


class NaNAt(Callback):
    """A fault: the loss turns NaN at the given global steps (each once)."""

    def __init__(self, *steps):
        self.steps, self.seen = set(steps), 0

    def extra_loss(self, model):
        self.seen += 1
        if self.seen in self.steps:
            self.steps.discard(self.seen)
            return torch.tensor(float("nan"))
        return None


def test_checkpoint_every_epoch_resumes_to_the_same_weights(tmp_path, digits):
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=64, seed=3)
    straight = _model()
    fit(straight, *_data(digits), cfg)

    ckpt = tmp_path / "last.pt"
    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):  # mid-epoch 2 (8 steps per epoch)
        fit(interrupted, *_data(digits), cfg, checkpoint=ckpt, callbacks=[StopAfter(20)])
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 2 and state["step"] == 16
    assert set(state) >= {"model", "optimizer", "rng", "best_state", "history", "lr_scale", "callbacks"}

    resumed = _model(seed=99)  # different init: everything must come from the checkpoint
    history = fit(resumed, *_data(digits), cfg, checkpoint=ckpt)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_with_other_settings_is_refused(tmp_path, digits):
    ckpt = tmp_path / "last.pt"
    fit(_model(), *_data(digits, 128), TrainConfig(epochs=1, batch_size=64), checkpoint=ckpt)
    with pytest.raises(Exception, match="batch_size: 64 -> 32"):
        fit(_model(), *_data(digits, 128), TrainConfig(epochs=2, batch_size=32), checkpoint=ckpt)


def test_non_finite_loss_rolls_back_with_a_lower_learning_rate(tmp_path, digits):
    ckpt = tmp_path / "last.pt"
    model = _model()
    history = fit(model, *_data(digits), TrainConfig(epochs=3, batch_size=64, lr=3e-3), checkpoint=ckpt,
                  callbacks=[NaNAt(12)])  # epoch 1, step 4
    assert [h["epoch"] for h in history] == [0, 1, 2]
    events = history[1]["rollbacks"]
    assert len(events) == 1 and events[0]["lr_scale"] == 0.5 and "epoch 1 step 3" in events[0]["where"]
    assert "rollbacks" not in history[0] and "rollbacks" not in history[2]
    assert params_finite(model)
    state = load_checkpoint(ckpt)
    assert state["lr_scale"] == 0.5
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert history[1]["lr"] < history[0]["lr"] * 0.5 + 1e-12


def test_persistent_nan_gives_up_without_writing_a_nan_model(tmp_path, digits):
    ckpt = tmp_path / "last.pt"
    model = _model()
    always = NaNAt(*range(9, 10_000))
    with pytest.raises(TrainingDiverged, match=r"after 3 rollbacks.*last good state is epoch 1"):
        fit(model, *_data(digits), TrainConfig(epochs=3, batch_size=64), checkpoint=ckpt, callbacks=[always])
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_best_epoch_is_kept_and_throughput_logged(digits):
    model = _model()
    trainer = Trainer(model, *_data(digits), TrainConfig(epochs=3, batch_size=64))
    history = trainer.fit()
    assert trainer.best_acc == max(h["val_accuracy"] for h in history)
    assert all(h["samples_per_second"] > 0 and h["seconds"] > 0 for h in history)
    for k, v in trainer.best_state.items():
        assert torch.equal(model.state_dict()[k], v)


def test_best_if_restricts_which_epochs_compete(digits):
    # only epoch 1 is eligible: its weights are kept even if another epoch validates better
    model = _model()
    chosen = {}

    class Mark(Callback):
        def after_epoch(self, epoch, stats):
            stats["ok"] = epoch == 1
            if epoch == 1:
                chosen.update({k: v.clone() for k, v in model.state_dict().items()})

    history = fit(model, *_data(digits), TrainConfig(epochs=3, batch_size=64), callbacks=[Mark()],
                  best_if=lambda s: s["ok"])
    assert [h["ok"] for h in history] == [False, True, False]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in chosen.items())
    # no eligible epoch: the last epoch's weights stay
    model = _model()
    fit(model, *_data(digits), TrainConfig(epochs=2, batch_size=64), best_if=lambda s: False)
    last = {k: v.clone() for k, v in model.state_dict().items()}
    again = _model()
    fit(again, *_data(digits), TrainConfig(epochs=2, batch_size=64), best_if=lambda s: False)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in last.items())


def test_a_higher_tier_beats_a_more_accurate_epoch(digits):
    """``best_if`` may rank: epoch 0 in tier 2 is kept although later epochs (tier 1) validate better."""
    model = _model()
    chosen = {}

    class Mark(Callback):
        def after_epoch(self, epoch, stats):
            stats["tier"] = 2 if epoch == 0 else 1
            if epoch == 0:
                chosen.update({k: v.clone() for k, v in model.state_dict().items()})

    history = fit(model, *_data(digits), TrainConfig(epochs=3, batch_size=64, lr=3e-3), callbacks=[Mark()],
                  best_if=lambda s: s["tier"])
    assert max(h["val_accuracy"] for h in history[1:]) > history[0]["val_accuracy"]  # a real choice
    assert all(torch.equal(model.state_dict()[k], v) for k, v in chosen.items())


def test_augmentation_is_applied_to_training_batches_only(digits):
    seen = []

    def augment(x, generator):
        seen.append(x.shape[0])
        return x.flip(-1)

    fit(_model(), *_data(digits, 128), TrainConfig(epochs=1, batch_size=64), augment=augment)
    assert seen == [64, 64]


def test_device_choice(digits):
    from mixprec.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_trains_on_the_gpu(digits):
    model = _model()
    fit(model, *_data(digits, 256), TrainConfig(epochs=1, batch_size=64), device="cuda")
    assert next(model.parameters()).is_cuda


class WreckAt(Callback):
    """A fault: at the given global steps (each once) the model's weights are scrambled, as a
    diverging run would leave them (finite, but at chance)."""

    def __init__(self, model, *steps):
        self.model, self.steps = model, set(steps)

    def after_step(self, step):
        if step in self.steps:
            self.steps.discard(step)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.copy_(torch.randn_like(p) * 3)


def test_a_collapsed_epoch_rolls_back_with_a_lower_learning_rate_and_says_why(digits):
    model = _model()
    history = fit(model, *_data(digits, 2000), TrainConfig(epochs=3, batch_size=32, lr=3e-3),
                  callbacks=[WreckAt(model, 70)])  # epoch 1 (41 steps an epoch)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    events = history[1]["rollbacks"]
    assert len(events) == 1 and "validation accuracy fell" in events[0]["why"] and events[0]["lr_scale"] == 0.5
    assert history[1]["val_accuracy"] > 0.5 and history[2]["val_accuracy"] > 0.5
    assert history[0]["start_val_accuracy"] < 0.3  # a random model, measured before the first step


def test_collapse_check_can_be_turned_off_and_keeps_the_best_epoch(digits):
    model = _model()
    history = fit(model, *_data(digits, 2000), TrainConfig(epochs=2, batch_size=32, lr=3e-3, collapse_drop=0.0),
                  callbacks=[WreckAt(model, 70)])
    assert "rollbacks" not in history[1] and history[1]["val_accuracy"] < 0.5
    from mixprec.train import evaluate_accuracy

    assert evaluate_accuracy(model, digits.x_val, digits.y_val) == history[0]["val_accuracy"]  # best epoch kept
