"""Mixed-precision policies: which format each quantity of a training step lives in.

Grammar (jmp style): comma-separated ``key=value`` fields, e.g. ``p=bf16,c=bf16,a=fp32,s=fp32,m=fp32``.

=====  ==========  ==========================================================================================
key    field       meaning
=====  ==========  ==========================================================================================
p      params      storage of the parameters the model computes with (and that the fingerprint hashes)
c      compute     elementwise math of the forward and backward pass; every op is rounded to it
a      accum       accumulator of dot products and sums (fp32 or fp64: every backend here accumulates at least
                   in fp32, as numpy fp16/bf16 ``dot`` and GPU tensor cores do); rounded once to ``c`` at the end
s      state       storage of optimizer state (momentum buffer, Adam moments)
m      master      optional master copy of the weights that the optimizer updates; params = round(master, p)
ls     loss_scale  optional static loss scale, a power of two (exact to apply and to remove)
u      update_math optional format of the optimizer's elementwise arithmetic ("opmath"), at least as wide as
                   wider(weights, state); weights, gradient and state are read into it, the update is computed
                   in it op by op, and each new tensor is rounded once when stored (torch's fused optimizers)
=====  ==========  ==========================================================================================

The optimizer's elementwise math runs in the *update format* U: ``u`` when given, else the wider of (master or
params) and state. Without ``u`` each new moment is rounded to the state format and read back at once (the update
goes on with the stored value); with ``u`` the update goes on with the moment as computed in U, and it is rounded to
the state format once, when stored (docs/torch_parity.md).
A name alone is a preset (``fp64``, ``fp32``, ``fp16``, ``bf16``, ``fp16-mixed``, ``bf16-mixed``, ...).
"""

from __future__ import annotations

import dataclasses
import math

from .errors import SpecError, choice_error
from .formats import Format, get_format, wider

__all__ = ["Policy", "PRESETS", "parse_policy", "get_policy"]

# One table drives parsing and printing: (grammar key, dataclass field).
_FIELDS = (("p", "params"), ("c", "compute"), ("a", "accum"), ("s", "state"), ("m", "master"), ("ls", "loss_scale"),
           ("u", "update_math"))
_KEY_TO_FIELD = dict(_FIELDS)
_ACCUM_FORMATS = ("fp32", "fp64")


@dataclasses.dataclass(frozen=True)
class Policy:
    params: Format
    compute: Format
    accum: Format
    state: Format
    master: Format | None = None
    loss_scale: float | None = None
    update_math: Format | None = None

    def __post_init__(self):
        if self.accum.name not in _ACCUM_FORMATS:
            raise SpecError(f"accumulation format {self.accum.name!r} is not supported; valid choices: "
                            f"{', '.join(_ACCUM_FORMATS)}")
        if wider(self.accum, self.compute) is not self.accum:
            raise SpecError(f"accumulation format {self.accum.name} is narrower than compute {self.compute.name}")
        if self.loss_scale is not None:
            mantissa, _ = math.frexp(self.loss_scale)
            if not (self.loss_scale > 0 and mantissa == 0.5 and math.isfinite(self.loss_scale)):
                raise SpecError(f"loss scale {self.loss_scale!r} must be a positive power of two (e.g. 1024)")
        if self.update_math is not None:
            least = wider(self.weights, self.state)
            if _width(self.update_math) < _width(least):
                raise SpecError(f"update math format {self.update_math.name} is narrower than "
                                f"{least.name} = wider(weights {self.weights.name}, state {self.state.name})")

    @property
    def weights(self) -> Format:
        """The format the optimizer updates: the master copy if there is one, else the params."""
        return self.master or self.params

    @property
    def update(self) -> Format:
        """Format of the optimizer's elementwise arithmetic: ``update_math`` when given, else
        wider(weights, state)."""
        return self.update_math or wider(self.weights, self.state)

    @property
    def stores_state_once(self) -> bool:
        """True when a new moment is used in U as computed and rounded to S only when stored (``u`` given and S
        narrower than U); False when it is rounded to S and read back at once, or when S is U (no rounding)."""
        return self.update_math is not None and self.state != self.update

    def __str__(self) -> str:
        parts = []
        for key, field in _FIELDS:
            value = getattr(self, field)
            if value is None:
                continue
            parts.append(f"{key}={_format_number(value) if key == 'ls' else value.name}")
        return ",".join(parts)

    @property
    def name(self) -> str:
        """The preset's name when this policy is one, else its full string."""
        for preset_name, preset in PRESETS.items():
            if preset == self:
                return preset_name
        return str(self)


