"""Ablation of a mixed-precision policy: which field of the recipe carries the bits (docs/ablation.md).

Two one-field-at-a-time walks between a policy and its reference (every format field at the reference format):

* **raise**: start from POLICY and set ONE field to the reference's value; the row's ``delta_bits`` is its bits of
  agreement minus POLICY's (what widening that field alone buys back);
* **lower**: start from the reference and set ONE field to POLICY's value; ``delta_bits`` is its bits minus the
  reference's (what narrowing that field alone costs; <= 0 in practice, not a theorem).

The reference has POLICY's *shape*: every format field (params, compute, accum, state, and master when POLICY has
one) in the reference format, no loss scale. With an fp64 master the reference computes exactly what plain fp64
does (every conversion is fp64 -> fp64, the identity), so all its rows are measured against the same float64 run.

Rules for fields that have no counterpart (stated once here, tested in tests/test_ablate.py):

* master weights: raising ``master`` when POLICY has none *adds* a master copy in the reference format (the
  optimizer then updates reference-format weights and the params are a rounding of them) -- unless POLICY's params
  already are in the reference format, where a copy would change nothing. There is no lower row for a missing
  master (the reference has none either).
* loss scale: raising it removes it (the reference has none); lowering it adds POLICY's scale to the reference.
* a field whose value is the same in POLICY and in the reference has no row: it is listed in ``unchanged``.
* a one-field change that :class:`precision.policy.Policy` refuses (e.g. compute fp64 over an fp32 accumulator:
  the accumulator must be at least as wide as compute) is kept as an :class:`Ablation` with ``policy=None`` and
  the refusal as ``reason``; it is listed, never dropped and never raised.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

from ._terminal import clip, safe_text
from .errors import SpecError, choice_error
from .formats import Format, get_format, wider
from .policy import Policy, get_policy

__all__ = ["FIELDS", "REFERENCES", "Ablation", "AblationPlan", "AblationRow", "AblationTable", "reference_policy",
           "ablation_policies", "unchanged_fields", "plan_ablation", "tabulate", "ablate", "format_ablation"]

# Policy's fields, in its grammar order, and their keys in the policy grammar (precision/policy.py)
FIELDS = ("params", "compute", "accum", "state", "master", "loss_scale", "update_math", "dynamic_scale", "rounding")
_KEYS = ("p", "c", "a", "s", "m", "ls", "u", "ls", "r")
# Fields that are rows only for a policy that states them (the reference never does: it computes in its format,
# with no loss scale and round-to-nearest)
_OPTIONAL = {"update_math": None, "dynamic_scale": None, "rounding": "nearest"}
REFERENCES = ("fp64", "fp32")  # formats a whole policy can live in (the accumulator must be fp32 or fp64)
MESSAGE_CHARS = 70  # of an error or refusal in the text table (the report keeps messages whole)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """One field changed: ``start`` (POLICY for "raise", the reference for "lower") with ``field`` set from
    ``before`` to ``after`` (format names, a loss scale, or "none"). ``policy`` is the result, or None when Policy
    refuses the combination; ``reason`` then says why."""

    direction: str  # "raise" or "lower"
    field: str  # one of FIELDS
    before: str
    after: str
    start: Policy
    policy: Policy | None
    reason: str = ""

    @property
    def valid(self) -> bool:
        return self.policy is not None

    @property
    def change(self) -> str:
        return f"{self.before} -> {self.after}"

    @property
    def text(self) -> str:
        """The changed policy in the grammar (``Policy.name``: a preset's name when it is one), also when refused."""
        if self.policy is not None:
            return self.policy.name
        parts = []
        for key, field in zip(_KEYS, FIELDS):
            value = _value_text(getattr(self.start, field)) if field != self.field else self.after
            if value not in ("none", "nearest"):
                parts.append(f"{key}={value}")
        return ",".join(parts)


def _value_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, Format):
        return value.name
    if not isinstance(value, (int, float)):
        return str(value)  # a rounding mode, a dynamic loss scale
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _reference_format(reference: str | Format) -> Format:
    try:
        fmt = get_format(reference)
    except SpecError:
        raise choice_error("reference format", reference, REFERENCES) from None
    if fmt.name not in REFERENCES:
        raise choice_error("reference format", reference, REFERENCES)
    return fmt


