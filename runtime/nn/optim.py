"""Optimizers, written with the ops API so the update is part of the traced training step.

Every update ends in ``assign`` (dense) or ``scatter_add_rows`` (sparse) on the parameter and
its state, so in GRAPH_MODE it is a set of side-effect nodes in the one step graph, and in
PYNATIVE_MODE the same code runs eagerly and updates the storage in place.

Sparse-aware optimizers (LazyAdam, FTRL) receive a ``SparseGrad(indices, values)`` for an
embedding table whose gradient comes straight from a ``gather`` and touch only those rows.
"""
from __future__ import annotations

import numpy as np

from runtime import core
from runtime.core import SparseGrad, Tensor, bind  # noqa: F401  (SparseGrad re-exported)
from runtime.nn.embedding import lookup_of
from runtime.nn.parameter import Parameter
from runtime.ops import api as F


def _default_decay_filter(p: Parameter) -> bool:
    return "beta" not in p.name and "gamma" not in p.name and "bias" not in p.name


class Optimizer:
    sparse = False  # True: wants SparseGrad for tables fed by a gather

    def __init__(self, params, learning_rate=0.1, weight_decay=0.0, loss_scale=1.0,
                 decay_filter=_default_decay_filter):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"{type(self).__name__}: expects Parameters, got {type(p).__name__}")
        self.parameters = params
        self.weight_decay = float(weight_decay)
        self.decay_flags = [decay_filter(p) for p in params]
        self.loss_scale = float(loss_scale)
        self._schedule = None
        if callable(learning_rate) or isinstance(learning_rate, (list, tuple, np.ndarray)):
            self._schedule = learning_rate
            lr0 = self._lr_at(0)
        else:
            lr0 = float(learning_rate)
        self.learning_rate = Parameter(np.asarray(lr0, np.float32), name="learning_rate", requires_grad=False)
        self.global_step = 0
        self._state: list[Parameter] = [self.learning_rate]
        self.target: str | None = None  # "CPU": run the update on the host (MindSpore's optimizer.target)

    # -- learning-rate schedule -----------------------------------------------------------------
    def _lr_at(self, step: int) -> float:
        s = self._schedule
        if callable(s):
            return float(s(step))
        return float(s[min(step, len(s) - 1)])

    def step_begin(self, step: int) -> None:
        """Called by Model before each step: updates the learning rate of a schedule."""
        self.global_step = step
        if self._schedule is not None:
            self.learning_rate.set_data(np.asarray(self._lr_at(step), np.float32))

    def get_lr(self) -> float:
        return float(self.learning_rate.data)

    # -- state ----------------------------------------------------------------------------------
    def _slot(self, p: Parameter, kind: str, init=0.0) -> Parameter:
        # zeros first (lazily mapped pages), filled in place: a slot of a huge table never exists twice
        s = Parameter(np.zeros(p.shape, dtype=p.dtype), name=f"{kind}.{p.name}", requires_grad=False)
        if init:
            s.data.fill(init)
        s.owner = p
        self._state.append(s)
        return s

    def _scalar(self, name: str, value: float) -> Parameter:
        s = Parameter(np.asarray(value, np.float32), name=name, requires_grad=False)
        self._state.append(s)
        return s

    def state_parameters(self) -> list[Parameter]:
        return list(self._state)

    # -- update -----------------------------------------------------------------------------------
    def _dense(self, g, p, decay: bool):
        if isinstance(g, SparseGrad):
            g = g.to_dense()
        if self.loss_scale != 1.0:
            g = F.div(g, self.loss_scale)
        if decay and self.weight_decay:
            g = F.add(g, F.mul(p, self.weight_decay))
        return g

    def __call__(self, grads):
        if len(grads) != len(self.parameters):
            raise ValueError(f"{type(self).__name__}: got {len(grads)} gradients for {len(self.parameters)} "
                             f"parameters")
        for p, g in zip(self.parameters, grads):
            gshape = g.dense_shape if isinstance(g, SparseGrad) else tuple(g.shape)
            if tuple(gshape) != p.shape:
                raise ValueError(f"{type(self).__name__}: gradient of shape {gshape} for parameter "
                                 f"{p.name!r} of shape {p.shape}")
        self.apply(grads)

    def apply(self, grads):
        raise NotImplementedError