def _width(f: Format) -> tuple:
    """The order :func:`precision.formats.wider` ranks formats by: precision, then exponent bits."""
    return (f.precision, f.exponent_bits)


def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _preset(p, c, a, s, m=None, ls=None, u=None) -> Policy:
    return Policy(get_format(p), get_format(c), get_format(a), get_format(s),
                  get_format(m) if m else None, ls, get_format(u) if u else None)


PRESETS: dict[str, Policy] = {
    "fp64": _preset("fp64", "fp64", "fp64", "fp64"),
    "fp32": _preset("fp32", "fp32", "fp32", "fp32"),
    # "Pure" low precision: params, math and optimizer state all narrow; dot products accumulate in fp32.
    "fp16": _preset("fp16", "fp16", "fp32", "fp16"),
    "bf16": _preset("bf16", "bf16", "fp32", "bf16"),
    # The usual recipe: narrow params and math, fp32 master weights and optimizer state.
    "fp16-mixed": _preset("fp16", "fp16", "fp32", "fp32", m="fp32"),
    "bf16-mixed": _preset("bf16", "bf16", "fp32", "fp32", m="fp32"),
    "fp16-mixed-ls": _preset("fp16", "fp16", "fp32", "fp32", m="fp32", ls=1024.0),
    # fp8 compute with fp32 master weights (as in fp8 training recipes); e4m3 for everything the model computes.
    "fp8-mixed": _preset("fp8_e4m3fn", "fp8_e4m3fn", "fp32", "fp32", m="fp32"),
    # What torch.optim.Adam/AdamW(fused=True) does to bf16 params on the CPU: params, grads and moments stored in
    # bf16, the update computed in fp32 ("opmath") and each tensor rounded once when stored (docs/torch_parity.md).
    "torch-bf16": _preset("bf16", "bf16", "fp32", "bf16", u="fp32"),
}


def parse_policy(text: str) -> Policy:
    """Parse a preset name or a ``key=value`` list. Unset fields default from ``p`` (params)."""
    text = str(text).strip()
    if text in PRESETS:
        return PRESETS[text]
    if "=" not in text:
        raise choice_error("policy", text, [*PRESETS, "or a string like p=bf16,c=bf16,a=fp32,s=fp32"])
    values: dict[str, object] = {}
    for item in _fields(text):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not raw:
            raise SpecError(f"malformed policy field {item!r} in {text!r}; expected key=value")
        if key not in _KEY_TO_FIELD:
            raise SpecError(f"unknown policy key {key!r} in {text!r}; valid keys: {', '.join(_KEY_TO_FIELD)}")
        field = _KEY_TO_FIELD[key]
        if field in values:
            raise SpecError(f"policy key {key!r} given twice in {text!r}")
        if field == "loss_scale":
            try:
                values[field] = float(raw)
            except ValueError:
                raise SpecError(f"loss scale {raw!r} in {text!r} is not a number") from None
        else:
            values[field] = get_format(raw)
    if "params" not in values:
        raise SpecError(f"policy {text!r} has no params format (p=...)")
    params = values["params"]
    compute = values.setdefault("compute", params)
    values.setdefault("state", params)
    values.setdefault("accum", wider(compute, get_format("fp32")))
    return Policy(**values)


def _fields(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses, so that a field's value may hold a comma of its own
    (a format with parameters, e.g. ``p=fp(p=4,emax=15)``)."""
    fields, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            fields.append(text[start:i])
            start = i + 1
    fields.append(text[start:])
    return fields


def get_policy(policy: str | Policy) -> Policy:
    return policy if isinstance(policy, Policy) else parse_policy(policy)