def reference_policy(policy: str | Policy, reference: str | Format = "fp64") -> Policy:
    """POLICY's shape at the reference format: params, compute, accum and state in it, a master copy in it when
    POLICY has one, no loss scale. A reference narrower than one of POLICY's formats is refused (SpecError)."""
    pol, ref = get_policy(policy), _reference_format(reference)
    for field in FIELDS[:5]:
        fmt = getattr(pol, field)
        if fmt is not None and fmt != ref and wider(fmt, ref) is fmt:
            raise SpecError(f"reference format {ref.name} is narrower than {field} {fmt.name} of policy {pol.name}; "
                            f"valid reference formats for it: "
                            f"{', '.join(r for r in REFERENCES if wider(get_format(r), fmt) is get_format(r))}")
    return Policy(ref, ref, ref, ref, ref if pol.master is not None else None, None)


def _change(direction: str, field: str, start: Policy, value) -> Ablation:
    before, after = _value_text(getattr(start, field)), _value_text(value)
    changes = {field: value}
    if field == "rounding":  # the stream goes with stochastic rounding
        changes["sr_stream"] = start.sr_stream if value in ("sr", "sr-state") else 0
    try:
        return Ablation(direction, field, before, after, start, dataclasses.replace(start, **changes))
    except SpecError as exc:  # Policy's own rules (accumulator width, loss scale): listed with the reason
        return Ablation(direction, field, before, after, start, None, str(exc))


def ablation_policies(policy: str | Policy, reference: str | Format = "fp64") -> list[Ablation]:
    """Every one-field change: the "raise" rows (POLICY with one field at the reference's value), in FIELDS order,
    then the "lower" rows (the reference with one field at POLICY's value). Fields equal in both have no row
    (:func:`unchanged_fields`); refused combinations are rows with ``policy=None`` and a ``reason``."""
    pol = get_policy(policy)
    ref = reference_policy(pol, reference)
    ref_format = ref.params
    # The update math is a field only of policies that state it (u=): the reference computes in its format anyway,
    # so raising u sets it to that format, and lowering it states POLICY's u in the reference. A dynamic loss scale
    # and a rounding mode are rows of the policies that have them: raising removes them, lowering adds them to the
    # reference (which Policy may refuse: stochastic rounding needs u= wider than the weights).
    fields = _stated_fields(pol)
    out = []
    for field in fields:
        target = getattr(ref, field)
        if field == "master" and pol.master is None and pol.params != ref_format:
            target = ref_format  # add a master copy in the reference format
        if field == "update_math":
            target = ref_format
        if getattr(pol, field) != target:
            out.append(_change("raise", field, pol, target))
    for field in fields:
        value = getattr(pol, field)
        if getattr(ref, field) != value:
            out.append(_change("lower", field, ref, value))
    return out


def unchanged_fields(policy: str | Policy, reference: str | Format = "fp64") -> list[str]:
    """The fields that have no ablation row in either direction (the same value in POLICY and the reference)."""
    changed = {a.field for a in ablation_policies(policy, reference)}
    return [f for f in _stated_fields(get_policy(policy)) if f not in changed]


def _stated_fields(pol: Policy) -> list[str]:
    return [f for f in FIELDS if f not in _OPTIONAL or getattr(pol, f) != _OPTIONAL[f]]


# ---- running an ablation ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Group:
    """One case (problem, data, optimizer, backend, device): the spec of the base, the reference and each valid
    ablation (None for a refused one), in the order of ``AblationPlan.ablations``."""
    problem: str
    data: str
    optimizer: str
    backend: str
    device: str
    base: object  # RunSpec
    reference: object  # RunSpec
    ablated: tuple  # RunSpec | None per ablation


@dataclasses.dataclass(frozen=True)
class AblationPlan:
    """What :func:`ablate` runs: the policies, one group of specs per case, and the distinct specs (a policy that
    two rows reach, e.g. a raise row that is the reference itself, runs once)."""
    policy: Policy
    reference: Policy
    ablations: tuple[Ablation, ...]
    unchanged: tuple[str, ...]
    groups: tuple[_Group, ...]
    specs: tuple  # RunSpec, distinct ids, in row order


def _names(value) -> list[str] | None:
    if value is None:
        return None
    from .matrix import split_list
    return split_list(value)  # a name, comma-separated names, or a list of names