class SGD(Optimizer):
    """SGD with optional momentum (dampening, nesterov) and L2 weight decay (PyTorch semantics)."""

    def __init__(self, params, learning_rate=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, loss_scale=1.0):
        super().__init__(params, learning_rate, weight_decay, loss_scale)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening 0")
        self.momentum, self.dampening, self.nesterov = float(momentum), float(dampening), nesterov
        self.moments = [self._slot(p, "moment") for p in self.parameters] if momentum else []
        self._started = self._scalar("sgd_started", 0.0) if momentum else None

    def apply(self, grads):
        lr = self.learning_rate
        for k, (p, g) in enumerate(zip(self.parameters, grads)):
            g = self._dense(g, p, self.decay_flags[k])
            if self.momentum:
                v = self.moments[k]
                # first step: v = g (PyTorch); later v = m v + (1 - dampening) g
                if self.dampening:
                    g_in = F.mul(g, F.sub(1.0, F.mul(self._started, self.dampening)))
                else:
                    g_in = g
                v_new = F.add(F.mul(v, self.momentum), g_in)
                F.assign(v, v_new)
                g = F.add(g, F.mul(v_new, self.momentum)) if self.nesterov else v_new
            F.assign(p, F.sub(p, F.mul(g, lr)))
        if self.momentum:
            F.assign(self._started, F.add(F.mul(self._started, 0.0), 1.0))


