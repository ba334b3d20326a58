"""What users would run instead: torch.optim and optax, timed on the same work as precision's own cases.

Two kinds of peer figures, each optional (a peer that is not importable is reported absent, with the reason):

* **Kernel peers** (:data:`KERNEL_PEERS`): one in-place Adam / AdamW step over N parameters, the same inputs, step
  number (``KERNEL_STEP``), lr, betas and eps (``KERNEL_ADAM_EPS``) as :func:`precision.kernels.inplace_case`,
  which builds them (``reset`` restores the inputs outside the timed region):

  - ``torch-adam-fused`` / ``torch-adamw-fused``: ``torch.optim.Adam(fused=True)`` / ``AdamW(fused=True)``;
  - ``torch-adam-foreach`` / ``torch-adamw-foreach``: the same with ``foreach=True`` (multi-tensor kernels);
  - ``optax-adam``: ``optax.adam`` under ``jax.jit`` with params and optimizer state donated (written in place).

  torch runs single-threaded (``torch.set_num_threads(1)``), like precision's kernels. Formats: ``fp32``; and bf16
  storage where the peer keeps it: torch with bf16 params computes in fp32 ("opmath") and rounds p, m, v to bf16
  once each, precision's ``torch-bf16`` format; optax on bf16 params keeps bf16 moments and computes in bf16
  (XLA may keep intermediates wider: ``xla_allow_excess_precision``), listed as ``bf16``. AdamW uses torch's
  default weight decay 0.01 (one more multiply per element).

* **Loop peers** (:data:`LOOP_PEERS`): a whole training step on logreg:breast_cancer and mlp:digits (one hidden
  tanh layer of 32), fp32, Adam, the same data, initial params and minibatch schedule (batch 128) as the
  precision run of that case: ``torch`` (autograd + fused Adam, 1 thread) and ``optax`` (``jax.value_and_grad`` +
  ``optax.adam``, the whole ``CASE_STEPS``-step loop in one jitted ``lax.scan``, as precision's JAX backend runs
  its chunks). Their figure is seconds per step of a ``CASE_STEPS``-step call.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

__all__ = ["KERNEL_PEERS", "LOOP_PEERS", "peer_skip_reason", "peer_inplace_step", "loop_peer_skip_reason",
           "loop_peer", "peer_available"]

KERNEL_PEERS = ("torch-adam-fused", "torch-adam-foreach", "torch-adamw-fused", "torch-adamw-foreach", "optax-adam")
LOOP_PEERS = ("torch", "optax")
TORCH_WEIGHT_DECAY_ADAMW = 0.01


def _module_of(peer: str) -> str:
    return "torch" if peer.startswith("torch") else "optax"


def peer_available(module: str) -> str | None:
    """None when ``module`` (torch, optax) imports, else why not (one line)."""
    try:
        if module == "optax":
            import jax  # noqa: F401
            import optax  # noqa: F401
        else:
            import torch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken installation
        return f"{module} is not importable ({type(exc).__name__}: {exc})"
    return None


def peer_skip_reason(peer: str, storage: str) -> str | None:
    if peer not in KERNEL_PEERS:
        from .errors import choice_error
        raise choice_error("kernel peer", peer, KERNEL_PEERS)
    if peer.startswith("torch") and storage == "bf16":
        return "torch.optim on bf16 params computes in fp32: timed as the torch-bf16 format, not as pure bf16"
    if peer.startswith("torch") and storage == "fp16":
        return "torch.optim on fp16 params computes in fp32, not a pure-fp16 update: not timed"
    if peer == "optax-adam" and storage not in ("fp32", "bf16"):
        return "optax is timed on fp32 and bf16 params only"
    return peer_available(_module_of(peer))


def _torch_from(a: np.ndarray):
    import torch
    if a.dtype.itemsize == 2 and a.dtype != np.float16:  # ml_dtypes bfloat16: through its bits
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _numpy_from(t, like: np.ndarray) -> np.ndarray:
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(like.dtype)
    return t.numpy().copy()


def peer_inplace_step(peer: str, storage: str, opt, pristine) -> tuple[Callable, Callable, Callable]:
    """(reset, step, outputs) of a kernel peer on the pristine (p, g, m, v)."""
    from .kernels import KERNEL_STEP
    if peer.startswith("torch"):
        return _torch_step(peer, opt, pristine, KERNEL_STEP)
    return _optax_step(opt, pristine, KERNEL_STEP)


def _torch_step(peer, opt, pristine, step_no):
    import torch

    torch.set_num_threads(1)
    p0, g0, m0, v0 = (_torch_from(a) for a in pristine)
    param = torch.nn.Parameter(p0.clone())
    param.grad = g0.clone()
    kind = {"fused": dict(fused=True), "foreach": dict(foreach=True)}[peer.rsplit("-", 1)[1]]
    common = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, **kind)
    if "adamw" in peer:
        optimizer = torch.optim.AdamW([param], weight_decay=TORCH_WEIGHT_DECAY_ADAMW, **common)
    else:
        optimizer = torch.optim.Adam([param], **common)
    optimizer.step()  # creates the state tensors (step, exp_avg, exp_avg_sq); reset overwrites them
    state = optimizer.state[param]

    def reset():
        with torch.no_grad():
            param.copy_(p0)
            param.grad.copy_(g0)
            state["exp_avg"].copy_(m0)
            state["exp_avg_sq"].copy_(v0)
            state["step"].fill_(step_no - 1)  # the step makes it step_no: the same bias corrections

    def step():
        optimizer.step()

    def outputs():
        return tuple(_numpy_from(t.detach(), pristine[0]) for t in (param, state["exp_avg"], state["exp_avg_sq"]))
    reset()
    return reset, step, outputs


def _optax_step(opt, pristine, step_no):
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.adam(opt.lr, b1=opt.betas[0], b2=opt.betas[1], eps=opt.eps)

    def fn(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(fn, donate_argnums=(0, 2))
    box = {}

    def reset():
        p, g, m, v = (jax.device_put(np.array(a)) for a in pristine)
        state = tx.init(p)
        adam_state = state[0]._replace(count=jnp.asarray(step_no - 1, dtype=adam_state_count_dtype(state)),
                                       mu=m, nu=v)
        box["args"] = (p, g, (adam_state,) + tuple(state[1:]))
        jax.block_until_ready(box["args"])

    def step():
        p, g, state = box["args"]
        p, state = jax.block_until_ready(compiled(p, g, state))
        box["args"] = (p, g, state)

    def outputs():
        p, _, state = box["args"]
        return tuple(np.asarray(a) for a in (p, state[0].mu, state[0].nu))
    reset()
    return reset, step, outputs


def adam_state_count_dtype(state):
    return state[0].count.dtype


# --- whole training loops ----------------------------------------------------------------------------------------

def loop_peer_skip_reason(peer: str) -> str | None:
    if peer not in LOOP_PEERS:
        from .errors import choice_error
        raise choice_error("loop peer", peer, LOOP_PEERS)
    return peer_available(peer)


def _loop_inputs(problem: str):
    """(dataset, batch rows (steps, batch), targets) of the fp32 Adam benchmark case of ``problem``."""
    from .benchcases import CASE_STEPS, frozen_dataset, get_case

    spec = get_case(problem, "adam", "fp32", "numpy").spec()
    dataset = frozen_dataset(spec)
    rows = np.asarray(dataset.batches[0:CASE_STEPS], dtype=np.int64)
    return spec, dataset, rows


def loop_peer(peer: str, problem: str) -> tuple[Callable[[], np.ndarray], int]:
    """(run, steps): ``run()`` returns the final flat params (float64) after training ``steps`` steps of
    ``problem`` (a CASE_PROBLEMS name) with ``peer`` from the
    case's initial params (fp32, Adam, the case's batches); compiled / warmed once here."""
    reason = loop_peer_skip_reason(peer)
    if reason is not None:
        from .errors import UnavailableError
        raise UnavailableError(f"loop peer {peer}: {reason}")
    spec, dataset, rows = _loop_inputs(problem)
    run = (_torch_loop if peer == "torch" else _optax_loop)(spec, dataset, rows)
    run()  # warm-up: compilation, allocator, first touch
    return run, rows.shape[0]


def _blocks(dataset):
    from .problems import unflatten
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in unflatten(dataset.init_params,
                                                                                dataset.layout).items()}


def _torch_loop(spec, dataset, rows):
    import torch

    torch.set_num_threads(1)
    X = torch.from_numpy(np.array(dataset.X_train, dtype=np.float32))
    binary = spec.problem == "logreg"
    y = torch.from_numpy(np.array(dataset.y_train, dtype=np.float32 if binary else np.int64))
    init = {k: torch.from_numpy(v) for k, v in _blocks(dataset).items()}
    batches = torch.from_numpy(np.array(rows))
    opt = spec.optimizer

    def run():
        params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        optimizer = torch.optim.Adam(list(params.values()), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                     fused=True)
        for idx in batches:
            xb, yb = X[idx], y[idx]
            if binary:
                z = xb @ params["w"] + params["b"]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yb)
            else:
                h = torch.tanh(xb @ params["W1"] + params["b1"])
                loss = torch.nn.functional.cross_entropy(h @ params["W2"] + params["b2"], yb)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
        return _flat({k: v.detach().numpy() for k, v in params.items()}, dataset.layout)
    return run


def _optax_loop(spec, dataset, rows):
    import jax
    import jax.numpy as jnp
    import optax

    X = jnp.asarray(np.asarray(dataset.X_train, dtype=np.float32))
    binary = spec.problem == "logreg"
    y = jnp.asarray(np.asarray(dataset.y_train, dtype=np.float32 if binary else np.int32))
    init = {k: jnp.asarray(v) for k, v in _blocks(dataset).items()}
    batches = jnp.asarray(rows.astype(np.int32))
    opt = spec.optimizer
    tx = optax.adam(opt.lr, b1=opt.betas[0], b2=opt.betas[1], eps=opt.eps)

    def loss_fn(params, xb, yb):
        if binary:
            return optax.sigmoid_binary_cross_entropy(xb @ params["w"] + params["b"], yb).mean()
        h = jnp.tanh(xb @ params["W1"] + params["b1"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ params["W2"] + params["b2"], yb).mean()

    def body(carry, idx):
        params, state = carry
        grads = jax.grad(loss_fn)(params, X[idx], y[idx])
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    @jax.jit
    def train(params):
        (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), batches)
        return params

    def run():
        final = jax.block_until_ready(train(init))
        return _flat({k: np.asarray(v) for k, v in final.items()}, dataset.layout)
    return run


def _flat(blocks: dict, layout) -> np.ndarray:
    """The flat float64 params vector of precision's layout (to compare a peer's model with precision's)."""
    return np.concatenate([np.asarray(blocks[name], dtype=np.float64).reshape(-1) for name, _ in layout])


def time_loop(run: Callable[[], None], steps: int, repeats: int) -> float:
    """Seconds per step: the fastest of ``repeats`` calls of ``run`` (``steps`` steps each)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best / steps