def plan_ablation(policy: str | Policy, problem=None, data=None, optimizer="adam", backend="numpy", steps: int = 200,
                  seed: int = 0, batch_size: int | None = 128, lr: float | None = None, *,
                  reference: str | Format = "fp64", device: str = "cpu", record_every: int = 20) -> AblationPlan:
    """The specs of an ablation, built and name-checked but not run (the grid checks are
    ``precision.runner.validate(plan.specs)``, which :func:`ablate` calls). ``problem``, ``data``, ``optimizer``
    and ``backend`` take a name, comma-separated names or a list of names; each combination is one group of rows.
    Without ``problem`` and ``data``, the suite's default cases run (logreg on breast_cancer, mlp on digits); with
    one of them, the other defaults as in ``precision run`` (logreg, synthetic)."""
    from .matrix import DEFAULT_CASES, build_specs

    pol = get_policy(policy)
    ref = reference_policy(pol, reference)
    ablations = tuple(ablation_policies(pol, reference))
    problems, datas = _names(problem), _names(data)
    if problems is None and datas is None:
        cases = list(DEFAULT_CASES)
    else:
        cases = list(itertools.product(problems or ["logreg"], datas or ["synthetic"]))
    optimizers, backends = _names(optimizer) or ["adam"], _names(backend) or ["numpy"]
    policies = [pol, ref] + [a.policy for a in ablations if a.valid]
    groups, specs = [], {}
    for (prob, dat), opt, back in itertools.product(cases, optimizers, backends):
        built = build_specs([prob], [opt], policies, backends=[back], devices=[device], data=[dat], seeds=[seed],
                            steps=steps, batch_size=batch_size, lr=lr, record_every=record_every)
        base, ref_spec, rest = built[0], built[1], iter(built[2:])
        ablated = tuple(next(rest) if a.valid else None for a in ablations)
        for spec in (base, ref_spec, *ablated):
            if spec is not None:
                specs.setdefault(spec.id, spec)
        groups.append(_Group(base.problem, base.data, base.optimizer.name, back, device, base, ref_spec, ablated))
    return AblationPlan(pol, ref, ablations, tuple(unchanged_fields(pol, reference)), tuple(groups),
                        tuple(specs.values()))


@dataclasses.dataclass(frozen=True)
class AblationRow:
    """One row of the table. ``direction`` is "base" (POLICY), "reference", "raise" or "lower"; ``delta_bits`` is
    ``bits`` minus POLICY's bits for a raise row, minus the reference's bits for a lower row (None for the base and
    reference rows and where either side has no bits); ``same`` says whether the final params are bit-identical
    (same fingerprint) to those of the row's start. ``status`` is the run's ("ok", "diverged", "error",
    "unavailable") or "invalid" for a combination Policy refuses (``message`` says why)."""
    problem: str
    data: str
    optimizer: str
    backend: str
    device: str
    direction: str
    field: str | None
    change: str
    policy: str
    spec_id: str | None
    status: str
    message: str = ""
    bits: float | None = None
    delta_bits: float | None = None
    flip_rate: float | None = None
    loss_gap: float | None = None
    final_loss: float | None = None
    diverged_at: int | None = None
    fingerprint: str | None = None
    same: bool | None = None  # final params bit-identical to the start's (POLICY or reference): the change did nothing

    @property
    def case(self) -> tuple[str, str, str, str, str]:
        return (self.problem, self.data, self.optimizer, self.backend, self.device)


@dataclasses.dataclass(frozen=True)
class AblationTable:
    """The rows of every group (base, reference, raise rows, lower rows), the ablations, and the Report of the
    underlying runs (one result per distinct spec: ``report.save(path)`` writes a normal precision report)."""
    policy: Policy
    reference: Policy
    ablations: tuple[Ablation, ...]
    unchanged: tuple[str, ...]
    rows: tuple[AblationRow, ...]
    report: object  # precision.report.Report

    def group(self, problem: str, data: str, optimizer: str = "adam", backend: str = "numpy",
              device: str = "cpu") -> list[AblationRow]:
        return [r for r in self.rows if r.case == (problem, data, optimizer, backend, device)]


def _delta(bits, start_bits):
    return None if bits is None or start_bits is None else bits - start_bits


def tabulate(plan: AblationPlan, report) -> AblationTable:
    """The table of ``plan`` from the report of its specs (results matched by spec id)."""
    results = report.by_id()
    rows = []
    for g in plan.groups:
        def row(direction, field, change, policy, spec, start=None, message=""):
            r = results.get(spec.id) if spec is not None else None
            if r is None:
                return AblationRow(g.problem, g.data, g.optimizer, g.backend, g.device, direction, field, change,
                                   policy, None if spec is None else spec.id, "invalid" if spec is None else "missing",
                                   message)
            return AblationRow(g.problem, g.data, g.optimizer, g.backend, g.device, direction, field, change, policy,
                               r.id, r.status, r.message, r.bits_of_agreement,
                               _delta(r.bits_of_agreement, start and start.bits), r.flip_rate, r.loss_gap,
                               r.final_loss, r.diverged_at, r.fingerprint,
                               None if start is None or not (r.fingerprint and start.fingerprint)
                               else r.fingerprint == start.fingerprint)

        base = row("base", None, "", plan.policy.name, g.base)
        reference = row("reference", None, "", plan.reference.name, g.reference)
        rows += [base, reference]
        for ablation, spec in zip(plan.ablations, g.ablated):
            start = base if ablation.direction == "raise" else reference
            rows.append(row(ablation.direction, ablation.field, ablation.change, ablation.text, spec, start,
                            ablation.reason))
    return AblationTable(plan.policy, plan.reference, plan.ablations, plan.unchanged, tuple(rows), report)


