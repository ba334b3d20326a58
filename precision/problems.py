"""Training problems: parameter layout, and float64 loss and predictions for evaluation on the host.

Parameters are one flat vector; ``layout`` gives the (name, shape) blocks in order, row-major. Backends train the
same model with their own kernels; this module is the float64 ground truth used for loss, loss gap and flip rate.

=========  ==============  ==============================================  =====================================
problem    task            model                                           loss (mean over the batch)
=========  ==============  ==============================================  =====================================
linreg     regression      z = X w + b                                     (z - y)^2 / 2
logreg     binary          z = X w + b, p = sigmoid(z)                     softplus(z) - y z
softmax    multiclass      Z = X W + b, P = softmax(Z)                     -log P[y]
mlp        multiclass      H = tanh(X W1 + b1), Z = H W2 + b2, softmax     -log P[y]
=========  ==============  ==============================================  =====================================
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import choice_error

__all__ = ["Problem", "PROBLEMS", "get_problem", "unflatten", "HIDDEN_UNITS"]

HIDDEN_UNITS = 32


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    task: str  # "regression", "binary" or "multiclass"
    description: str

    def layout(self, features: int, classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
        if self.name in ("linreg", "logreg"):
            return (("w", (features,)), ("b", (1,)))
        if self.name == "softmax":
            return (("W", (features, classes)), ("b", (classes,)))
        return (("W1", (features, HIDDEN_UNITS)), ("b1", (HIDDEN_UNITS,)),
                ("W2", (HIDDEN_UNITS, classes)), ("b2", (classes,)))

    @property
    def is_classifier(self) -> bool:
        return self.task != "regression"

    def logits(self, params: np.ndarray, X: np.ndarray, layout) -> np.ndarray:
        blocks = unflatten(np.asarray(params, dtype=np.float64), layout)
        if self.name in ("linreg", "logreg"):
            return X @ blocks["w"] + blocks["b"][0]
        if self.name == "softmax":
            return X @ blocks["W"] + blocks["b"]
        hidden = np.tanh(X @ blocks["W1"] + blocks["b1"])
        return hidden @ blocks["W2"] + blocks["b2"]

    def loss(self, params, X, y, layout) -> float:
        """Mean loss in float64; inf or nan when the params are not finite."""
        with np.errstate(all="ignore"):
            z = self.logits(params, X, layout)
            if self.name == "linreg":
                return float(np.mean((z - y) ** 2) / 2)
            if self.name == "logreg":
                return float(np.mean(np.logaddexp(0.0, z) - y * z))
            shifted = z - z.max(axis=1, keepdims=True)
            log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            return float(-np.mean(log_p[np.arange(len(y)), y.astype(np.int64)]))

    def predict(self, params, X, layout) -> np.ndarray:
        """Predicted labels (classifiers only), evaluated in float64."""
        with np.errstate(all="ignore"):
            z = self.logits(params, X, layout)
        if self.name == "logreg":
            return (z > 0).astype(np.int64)
        return np.argmax(z, axis=1)


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem("linreg", "regression", "linear regression, mean squared error"),
        Problem("logreg", "binary", "logistic regression, binary cross-entropy"),
        Problem("softmax", "multiclass", "softmax regression, cross-entropy"),
        Problem("mlp", "multiclass", f"one hidden tanh layer ({HIDDEN_UNITS} units), softmax cross-entropy"),
    )
}


def get_problem(name: str) -> Problem:
    if name not in PROBLEMS:
        raise choice_error("problem", name, PROBLEMS)
    return PROBLEMS[name]


def unflatten(flat: np.ndarray, layout) -> dict[str, np.ndarray]:
    """Views of the flat vector as the named blocks of ``layout``."""
    blocks, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        blocks[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return blocks
