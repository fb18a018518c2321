"""One ``torch.optim.Optimizer`` that runs any :class:`~l2o.optim.base.UpdateRule`.

``RuleOptimizer(params, rule, **overrides)`` keeps ``torch.optim``'s whole contract, so LR
schedulers, ``state_dict`` checkpoints and ``step(closure)`` loops work unchanged:

- the rule's fields are the optimizer's ``defaults``, so every param group carries them and the
  rule is rebuilt from the group (``rule.replace(lr=group["lr"], ...)``) at every step: whatever
  a scheduler writes into a group (``lr``, ``momentum``, ``betas``) takes effect;
- each group's params that have a gradient form the dict ``{str(index_in_group): tensor}`` the
  rule sees; params without a gradient are skipped, as ``torch.optim`` skips them;
- state is created lazily. Per-parameter slots of the rule state (the paths the rule declares
  in ``parameter_slots()``) go to ``state[p]`` under their path (``"exp_avg"``, or ``"a/b"``
  for a nested slot); the group's update counter (``"step"``, an int64 tensor) and the rule's
  global slots (``"group:<path>"``) go to the state of the group's first param;
- updates are applied in place under ``no_grad``.

One step counter per group, not per parameter as in ``torch.optim``: a parameter that first
gets a gradient after the group's first update starts with fresh slots at the group's step, so
its first bias corrections (Adam family) and first momentum buffer (SGD) differ from what
``torch.optim`` would do for it. Every parameter that has a gradient from the first update on
follows ``torch.optim`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from l2o.optim.base import Params, State, UpdateRule, finite_difference_hvp

STEP = "step"
GROUP_PREFIX = "group:"
_SEPARATOR = "/"


class RuleOptimizer(torch.optim.Optimizer):
    """Run ``rule`` on every param group; ``overrides`` replace the rule's hyper-parameters.

    Args:
        params: an iterable of tensors or of param-group dicts, as for any ``torch.optim``
            optimizer; a group's keys that name rule fields override the defaults.
        rule: the update rule; its fields become the optimizer's ``defaults``.
        **overrides: hyper-parameters replaced in ``rule`` (``lr=0.1``).
    """

    def __init__(self, params: Iterable[Any], rule: UpdateRule, **overrides: Any) -> None:
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"rule must be an l2o UpdateRule, got {type(rule).__name__}")
        self.rule = _replace_checked(rule, overrides)
        defaults = {name: getattr(self.rule, name) for name in self.rule.hyperparameter_names()}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            keyed_params(group)
        except ValueError:
            self.param_groups.pop()
            raise
        for i, p in enumerate(group["params"]):
            if p.is_complex() and not self.rule.supports_complex:
                self.param_groups.pop()
                raise TypeError(
                    f"{type(self).__name__}: parameter {i} of group {len(self.param_groups)} is "
                    f"complex ({p.dtype}); l2o's rules update real tensors: optimise "
                    "torch.view_as_real(p) as a real parameter instead"
                )
        self._group_rule(group)  # a bad hyper-parameter fails here, not mid-run

    def _group_rule(self, group: Mapping[str, Any]) -> UpdateRule:
        base = self._base_rule(group)
        names = base.hyperparameter_names()
        return base.replace(**{k: group[k] for k in names if k in group})

    def _base_rule(self, group: Mapping[str, Any]) -> UpdateRule:
        """The rule whose hyper-parameters ``group`` overrides (subclasses may pick it per
        group, e.g. by device)."""
        return self.rule

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every param group; returns the closure's loss (or None)."""
        probing = self.rule.needs_loss_fn
        if closure is None and self._closure_required():
            raise RuntimeError(
                f"{type(self.rule).__name__} evaluates the loss at other points, so "
                f"{type(self).__name__}.step needs a closure: "
                "optimizer.step(closure) with a closure that zeroes the gradients, computes the "
                "loss, calls loss.backward() and returns the loss"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # A probing rule's closure calls rewrite every .grad: take all groups' gradients now.
        grads = {
            p: (p.grad.detach().clone() if probing else p.grad.detach())
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        }
        if not probing:
            for group in self.param_groups:
                self._step_group(group, grads, closure, None)
            return loss
        known_loss = None if loss is None else scalar_loss(loss, "the closure")
        # The closure runs again at candidate points and may raise (or be interrupted): then
        # every parameter, gradient and state entry is put back as it was before this step.
        snapshot = self._snapshot(grads)
        try:
            for group in self.param_groups:
                if self._step_group(group, grads, closure, known_loss):
                    known_loss = None  # parameters moved: the closure's loss is stale
        except BaseException:
            self._restore(snapshot, grads)
            raise
        return loss

    def _closure_required(self) -> bool:
        """Whether ``step`` needs a closure (a rule that evaluates the loss elsewhere; a
        subclass may give its rule the loss by other means)."""
        return self.rule.needs_loss_fn

    def _snapshot(self, grads: Mapping[Tensor, Tensor]) -> dict[Tensor, tuple[Tensor, dict]]:
        # State entries are replaced, never modified in place, so shallow copies suffice.
        return {p: (p.detach().clone(), dict(self.state.get(p, {}))) for p in grads}

    def _restore(
        self, snapshot: Mapping[Tensor, tuple[Tensor, dict]], grads: Mapping[Tensor, Tensor]
    ) -> None:
        with torch.no_grad():
            for p, (value, state) in snapshot.items():
                p.copy_(value)
                p.grad = grads[p].clone()
                if state:
                    self.state[p] = state
                else:
                    self.state.pop(p, None)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """``torch.optim``'s load, then a check that every loaded slot has the shape and dtype
        this optimizer's rule gives its parameter (``torch.optim`` would broadcast a ``[1]``
        slot into a ``[7]`` parameter silently); on a mismatch the previous state is kept."""
        previous_state, previous_groups = self.state, self.param_groups
        super().load_state_dict(state_dict)
        try:
            for index, group in enumerate(self.param_groups):
                self._check_loaded_group(index, group)
        except ValueError:
            self.state, self.param_groups = previous_state, previous_groups
            raise

    def _check_loaded_group(self, index: int, group: Mapping[str, Any]) -> None:
        loaded = {k: p for k, p in keyed_params(group).items() if _has_slots(self.state[p])}
        if not loaded:
            return
        expected = {k: {} for k in loaded}
        with torch.no_grad():
            initial = self._group_rule(group).init({k: p.detach() for k, p in loaded.items()})
        _store_state(initial, expected, None, self._group_rule(group).parameter_slots())
        for k, p in loaded.items():
            for slot, want in expected[k].items():
                got = self.state[p].get(slot)
                if not isinstance(got, Tensor):
                    raise ValueError(
                        f"optimizer state of param {k} in group {index} has no tensor slot "
                        f"{slot!r}: the state was saved by another optimizer or rule"
                    )
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise ValueError(
                        f"optimizer state slot {slot!r} of param {k} in group {index} is "
                        f"{got.dtype}{list(got.shape)}, but the parameter needs "
                        f"{want.dtype}{list(want.shape)}: the state belongs to other parameters "
                        "(another model, or params passed in another order)"
                    )

    def _step_group(
        self,
        group: dict[str, Any],
        all_grads: Mapping[Tensor, Tensor],
        closure: Callable[[], Any] | None,
        known_loss: Tensor | None,
    ) -> bool:
        live = {k: p for k, p in keyed_params(group).items() if p in all_grads}
        if not live:
            return False
        grads = {k: all_grads[p] for k, p in live.items()}
        if any(g.is_sparse for g in grads.values()):
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                "(e.g. nn.Embedding(..., sparse=False)) or torch.optim.SparseAdam"
            )
        rule = self._group_rule(group)
        anchor = self.state[group["params"][0]]
        self._init_new_params(rule, live, anchor)
        step = int(anchor[STEP])
        if rule.tensorwise() and not rule.needs_loss_fn:
            for k, p in live.items():
                self._apply(rule, {k: p}, {k: grads[k]}, anchor, step)
        else:
            self._apply(rule, live, grads, anchor, step, closure, known_loss)
        anchor[STEP] = torch.tensor(step + 1)
        return True

    def _apply(
        self,
        rule: UpdateRule,
        live: Params,
        grads: Params,
        anchor: dict[str, Any],
        step: int,
        closure: Callable[[], Any] | None = None,
        known_loss: Tensor | None = None,
    ) -> None:
        """One update of the parameters ``live`` (all of a group's, or one of a tensorwise
        rule's): their new values and state written in place of the old."""
        state = _join_state({k: self.state[p] for k, p in live.items()}, anchor)
        if rule.needs_loss_fn:
            # The closure moves the live parameters: the rule gets copies, and the parameters
            # are put back before the update is applied.
            params = {k: p.detach().clone() for k, p in live.items()}
            loss_fn = self._loss_fn(closure, live, known_loss)
            updates, new_state = rule.update(grads, state, params, step=step, loss_fn=loss_fn)
            if loss_fn.evaluations:
                for k, p in live.items():
                    p.copy_(params[k])
        else:
            params = {k: p.detach() for k, p in live.items()}
            updates, new_state = rule.update(grads, state, params, step=step)

        # The rule may hand back a gradient or parameter tensor as a state slot (SGD's first
        # momentum buffer is the gradient); own a copy before p.add_ or zero_grad touch it.
        borrowed = {_storage(t) for t in (*params.values(), *grads.values())}
        new_state = tree_map_only(
            Tensor, lambda t: t.clone() if _storage(t) in borrowed else t, new_state
        )
        for k, p in live.items():
            p.add_(updates[k])
        per_param = {k: self.state[p] for k, p in live.items()}
        _store_state(new_state, per_param, anchor, rule.parameter_slots())

    def _loss_fn(
        self, closure: Callable[[], Any], live: Params, known_loss: Tensor | None
    ) -> ClosureLoss:
        """The ``loss_fn`` a probing rule gets (subclasses may evaluate another closure)."""
        return ClosureLoss(closure, live, loss=known_loss)

    def _init_new_params(self, rule: UpdateRule, live: Params, anchor: dict[str, Any]) -> None:
        new = {k: p for k, p in live.items() if not _has_slots(self.state[p])}
        if not new:
            return
        initial = rule.init({k: p.detach() for k, p in new.items()})
        first_update = STEP not in anchor
        _store_state(
            initial,
            {k: self.state[p] for k, p in new.items()},
            anchor if first_update else None,
            rule.parameter_slots(),
        )
        if first_update:
            anchor[STEP] = torch.tensor(0)


