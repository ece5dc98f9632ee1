"""``finalize``: the budget step as the public API offers it, with an optional fine-tune."""
from __future__ import annotations

from ..cost import Budget, CostReport, Target
from ..nn.model import QuantModel
from ..train import TrainConfig, fit
from .budget_step import budget_step


def finalize(qm: QuantModel, target: str | Target, budget: Budget, data=None, *, x_val=None, y_val=None,
             fine_tune=None, epochs: int = 1, lr: float = 5e-4, solver: str = "auto", fill: bool = False) -> CostReport:
    """Make ``qm`` meet ``budget`` and return its measured cost.

    A model that already fits with widths the target supports is left alone. Otherwise the budget
    step (``mixprec.search.budget_step``) snaps the bits onto the supported widths and lowers the
    widths of the groups (weight channels / slices / tensors, activation tensors) whose loss
    increase per unit of cost is smallest, chosen by an integer program, and re-measures until
    every limit holds. Raises ``BudgetError`` naming the smallest achievable cost when nothing fits.

    Without data the selection ranks groups by their relative weight (and activation)
    quantization noise and nothing is trained. ``data`` (a dataset split object with ``x_val``,
    ``y_val`` and, for fine-tuning, ``x_train``, ``y_train``; or a pair ``(x_val, y_val)``) or
    ``x_val, y_val`` measure the sensitivities on held-out data instead. With training data the
    model is then fine-tuned for ``epochs`` epochs at ``lr`` with the bits frozen; ``fine_tune``
    (a callable taking the model) replaces that with your own training. ``fill`` (with held-out
    data) also raises widths into budget the model leaves unused where the measured loss falls.
    Use ``budget_step.budget_step`` directly for what changed and the solver used.
    """
    train = None
    if isinstance(data, (tuple, list)):
        x_val, y_val = data
    elif data is not None:
        x_val, y_val = data.x_val, data.y_val
        if getattr(data, "x_train", None) is not None:
            train = data
    if fine_tune is None and train is not None and epochs > 0:
        fine_tune = _fine_tune_with(train, epochs, lr)
    return budget_step(qm, target, budget, x_val=x_val, y_val=y_val, fine_tune=fine_tune, solver=solver,
                       fill=fill).report


def _fine_tune_with(data, epochs: int, lr: float):
    """A fine-tune of weights and biases only (the bits stay as chosen) on ``data``'s splits."""
    def run(qm: QuantModel):
        params = qm.weight_parameters()
        return fit(qm, data.x_train, data.y_train, data.x_val, data.y_val, TrainConfig(epochs=epochs, lr=lr),
                   params=params, augment=getattr(data, "augment", None))
    return run
