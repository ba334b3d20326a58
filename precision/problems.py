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
mlp-...    multiclass      H_i = act(H_{i-1} W_i + b_i), Z = H_L W + b     -log P[y]
=========  ==============  ==============================================  =====================================

Deeper and wider MLPs are named ``mlp-WIDTHS[-ACT]``: ``mlp-64`` (one hidden layer of 64), ``mlp-256x256`` (two of
256), ``mlp-256x256-relu`` (relu instead of the default tanh). '-' separates, as ':' and '/' separate the fields of
a run's id (``problem:data/...``). ``mlp`` itself is one tanh layer of HIDDEN_UNITS (its layout and ids as ever);
``mlp-32`` is the same model under another name. relu's derivative at 0 is 0 (torch's convention); relu and its
derivative are exact in every format. docs/models.md.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from .errors import choice_error

__all__ = ["Problem", "PROBLEMS", "get_problem", "unflatten", "HIDDEN_UNITS", "ACTIVATIONS", "MAX_WIDTH",
           "MAX_HIDDEN_LAYERS"]

HIDDEN_UNITS = 32
ACTIVATIONS = ("tanh", "relu")
MAX_WIDTH = 4096  # units of one hidden layer
MAX_HIDDEN_LAYERS = 8
_MLP_NAME = re.compile(r"mlp-([0-9]+(?:x[0-9]+)*)(?:-([a-z]+))?")


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    task: str  # "regression", "binary" or "multiclass"
    description: str
    hidden: tuple[int, ...] = ()  # an MLP's hidden widths, first layer first (empty: not an MLP)
    activation: str = "tanh"  # an MLP's hidden activation: "tanh" or "relu"

    @property
    def is_mlp(self) -> bool:
        return bool(self.hidden)

    def layout(self, features: int, classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
        if self.name in ("linreg", "logreg"):
            return (("w", (features,)), ("b", (1,)))
        if self.name == "softmax":
            return (("W", (features, classes)), ("b", (classes,)))
        sizes = (features,) + self.hidden + (classes,)
        out = []
        for i in range(len(sizes) - 1):  # W1, b1, W2, b2, ...: the one-layer mlp's layout is unchanged
            out += [(f"W{i + 1}", (sizes[i], sizes[i + 1])), (f"b{i + 1}", (sizes[i + 1],))]
        return tuple(out)

    @property
    def is_classifier(self) -> bool:
        return self.task != "regression"

    def logits(self, params: np.ndarray, X: np.ndarray, layout) -> np.ndarray:
        blocks = unflatten(np.asarray(params, dtype=np.float64), layout)
        if self.name in ("linreg", "logreg"):
            return X @ blocks["w"] + blocks["b"][0]
        if self.name == "softmax":
            return X @ blocks["W"] + blocks["b"]
        hidden = X
        for i in range(1, len(self.hidden) + 1):
            pre = hidden @ blocks[f"W{i}"] + blocks[f"b{i}"]
            hidden = np.tanh(pre) if self.activation == "tanh" else np.where(pre > 0, pre, 0.0)
        last = len(self.hidden) + 1
        return hidden @ blocks[f"W{last}"] + blocks[f"b{last}"]

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
        Problem("mlp", "multiclass", f"one hidden tanh layer ({HIDDEN_UNITS} units), softmax cross-entropy",
                (HIDDEN_UNITS,), "tanh"),
    )
}
MLP_GRAMMAR = "mlp-WIDTHS[-relu] (e.g. mlp-64, mlp-256x256, mlp-256x256-relu)"


def get_problem(name: str) -> Problem:
    """The problem ``name`` names: one of PROBLEMS, or an MLP ``mlp-WIDTHS[-ACT]`` (module docstring); a SpecError
    naming the choices otherwise."""
    if name in PROBLEMS:
        return PROBLEMS[name]
    match = _MLP_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise choice_error("problem", name, [*PROBLEMS, MLP_GRAMMAR])
    widths = tuple(int(w) for w in match.group(1).split("x"))
    activation = match.group(2) or "tanh"
    from .errors import SpecError
    if activation not in ACTIVATIONS:
        raise SpecError(f"problem {name!r}: unknown activation {activation!r}; valid choices: "
                        f"{', '.join(ACTIVATIONS)}")
    if not all(1 <= w <= MAX_WIDTH for w in widths) or len(widths) > MAX_HIDDEN_LAYERS:
        raise SpecError(f"problem {name!r}: hidden widths must be 1..{MAX_WIDTH}, at most {MAX_HIDDEN_LAYERS} "
                        f"layers")
    canonical = "mlp-" + "x".join(map(str, widths)) + ("" if activation == "tanh" else f"-{activation}")
    if canonical != name:  # leading zeros or an explicit -tanh: one name per model, so one id per run
        raise SpecError(f"problem {name!r}: write it as {canonical!r}")
    layers = f"{len(widths)} hidden {activation} layer{'s' if len(widths) > 1 else ''} ({'x'.join(map(str, widths))})"
    return Problem(canonical, "multiclass", f"{layers}, softmax cross-entropy", widths, activation)


def unflatten(flat: np.ndarray, layout) -> dict[str, np.ndarray]:
    """Views of the flat vector as the named blocks of ``layout``."""
    blocks, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        blocks[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return blocks