class ClosureLoss:
    """The ``loss_fn`` a probing rule gets from :class:`RuleOptimizer`: it writes the given
    values into the live parameters and runs the user's closure under ``enable_grad``.

    A :class:`~l2o.optim.base.LossFn`: ``loss_fn(values)`` returns the (detached) loss;
    ``loss_fn.value_and_grad(values)`` also returns the gradients the closure left in
    ``p.grad``. ``loss_fn.known_loss`` is the loss at the parameters the
    rule is called with when the optimizer already knows it (the closure ran at the start of
    ``step``), else None, so a rule need not evaluate it again.
    """

    def __init__(
        self, closure: Callable[[], Any], params: Params, *, loss: Tensor | None = None
    ) -> None:
        self.closure = closure
        self.params = params
        self.known_loss = loss
        self.evaluations = 0

    def load(self, values: Params) -> None:
        """Write ``values`` into the live parameters, as an evaluation there (the optimizer
        puts its own parameters back after a rule that evaluated anything)."""
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(values[k])
        self.evaluations += 1

    def __call__(self, values: Params) -> Tensor:
        self.load(values)
        with torch.enable_grad():
            loss = self.closure()
        return scalar_loss(loss, "the closure")

    def value_and_grad(self, values: Params) -> tuple[Tensor, Params]:
        loss = self(values)
        grads = {
            k: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for k, p in self.params.items()
        }
        return loss, grads

    def hvp(self, values: Params, vector: Params) -> Params:
        """``∇²f(values) · vector``: exact when the closure calls
        ``loss.backward(create_graph=True)`` (its gradients then carry their graph, one closure
        call), else by central differences of the closure's gradients (two calls, see
        :func:`l2o.optim.base.finite_difference_hvp`)."""
        self(values)
        params = list(self.params.values())
        grads = [p.grad for p in params]
        if not all(g is not None and g.requires_grad for g in grads):
            return finite_difference_hvp(self, values, vector)
        with torch.enable_grad():
            products = torch.autograd.grad(
                grads, params, grad_outputs=[vector[k] for k in self.params], allow_unused=True
            )
        for p in params:  # drop the graph the closure's backward(create_graph=True) kept
            p.grad = p.grad.detach()
        return {
            k: torch.zeros_like(p) if h is None else h.detach()
            for (k, p), h in zip(self.params.items(), products)
        }


