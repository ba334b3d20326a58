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
ls     dynamic     ``ls=dynamic`` or ``ls=dynamic(init=65536,growth=2,backoff=0.5,interval=2000,skip=yes)``:
                   dynamic loss scaling with torch.amp.GradScaler's rule (:class:`DynamicScale`)
r      rounding    how the new weights are stored: ``nearest`` (default), ``sr`` (stochastic rounding),
                   ``sr(stream=N)`` (another random stream), ``sr-state`` (weights and optimizer state
                   stochastically rounded; needs ``u=``), ``kahan`` (a compensation buffer in S carries each
                   rounding error of the weights into the next step, as optimi does)
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

__all__ = ["Policy", "DynamicScale", "ROUNDINGS", "PRESETS", "parse_policy", "get_policy"]

# One table drives parsing and printing: (grammar key, dataclass field).
_FIELDS = (("p", "params"), ("c", "compute"), ("a", "accum"), ("s", "state"), ("m", "master"), ("ls", "loss_scale"),
           ("u", "update_math"))
_KEY_TO_FIELD = dict(_FIELDS)
_VALID_KEYS = (*_KEY_TO_FIELD, "r")
_ACCUM_FORMATS = ("fp32", "fp64")
# How new weights (and with sr-state the optimizer state) are stored: docs/remedies.md.
ROUNDINGS = ("nearest", "sr", "sr-state", "kahan")
MAX_SR_STREAM = (1 << 29) - 1  # the stream shares the generator's 32-bit tensor word with 8 tensor ids