class Momentum(Optimizer):
    """MindSpore's ApplyMomentum: accum = momentum*accum + grad; var -= lr*accum
    (nesterov: var -= lr*(grad + momentum*accum))."""

    def __init__(self, params, learning_rate, momentum, weight_decay=0.0, loss_scale=1.0, use_nesterov=False):
        super().__init__(params, learning_rate, weight_decay, loss_scale)
        self.momentum, self.use_nesterov = float(momentum), bool(use_nesterov)
        self.moments = [self._slot(p, "moments") for p in self.parameters]

    def apply(self, grads):
        lr = self.learning_rate
        for k, (p, g) in enumerate(zip(self.parameters, grads)):
            g = self._dense(g, p, self.decay_flags[k])
            acc = F.add(F.mul(self.moments[k], self.momentum), g)
            F.assign(self.moments[k], acc)
            step = F.add(g, F.mul(acc, self.momentum)) if self.use_nesterov else acc
            F.assign(p, F.sub(p, F.mul(step, lr)))


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction folded into the step size, L2 weight decay added to
    the gradient. ``AdamWeightDecay`` decouples the decay instead (AdamW)."""

    decoupled = False

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 loss_scale=1.0):
        super().__init__(params, learning_rate, weight_decay, loss_scale)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.moment1 = [self._slot(p, "moment1") for p in self.parameters]
        self.moment2 = [self._slot(p, "moment2") for p in self.parameters]
        self.beta1_power = self._scalar("beta1_power", 1.0)
        self.beta2_power = self._scalar("beta2_power", 1.0)

    def _powers(self):
        b1p = F.mul(self.beta1_power, self.beta1)
        b2p = F.mul(self.beta2_power, self.beta2)
        F.assign(self.beta1_power, b1p)
        F.assign(self.beta2_power, b2p)
        lr_t = F.div(F.mul(self.learning_rate, F.sqrt(F.sub(1.0, b2p))), F.sub(1.0, b1p))
        return lr_t

    def apply(self, grads):
        lr_t = self._powers()
        for k, (p, g) in enumerate(zip(self.parameters, grads)):
            if self.decoupled:
                g = self._dense(g, p, False)
            else:
                g = self._dense(g, p, self.decay_flags[k])
            m = F.add(F.mul(self.moment1[k], self.beta1), F.mul(g, 1.0 - self.beta1))
            v = F.add(F.mul(self.moment2[k], self.beta2), F.mul(F.mul(g, g), 1.0 - self.beta2))
            F.assign(self.moment1[k], m)
            F.assign(self.moment2[k], v)
            upd = F.mul(F.div(m, F.add(F.sqrt(v), self.eps)), lr_t)
            if self.decoupled and self.decay_flags[k] and self.weight_decay:
                upd = F.add(upd, F.mul(p, F.mul(self.learning_rate, self.weight_decay)))
            F.assign(p, F.sub(p, upd))


class AdamWeightDecay(Adam):
    decoupled = True


AdamW = AdamWeightDecay


def _sparse_parts(g: SparseGrad):
    """Deduplicate a sparse gradient with static shapes: (unique ids padded, summed rows, valid mask)."""
    n = g.indices.size
    ids = F.reshape(g.indices, (n,)) if g.indices.ndim != 1 else g.indices
    rows = F.reshape(g.values, (n,) + tuple(g.dense_shape[1:]))
    uid = bind_sparse("unique_ids", ids)
    urows = bind_sparse("unique_rows_sum", ids, rows)
    mask = bind_sparse("unique_mask", ids)
    mask = F.reshape(F.cast(mask, rows.dtype), (n,) + (1,) * (len(g.dense_shape) - 1))
    return uid, urows, mask


def bind_sparse(op, *args):
    return bind(op, list(args))


def _fused_lookup(p, g: SparseGrad):
    """The EmbeddingLookup whose distinct-id gradient ``g`` is (None: use the generic dedup path)."""
    lookup = lookup_of(p)
    node = g.indices.node
    if lookup is None or g.values.ndim != 2 or p.dtype != np.float32 or (node is not None and node.op != "emb_unique"):
        return None
    return lookup


def _side(lookup) -> dict:
    return {"primitive_target": "CPU"} if lookup.on_host else {}


def _engine(lookup) -> dict:
    return {"_engine": lookup.engine} if lookup.engine is not None else {}


class LazyAdam(Adam):
    """Adam that, for sparse gradients, reads and updates only the touched rows of the parameter and
    its two moments (MindSpore's LazyAdam; used host-side for Wide&Deep's deep embeddings)."""

    sparse = True

    def apply(self, grads):
        lr_t = self._powers()
        dense = []
        for k, (p, g) in enumerate(zip(self.parameters, grads)):
            if not isinstance(g, SparseGrad):
                dense.append(k)
                continue
            lookup = _fused_lookup(p, g)
            if lookup is not None:  # distinct ids from an EmbeddingLookup: FusedSparseLazyAdam on its side
                with core.annotate(**_side(lookup)):
                    bind("sparse_lazy_adam", [p, self.moment1[k], self.moment2[k], g.indices, g.values, lr_t],
                         {"beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                          "weight_decay": self.weight_decay if self.decay_flags[k] else 0.0, **_engine(lookup)})
                continue
            uid, gs, mask = _sparse_parts(g)
            m_rows, v_rows, p_rows = F.gather(self.moment1[k], uid), F.gather(self.moment2[k], uid), F.gather(p, uid)
            if self.decay_flags[k] and self.weight_decay:
                gs = F.add(gs, F.mul(p_rows, self.weight_decay))
            m_new = F.add(F.mul(m_rows, self.beta1), F.mul(gs, 1.0 - self.beta1))
            v_new = F.add(F.mul(v_rows, self.beta2), F.mul(F.mul(gs, gs), 1.0 - self.beta2))
            step = F.mul(F.div(m_new, F.add(F.sqrt(v_new), self.eps)), lr_t)
            F.scatter_add_rows(self.moment1[k], uid, F.mul(F.sub(m_new, m_rows), mask))
            F.scatter_add_rows(self.moment2[k], uid, F.mul(F.sub(v_new, v_rows), mask))
            F.scatter_add_rows(p, uid, F.mul(F.neg(step), mask))
        for k in dense:
            p, g = self.parameters[k], self._dense(grads[k], self.parameters[k], self.decay_flags[k])
            m = F.add(F.mul(self.moment1[k], self.beta1), F.mul(g, 1.0 - self.beta1))
            v = F.add(F.mul(self.moment2[k], self.beta2), F.mul(F.mul(g, g), 1.0 - self.beta2))
            F.assign(self.moment1[k], m)
            F.assign(self.moment2[k], v)
            F.assign(p, F.sub(p, F.mul(F.div(m, F.add(F.sqrt(v), self.eps)), lr_t)))


class FTRL(Optimizer):
    """FTRL-proximal (McMahan et al. 2013) with lr_power -0.5; sparse gradients update only the touched
    rows (MindSpore's FTRL; Wide&Deep's wide part)."""

    sparse = True

    def __init__(self, params, initial_accum=0.1, learning_rate=0.001, l1=0.0, l2=0.0, weight_decay=0.0,
                 loss_scale=1.0):
        super().__init__(params, learning_rate, weight_decay, loss_scale)
        if initial_accum <= 0:
            raise ValueError(f"FTRL: initial_accum must be > 0, got {initial_accum}")
        self.l1, self.l2 = float(l1), float(l2)
        self.accum = [self._slot(p, "accum", initial_accum) for p in self.parameters]
        self.linear = [self._slot(p, "linear", 0.0) for p in self.parameters]

    def _ftrl(self, w, g, acc, lin):
        lr = self.learning_rate
        acc_new = F.add(acc, F.mul(g, g))
        sigma = F.div(F.sub(F.sqrt(acc_new), F.sqrt(acc)), lr)
        lin_new = F.sub(F.add(lin, g), F.mul(sigma, w))
        quad = F.add(F.div(F.sqrt(acc_new), lr), 2.0 * self.l2)
        shrunk = F.div(F.sub(F.mul(F.sign(lin_new), self.l1), lin_new), quad)
        w_new = F.select(F.greater(F.abs(lin_new), self.l1), shrunk, F.zeros_like(shrunk))
        return w_new, acc_new, lin_new

    def apply(self, grads):
        for k, (p, g) in enumerate(zip(self.parameters, grads)):
            lookup = _fused_lookup(p, g) if isinstance(g, SparseGrad) else None
            if lookup is not None:  # distinct ids from an EmbeddingLookup: FusedSparseFtrl on its side
                with core.annotate(**_side(lookup)):
                    bind("sparse_ftrl", [p, self.accum[k], self.linear[k], g.indices, g.values, self.learning_rate],
                         {"l1": self.l1, "l2": self.l2,
                          "weight_decay": self.weight_decay if self.decay_flags[k] else 0.0, **_engine(lookup)})
            elif isinstance(g, SparseGrad):
                uid, gs, mask = _sparse_parts(g)
                if self.decay_flags[k] and self.weight_decay:
                    gs = F.add(gs, F.mul(F.gather(p, uid), self.weight_decay))
                w, acc, lin = F.gather(p, uid), F.gather(self.accum[k], uid), F.gather(self.linear[k], uid)
                w_new, acc_new, lin_new = self._ftrl(w, gs, acc, lin)
                F.scatter_add_rows(self.accum[k], uid, F.mul(F.sub(acc_new, acc), mask))
                F.scatter_add_rows(self.linear[k], uid, F.mul(F.sub(lin_new, lin), mask))
                F.scatter_add_rows(p, uid, F.mul(F.sub(w_new, w), mask))
            else:
                g = self._dense(g, p, self.decay_flags[k])
                w_new, acc_new, lin_new = self._ftrl(p, g, self.accum[k], self.linear[k])
                F.assign(self.accum[k], acc_new)
                F.assign(self.linear[k], lin_new)
                F.assign(p, w_new)


class OptimizerGroup(Optimizer):
    """Several optimizers over disjoint parameter lists, each with its own ``target`` -- one training step
    updates them all (MindSpore's Wide&Deep TrainStepWrap: FTRL for the wide part, LazyAdam for the deep
    part). ``Model(net, loss, [opt_a, opt_b])`` builds one."""

    def __init__(self, optimizers):
        optimizers = list(optimizers)
        if not optimizers or not all(isinstance(o, Optimizer) for o in optimizers):
            raise TypeError("OptimizerGroup: expects a non-empty list of Optimizers")
        seen: dict[int, str] = {}
        for o in optimizers:
            for p in o.parameters:
                if id(p) in seen:
                    raise ValueError(f"OptimizerGroup: parameter {p.name!r} is given to both {seen[id(p)]} and "
                                     f"{type(o).__name__}")
                seen[id(p)] = type(o).__name__
        self.optimizers = optimizers
        self.parameters = [p for o in optimizers for p in o.parameters]
        self.sparse = any(o.sparse for o in optimizers)
        self.target = None
        self.learning_rate = optimizers[0].learning_rate
        self.global_step = 0

    def step_begin(self, step: int) -> None:
        self.global_step = step
        for o in self.optimizers:
            o.step_begin(step)

    def get_lr(self) -> float:
        return self.optimizers[0].get_lr()

    def state_parameters(self) -> list[Parameter]:
        return [s for o in self.optimizers for s in o.state_parameters()]

    def apply(self, grads):
        k = 0
        for o in self.optimizers:
            n = len(o.parameters)
            with core.annotate(**({"primitive_target": o.target} if o.target else {})):
                o(grads[k:k + n])
            k += n