# --- rule state <-> torch.optim state -----------------------------------------------------------


def _replace_checked(rule: UpdateRule, changes: Mapping[str, Any]) -> UpdateRule:
    unknown = sorted(set(changes) - set(rule.hyperparameter_names()))
    if unknown:
        raise TypeError(
            f"{type(rule).__name__} has no hyper-parameter {', '.join(map(repr, unknown))}; "
            f"its hyper-parameters are {', '.join(rule.hyperparameter_names())}"
        )
    return rule.replace(**changes) if changes else rule


def keyed_params(group: Mapping[str, Any]) -> dict[str, Tensor]:
    """A param group's parameters under the keys the rule sees: their names when the optimizer
    was given ``model.named_parameters()`` (``torch.optim`` keeps them as ``param_names``), so
    that name-dependent options (``ortho_mlp``'s ``vector_keys``) match as they do in
    meta-training; otherwise their positions in the group, ``"0"``, ``"1"``, ..."""
    params = group["params"]
    names = group.get("param_names")
    if names is None:
        return {str(i): p for i, p in enumerate(params)}
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names repeat within a param group: {repeated}")
    return dict(zip(names, params, strict=True))


def _is_reserved(key: str) -> bool:
    return key == STEP or key.startswith(GROUP_PREFIX)