@dataclasses.dataclass(frozen=True)
class DynamicScale:
    """Dynamic loss scaling with torch.amp.GradScaler's rule (``torch/amp/grad_scaler.py``,
    ``_amp_update_scale_``), the five settings named as there: the scale starts at ``init``; a step whose unscaled
    gradient has an inf or NaN is skipped (``skip``; no update, the optimizer's step count unchanged) and the scale
    is multiplied by ``backoff``; after ``interval`` finite steps in a row it is multiplied by ``growth`` (kept when
    that would overflow float32). The scale is a float32 value, as in torch. ``init``, ``growth`` and ``backoff`` must
    be powers of two (torch's defaults are), so that scaling the loss and unscaling the gradient are exact: the
    scale then changes what can overflow or underflow, never a rounding in range (docs/remedies.md)."""

    init: float = 65536.0
    growth: float = 2.0
    backoff: float = 0.5
    interval: int = 2000
    skip: bool = True

    def __post_init__(self):
        for name in ("init", "growth", "backoff"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or not 2.0 ** -126 <= value <= 2.0 ** 127:
                raise SpecError(f"dynamic loss scale {name}={value!r} must be a power of two within float32's normal "
                                f"range (e.g. {_format_number(getattr(DynamicScale, name))}), so that scaling is exact")
        if not self.growth > 1:
            raise SpecError(f"dynamic loss scale growth={self.growth!r} must be above 1 (torch's default: 2)")
        if not self.backoff < 1:
            raise SpecError(f"dynamic loss scale backoff={self.backoff!r} must be below 1 (torch's default: 0.5)")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or not 0 < self.interval < 2 ** 31:
            raise SpecError(f"dynamic loss scale interval={self.interval!r} must be a positive integer below 2^31 "
                            f"(torch's default: 2000)")

    def __str__(self) -> str:
        changed = [f"{f.name}={_setting(getattr(self, f.name))}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return "dynamic" + (f"({','.join(changed)})" if changed else "")


def _setting(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _format_number(value)


def _is_power_of_two(x) -> bool:
    mantissa, _ = math.frexp(x)
    return x > 0 and mantissa == 0.5 and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class Policy:
    params: Format
    compute: Format
    accum: Format
    state: Format
    master: Format | None = None
    loss_scale: float | None = None
    update_math: Format | None = None
    dynamic_scale: DynamicScale | None = None
    rounding: str = "nearest"
    sr_stream: int = 0

    def __post_init__(self):
        if self.accum.name not in _ACCUM_FORMATS:
            raise SpecError(f"accumulation format {self.accum.name!r} is not supported; valid choices: "
                            f"{', '.join(_ACCUM_FORMATS)}")
        if wider(self.accum, self.compute) is not self.accum:
            raise SpecError(f"accumulation format {self.accum.name} is narrower than compute {self.compute.name}")
        if self.loss_scale is not None and not _is_power_of_two(self.loss_scale):
            raise SpecError(f"loss scale {self.loss_scale!r} must be a positive power of two (e.g. 1024)")
        if self.loss_scale is not None and self.dynamic_scale is not None:
            raise SpecError("a policy has one loss scale: a static ls=<power of two> or ls=dynamic, not both")
        self._check_rounding()
        if self.update_math is not None:
            least = wider(self.weights, self.state)
            if _width(self.update_math) < _width(least):
                raise SpecError(f"update math format {self.update_math.name} is narrower than "
                                f"{least.name} = wider(weights {self.weights.name}, state {self.state.name})")

    def _check_rounding(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise choice_error("rounding", self.rounding, ROUNDINGS)
        if isinstance(self.sr_stream, bool) or not isinstance(self.sr_stream, int) or not \
                0 <= self.sr_stream <= MAX_SR_STREAM:
            raise SpecError(f"stochastic rounding stream {self.sr_stream!r} must be an integer in 0..{MAX_SR_STREAM}")
        if self.sr_stream and not self.stochastic:
            raise SpecError(f"a stochastic rounding stream needs r=sr or r=sr-state, not r={self.rounding}")
        if self.stochastic and self.update == self.weights:
            raise SpecError(f"r={self.rounding} needs an update format wider than the weights ({self.weights.name}): "
                            f"the update is already rounded to {self.weights.name} op by op, so there is nothing "
                            f"left to round stochastically; add u=fp32 (torch-style opmath)")
        if self.rounding == "sr-state" and not self.stores_state_once:
            raise SpecError(f"r=sr-state needs a state format ({self.state.name}) narrower than the update math "
                            f"stated with u= (e.g. p=bf16,s=bf16,u=fp32): only then is each moment rounded once, "
                            f"when stored")

    @property
    def stochastic(self) -> bool:
        """True when the new weights are rounded stochastically (``r=sr``, ``r=sr-state``)."""
        return self.rounding in ("sr", "sr-state")

    @property
    def kahan(self) -> bool:
        """True when a compensation buffer carries the weights' rounding errors (``r=kahan``)."""
        return self.rounding == "kahan"

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
        if self.dynamic_scale is not None:
            parts.append(f"ls={self.dynamic_scale}")
        if self.rounding != "nearest":
            parts.append(f"r={self.rounding}" + (f"(stream={self.sr_stream})" if self.sr_stream else ""))
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


def _preset(p, c, a, s, m=None, ls=None, u=None, r="nearest") -> Policy:
    dynamic = DynamicScale() if ls == "dynamic" else None
    return Policy(get_format(p), get_format(c), get_format(a), get_format(s), get_format(m) if m else None,
                  None if dynamic else ls, get_format(u) if u else None, dynamic, r)


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
    # The remedies for bf16 weights without an fp32 master copy (docs/remedies.md): torch-bf16 with the new weights
    # rounded stochastically (torchao's bf16 AdamW option, Gupta et al. 2015), or with a bf16 Kahan compensation
    # buffer (optimi, Zamirai et al. 2020).
    "bf16-sr": _preset("bf16", "bf16", "fp32", "bf16", u="fp32", r="sr"),
    "bf16-kahan": _preset("bf16", "bf16", "fp32", "bf16", u="fp32", r="kahan"),
    # torch.autocast(float16) + torch.amp.GradScaler(): fp16 math, fp32 master weights and state, dynamic loss
    # scaling with GradScaler's defaults. (Autocast keeps softmax/exp in fp32; here every op of C rounds to fp16.)
    "torch-amp-fp16": _preset("fp16", "fp16", "fp32", "fp32", m="fp32", ls="dynamic"),
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
        if key not in _VALID_KEYS:
            raise SpecError(f"unknown policy key {key!r} in {text!r}; valid keys: {', '.join(_VALID_KEYS)}")
        field = "rounding" if key == "r" else _KEY_TO_FIELD[key]
        if field in values:
            raise SpecError(f"policy key {key!r} given twice in {text!r}")
        if field == "rounding":
            values["rounding"], values["sr_stream"] = _parse_rounding(raw, text)
        elif field == "loss_scale" and raw.startswith("dynamic"):
            values["dynamic_scale"] = _parse_dynamic(raw, text)
            values["loss_scale"] = None
        elif field == "loss_scale":
            try:
                values[field] = float(raw)
            except ValueError:
                raise SpecError(f"loss scale {raw!r} in {text!r} is not a number") from None
        else:
            values[field] = get_format(raw)
    if "params" not in values:
        raise SpecError(f"policy {text!r} has no params format (p=...)")
    params = values["params"]
    if values.get("loss_scale", 0) is None:
        del values["loss_scale"]
    compute = values.setdefault("compute", params)
    values.setdefault("state", params)
    values.setdefault("accum", wider(compute, get_format("fp32")))
    return Policy(**values)


def _arguments(raw: str, name: str, text: str) -> dict[str, str]:
    """``name`` or ``name(k=v,...)`` -> {k: v}; SpecError naming the malformed part."""
    if raw == name:
        return {}
    if not (raw.startswith(name + "(") and raw.endswith(")")):
        raise SpecError(f"malformed value {raw!r} in {text!r}; expected {name} or {name}(key=value,...)")
    args = {}
    for item in raw[len(name) + 1:-1].split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise SpecError(f"malformed setting {item!r} of {raw!r} in {text!r}; expected key=value")
        if key in args:
            raise SpecError(f"setting {key!r} given twice in {raw!r}")
        args[key] = value
    return args


def _parse_rounding(raw: str, text: str) -> tuple[str, int]:
    name = raw.partition("(")[0].strip()
    if name not in ROUNDINGS:
        raise choice_error("rounding (r=)", raw, ROUNDINGS)
    args = _arguments(raw, name, text)
    unknown = set(args) - {"stream"}
    if unknown or (args and name not in ("sr", "sr-state")):
        raise SpecError(f"r={raw!r} in {text!r}: only r=sr and r=sr-state take a setting, stream=N")
    try:
        return name, int(args.get("stream", 0))
    except ValueError:
        raise SpecError(f"stochastic rounding stream {args['stream']!r} in {text!r} is not an integer") from None


def _parse_dynamic(raw: str, text: str) -> DynamicScale:
    args = _arguments(raw, "dynamic", text)
    fields = {f.name: f for f in dataclasses.fields(DynamicScale)}
    kwargs: dict[str, object] = {}
    for key, value in args.items():
        if key not in fields:
            raise SpecError(f"unknown dynamic loss scale setting {key!r} in {text!r}; valid settings: "
                            f"{', '.join(fields)}")
        try:
            if key == "skip":
                if value not in ("yes", "no"):
                    raise ValueError
                kwargs[key] = value == "yes"
            elif key == "interval":
                kwargs[key] = int(value)
            else:
                kwargs[key] = float(value)
        except ValueError:
            kind = "yes or no" if key == "skip" else "an integer" if key == "interval" else "a number"
            raise SpecError(f"dynamic loss scale setting {key}={value!r} in {text!r} must be {kind}") from None
    return DynamicScale(**kwargs)


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