def ablate(policy: str | Policy, problem=None, data=None, optimizer="adam", backend="numpy", steps: int = 200,
           seed: int = 0, batch_size: int | None = 128, lr: float | None = None, *,
           reference: str | Format = "fp64", device: str = "cpu", record_every: int = 20, force: bool = False,
           progress: Callable | None = None, on_result: Callable | None = None) -> AblationTable:
    """Run POLICY, its reference and every valid one-field ablation on each case (:func:`plan_ablation`) with
    :func:`precision.runner.run`, and return the table. Every spec and the grid are checked before anything runs
    (one SpecError); after that a failing run is a row with status "error" and never loses the others, and a
    diverged run is a result. ``progress`` and ``on_result`` are passed to ``run``."""
    from .runner import run
    plan = plan_ablation(policy, problem, data, optimizer, backend, steps, seed, batch_size, lr,
                         reference=reference, device=device, record_every=record_every)
    report = run(plan.specs, progress=progress, on_result=on_result, force=force)
    return tabulate(plan, report)


# ---- the table as text --------------------------------------------------------------------------------------------

_HEADERS = ("row", "field", "change", "policy", "bits", "delta", "same", "flips", "loss_gap", "status")


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _status_text(r: AblationRow, width: int | None) -> str:
    status = f"diverged at {r.diverged_at}" if r.status == "diverged" and r.diverged_at is not None else r.status
    if not r.message:
        return status
    text = safe_text(r.message)
    return f"{status}: {clip(text, width) if width else text}"


def _cells(r: AblationRow, width: int | None) -> tuple[str, ...]:
    return (r.direction, r.field or "-", r.change or "-", safe_text(r.policy), _num(r.bits, ".1f"),
            _num(r.delta_bits, "+.1f"), "-" if r.same is None else ("yes" if r.same else "no"),
            _num(r.flip_rate, ".3f"), _num(r.loss_gap, ".2e"), _status_text(r, width))


def _groups(table: AblationTable) -> dict[tuple, list[AblationRow]]:
    groups: dict[tuple, list[AblationRow]] = {}
    for r in table.rows:
        groups.setdefault(r.case, []).append(r)
    return groups


def _preamble(table: AblationTable) -> list[str]:
    pol, ref = table.policy, table.reference
    lines = [f"policy {safe_text(pol.name)} ({pol}) against the reference {ref}"]
    if table.ablations:
        lines += ["raise: one field of the policy set to the reference's value; delta = bits - the policy's bits",
                  "lower: one field of the reference set to the policy's value; delta = bits - the reference's bits",
                  "same: final params bit-identical to those of the row's start (the policy, or the reference)"]
    else:
        lines.append("no field to ablate: the policy equals the reference in every field")
    if table.unchanged:
        lines.append(f"no row (the same in both): {', '.join(table.unchanged)}")
    return lines


def format_ablation(table: AblationTable, markdown: bool = False) -> str:
    """The table as plain text (one block per case) or, with ``markdown``, as GitHub tables. Report text (messages)
    is escaped (precision/_terminal.py); messages are cut to MESSAGE_CHARS in the text form."""
    out = [f"- {line}" for line in _preamble(table)] if markdown else _preamble(table)
    for (problem, data, optimizer, backend, device), rows in _groups(table).items():
        title = safe_text(f"{problem}:{data}  {optimizer}  {backend}-{device}")
        if markdown:
            out += ["", f"**{title}**", "", "| " + " | ".join(_HEADERS) + " |",
                    "|" + "|".join(" --- " if i < 4 or i in (6, 9) else " ---: " for i in range(len(_HEADERS))) + "|"]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, None)) + " |" for r in rows]
            continue
        cells = [_cells(r, MESSAGE_CHARS) for r in rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]
        numeric = {4, 5, 7, 8}
        fmt = lambda row: "  ".join(c.rjust(w) if i in numeric else c.ljust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        out += ["", title, fmt(_HEADERS), "  ".join("-" * w for w in widths)] + [fmt(c) for c in cells]
    return "\n".join(out)