def _has_slots(param_state: Mapping[str, Any]) -> bool:
    return any(not _is_reserved(key) for key in param_state)


def _store_state(
    state: State,
    per_param: Mapping[str, dict[str, Any]],
    anchor: dict[str, Any] | None,
    slots: frozenset[str] | None,
) -> None:
    """Write ``state`` into ``per_param[k]`` (the per-parameter slots: the paths in ``slots``
    the rule declares, or, when it declares none, every dict keyed exactly like the params) and
    ``anchor`` (global entries; skipped when ``anchor`` is None)."""
    keys = set(per_param)

    def per_parameter(slot: str, value: Any) -> bool:
        if slots is None:
            return isinstance(value, Mapping) and bool(value) and set(value) == keys
        if slot not in slots:
            return False
        # A declared slot may hold some of the params only (Muon: matrices), never others.
        if not isinstance(value, Mapping) or not set(value) <= keys:
            got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise ValueError(
                f"state slot {slot!r} is declared per-parameter, but holds {got} for the "
                f"parameters {sorted(keys)}: the rule's init/update and PARAMETER_SLOTS disagree"
            )
        return True

    def visit(node: Mapping[str, Any], path: str) -> None:
        for name, value in node.items():
            if _SEPARATOR in name or ":" in name or (not path and name == STEP):
                raise ValueError(f"state slot name {name!r} is reserved by RuleOptimizer")
            slot = path + name
            if per_parameter(slot, value):
                for k, tensor in value.items():
                    per_param[k][slot] = tensor
            elif isinstance(value, Mapping) and not value:
                if anchor is not None:  # an empty sub-state (SGD without momentum) is kept
                    anchor[GROUP_PREFIX + slot] = {}
            elif isinstance(value, Mapping):
                visit(value, slot + _SEPARATOR)
            elif anchor is not None:
                anchor[GROUP_PREFIX + slot] = value

    visit(state, "")


def _join_state(per_param: Mapping[str, Mapping[str, Any]], anchor: Mapping[str, Any]) -> State:
    """The rule state for the params ``per_param`` is keyed by (inverse of ``_store_state``)."""
    state: State = {}
    for key, value in anchor.items():
        if key.startswith(GROUP_PREFIX):
            _nested_set(state, key[len(GROUP_PREFIX) :].split(_SEPARATOR), value)
    for k, param_state in per_param.items():
        for slot, value in param_state.items():
            if not _is_reserved(slot):
                _nested_set(state, [*slot.split(_SEPARATOR), k], value)
    return state


def _nested_set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def scalar_loss(loss: Any, source: str) -> Tensor:
    """``loss`` detached as a 0-dim tensor; anything but one number is a clear error (a
    closure that forgot ``return loss``, or returns per-example losses)."""
    if isinstance(loss, Tensor) and loss.numel() == 1 and not loss.is_complex():
        return loss.detach().reshape(())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.tensor(float(loss))
    what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, Tensor) else repr(loss)
    raise TypeError(
        f"{source} must return the loss as one number (a 0-dim tensor or a float), got {what}; "
        "end it with `return loss` (reduce per-example losses with .mean())"
    )


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()
