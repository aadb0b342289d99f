"""FiLMMAML: the MAML ``clone()`` / ``adapt()`` idiom over a user's own network, adapting FiLM only.

The user keeps their ``nn.Module`` and names the submodules after which FiLM acts
(``film_sites=["features.1", ...]``); their class is never edited. ``maml.clone()`` starts a task
at identity FiLM (or at a task encoder's prediction), ``learner.adapt(loss)`` takes SGD steps on
the task's FiLM deviations through :func:`metafilm.inner.inner_loop` (the one inner loop), and
``learner(x)`` runs the model with the current deviations, so a query loss back-propagates to the
model's weights (and the encoder's) through the adaptation::

    maml = FiLMMAML(model, lr=0.4, film_sites=["1", "5", "9", "13"])
    learner = maml.clone()
    learner.adapt(F.cross_entropy(learner(support_x), support_y))
    F.cross_entropy(learner(query_x), query_y).backward()

How FiLM attaches, during ``learner(x)`` only (every call of a site, if the model calls it more
than once): a site that is a normalisation layer with a per-channel affine (``BatchNorm*d``,
``SyncBatchNorm``, ``GroupNorm``, affine ``InstanceNorm*d``) runs with FiLM folded into its weight
and bias (:func:`metafilm.film.fold_into_affine`, passed by ``torch.func.functional_call``): no
extra pass over its output, and no extra activation kept for backward. Any other site gets a
forward hook that multiplies channel dimension 1 of its output by ``1 + dgamma`` and adds
``dbeta``; the hooks are removed when the forward returns. So calling the model directly, or
``maml(x)``, is the plain model. The forward always goes through the model as given, so a
``DistributedDataParallel`` model keeps its gradient all-reduce; its ``.module`` is only used to
look the sites up by name.

A trained model's nearly-zero support losses can leave the second-order backward on subnormal
floats, which x86 computes up to 100x slower; wrapping each meta-step of the user's loop in
``metafilm.flushing_subnormals()`` flushes them, as ``metafilm train`` does
(:mod:`metafilm.subnormals`).

What ``adapt`` changes: the learner's deviations and nothing else. It never writes a parameter or
a ``.grad`` of the model. Forwards do what the model's forwards do: a batch norm in train mode
updates its running statistics on every forward, including those the closure form of ``adapt``
runs (a loss tensor form runs none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from metafilm.encoder import TaskEncoder, task_representation
from metafilm.film import Deviations, fold_into_affine, identity, modulate
from metafilm.inner import inner_loop

CHANNEL_ATTRIBUTES = ("num_features", "out_channels", "out_features", "num_channels")
"""Module attributes read, in this order, as the channel count of a site's output."""
PER_CHANNEL_AFFINE = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
"""Normalisation layers whose ``weight`` and ``bias`` (when affine) scale and shift each channel
of the output: FiLM at such a site is folded into them."""

SupportLossClosure = Callable[["FiLMClone"], Tensor]


class FiLMMAML(nn.Module):
    """Wraps ``model`` for MAML-style meta-learning in which a task adapts only FiLM deviations.

    ``film_sites``: names of submodules (as in ``model.named_modules()``; of ``model.module`` for
    a ``DistributedDataParallel`` model) whose output ``[N, C, ...]`` FiLM modulates on dim 1.
    Each site's ``C`` is read from the module (``num_features``, ``out_channels``,
    ``out_features`` or ``num_channels``); ``site_channels`` gives it for sites without one (e.g. a
    pooling or activation module). The output shape is checked at every forward.

    ``lr`` is the inner SGD learning rate, ``first_order`` the default of ``adapt``. ``encoder``,
    when given, maps the support set passed to ``clone(*support)`` to starting deviations
    ``{site: (dgamma [C], dbeta [C])}`` (e.g. :class:`SupportEncoder`); its parameters are part of
    ``self.parameters()``, so the outer optimiser trains it with the model.

    ``channels_last=True`` puts the model's 4-D parameters and buffers in the channels_last memory
    format, in place (``model.to(memory_format=torch.channels_last)``: the same values, the same
    ``Parameter`` objects). Convolutions, batch norm and pooling then run in that layout: on CPU
    a meta-step ran 1.3x faster at the 1-shot shapes of ``docs/benchmarks.md``. FiLM adapts no
    weight, so the weights keep their layout through the inner loop, which full-parameter MAML's
    fast weights do not. The model's forward must flatten activations with ``flatten`` or
    ``reshape``: ``view`` of a channels_last activation fails (a forward that does so is told).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        film_sites: Sequence[str],
        *,
        first_order: bool = False,
        encoder: nn.Module | None = None,
        site_channels: Mapping[str, int] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be a positive inner learning rate; got {lr}")
        self.model = model
        self.encoder = encoder
        self.lr = float(lr)
        self.first_order = bool(first_order)
        self.sites: tuple[str, ...] = _check_sites(unwrap(model), film_sites)
        self.site_channels: dict[str, int] = _channels_of(unwrap(model), self.sites, site_channels)
        self.folded_sites: tuple[str, ...] = tuple(
            site
            for site in self.sites
            if _has_per_channel_affine(unwrap(model).get_submodule(site), self.site_channels[site])
        )
        self.channels_last = bool(channels_last)
        if self.channels_last:
            unwrap(model).to(memory_format=torch.channels_last)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model at identity FiLM, which is the plain model."""
        return self.model(*args, **kwargs)

    def clone(self, *support: Any) -> FiLMClone:
        """A learner for one task, starting at identity FiLM or, with an encoder, at
        ``encoder(*support)`` (e.g. ``maml.clone(support_x, support_y)``)."""
        if self.encoder is None:
            if support:
                raise TypeError(
                    "clone() takes the support set only when an encoder is attached "
                    "(FiLMMAML(..., encoder=...)); without one every task starts at identity: "
                    "call maml.clone()"
                )
            reference = next(self.model.parameters(), None)
            start = identity(self.site_channels, self.sites, like=reference)
            return FiLMClone(self, _differentiable(start))
        if not support:
            raise TypeError(
                "this FiLMMAML has an encoder, which predicts a task's starting FiLM from its "
                "support set: call maml.clone(support_x, support_y) (the encoder's arguments)"
            )
        return FiLMClone(self, _differentiable(self._check_prediction(self.encoder(*support))))

    def adapt(self, *args: Any, **kwargs: Any) -> None:
        """Refuses: the wrapper holds no task state; adapt a clone."""
        raise TypeError(
            "adapt() is called on a task's learner, not on the FiLMMAML wrapper: "
            "learner = maml.clone(); learner.adapt(loss)"
        )

    def _check_prediction(self, deviations: Any) -> Deviations:
        if not isinstance(deviations, Mapping) or set(deviations) != set(self.sites):
            found = list(deviations) if isinstance(deviations, Mapping) else type(deviations)
            raise ValueError(
                f"the encoder must return {{site: (dgamma, dbeta)}} for exactly the FiLM sites "
                f"{list(self.sites)}; got {found}"
            )
        for site in self.sites:
            pair = deviations[site]
            shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t) for t in pair]
            if shapes != [(self.site_channels[site],)] * 2:
                raise ValueError(
                    f"the encoder's deviations for site {site!r} must be two tensors of shape "
                    f"[{self.site_channels[site]}]; got {shapes}"
                )
        return {site: tuple(deviations[site]) for site in self.sites}


class FiLMClone:
    """One task's learner: the wrapped model with this task's FiLM deviations.

    Holds no parameters; ``deviations`` is part of the autograd graph from the model's weights
    (and the encoder's) to whatever loss is computed with it. Made by ``FiLMMAML.clone``.
    """

    def __init__(self, maml: FiLMMAML, deviations: Deviations) -> None:
        self.maml = maml
        self.deviations = deviations

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output with this task's FiLM at every site."""
        return _film_forward(self.maml, self.deviations, args, kwargs)

    def adapt(
        self,
        loss: Tensor | SupportLossClosure,
        *,
        steps: int = 1,
        first_order: bool | None = None,
        film_l2: float = 0.0,
    ) -> None:
        """SGD on the deviations only, with the wrapper's ``lr``: ``steps`` steps on
        ``loss + film_l2 * |deviations|^2`` (the L2 pulls toward identity).

        ``loss`` is either a tensor computed with this learner's current deviations (one step,
        as in ``learner.adapt(loss_fn(learner(x), y))``; it needs gradients enabled), or a
        closure ``lambda learner: loss_fn(learner(x), y)`` that recomputes the support loss for
        each of ``steps`` steps (works under ``torch.no_grad()`` too, e.g. at evaluation).
        ``first_order`` overrides the wrapper's setting for this call.
        """
        first_order = self.maml.first_order if first_order is None else first_order
        if isinstance(loss, Tensor):
            support_loss = self._fixed_loss(loss, steps)
        elif callable(loss):

            def support_loss(candidate: Deviations) -> Tensor:
                return loss(FiLMClone(self.maml, candidate))

        else:
            raise TypeError(
                f"adapt takes a loss tensor or a closure learner -> loss; got {type(loss).__name__}"
            )
        try:
            adapted = inner_loop(
                self.deviations,
                support_loss,
                inner_steps=steps,
                inner_lr=self.maml.lr,
                first_order=first_order,
                film_l2=film_l2,
            )
        except RuntimeError as error:
            if "not have been used in the graph" not in str(error):
                raise
            raise ValueError(
                "the loss does not depend on this learner's current FiLM deviations: compute it "
                "with this learner after its latest adapt (loss_fn(learner(x), y)), or pass a "
                "closure"
            ) from error
        self.deviations = _differentiable(adapted)

    def _fixed_loss(self, loss: Tensor, steps: int) -> Callable[[Deviations], Tensor]:
        """A precomputed loss as the inner loop's support loss: valid for one step only."""
        if steps != 1:
            raise ValueError(
                f"a loss tensor is one step's loss; for steps={steps} pass a closure that "
                "recomputes it: learner.adapt(lambda l: loss_fn(l(x), y), steps=...)"
            )
        if loss.dim() != 0:
            raise ValueError(f"adapt needs a scalar loss; got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(
                "the loss has no autograd graph (computed under torch.no_grad()?): compute it "
                "with gradients enabled, or pass a closure lambda learner: loss_fn(learner(x), y)"
            )
        # The inner loop differentiates deviations that already require grad as they are, which
        # the learner's deviations always do: the loss computed from them is a function of them.
        return lambda candidate: loss


class SupportEncoder(nn.Module):
    """Starting deviations from a support set: :class:`metafilm.encoder.TaskEncoder` on the mean
    of the class prototypes of ``embed(support_x)`` (TADAM), as ``metafilm.meta`` does.

    ``embed`` maps inputs to ``[N, feature_dim]`` features; it may share modules with the wrapped
    model (e.g. ``model[:-1]``), which then runs unmodulated for the encoder. Classes are the
    distinct values of ``support_y``. ``site_channels`` is ``FiLMMAML.site_channels``.
    """

    def __init__(
        self,
        embed: nn.Module,
        feature_dim: int,
        site_channels: Mapping[str, int],
        *,
        kind: Literal["linear", "mlp"] = "linear",
        hidden: int = 256,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.task_encoder = TaskEncoder(feature_dim, site_channels, kind, hidden)

    def forward(self, support_x: Tensor, support_y: Tensor) -> Deviations:
        features = self.embed(support_x)
        onehot = (support_y.unsqueeze(-1) == torch.unique(support_y)).to(features.dtype)
        return self.task_encoder(task_representation(features, onehot))


def unwrap(model: nn.Module) -> nn.Module:
    """The network a ``DistributedDataParallel`` wrapper holds; any other module as it is."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _check_sites(network: nn.Module, film_sites: Sequence[str]) -> tuple[str, ...]:
    if isinstance(film_sites, str) or not film_sites:
        raise ValueError(
            f"film_sites must be a non-empty sequence of submodule names; got {film_sites!r}"
        )
    names = dict(network.named_modules())
    unknown = [site for site in film_sites if site not in names or site == ""]
    if unknown:
        valid = [name for name in names if name]
        raise ValueError(
            f"film_sites {unknown} are not submodules of {type(network).__name__}; "
            f"valid names: {valid}"
        )
    if len(set(film_sites)) != len(film_sites):
        raise ValueError(f"film_sites names a submodule twice: {list(film_sites)}")
    return tuple(film_sites)


def _channels_of(
    network: nn.Module, sites: tuple[str, ...], given: Mapping[str, int] | None
) -> dict[str, int]:
    given = dict(given or {})
    stray = [site for site in given if site not in sites]
    if stray:
        raise ValueError(f"site_channels names {stray}, which are not in film_sites {list(sites)}")
    channels: dict[str, int] = {}
    for site in sites:
        module = network.get_submodule(site)
        declared = next(
            (getattr(module, name) for name in CHANNEL_ATTRIBUTES if hasattr(module, name)), None
        )
        count = given.get(site, declared)
        if count is None:
            raise ValueError(
                f"cannot tell how many channels FiLM site {site!r} ({type(module).__name__}) "
                f"outputs: it has none of {list(CHANNEL_ATTRIBUTES)}; pass "
                f"site_channels={{{site!r}: C}}"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            source = "site_channels" if site in given else f"{type(module).__name__}'s attribute"
            raise ValueError(
                f"the channel count of FiLM site {site!r} must be a positive int; {source} gives "
                f"{count!r}"
            )
        channels[site] = count
    return channels


def _differentiable(deviations: Deviations) -> Deviations:
    """Deviations that all require grad, so a loss computed with them depends on them."""
    return {
        site: tuple(t if t.requires_grad else t.detach().requires_grad_() for t in pair)
        for site, pair in deviations.items()
    }


def _has_per_channel_affine(module: nn.Module, channels: int) -> bool:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        isinstance(module, PER_CHANNEL_AFFINE)
        and isinstance(weight, Tensor)
        and isinstance(bias, Tensor)
        and tuple(weight.shape) == tuple(bias.shape) == (channels,)
    )


def _film_forward(
    maml: FiLMMAML, deviations: Deviations, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``maml.model(*args, **kwargs)`` with FiLM ``deviations`` at every site: folded into the
    affine parameters of the ``folded_sites``, by hooks elsewhere."""
    network = unwrap(maml.model)
    prefix = "" if network is maml.model else "module."
    folded: dict[str, Tensor] = {}
    for site in maml.folded_sites:
        module = network.get_submodule(site)
        weight, bias = fold_into_affine(module.weight, module.bias, *deviations[site])
        folded |= {f"{prefix}{site}.weight": weight, f"{prefix}{site}.bias": bias}
    hooked = [site for site in maml.sites if site not in maml.folded_sites]
    with _film_hooks(maml, deviations, hooked):
        try:
            return functional_call(maml.model, folded, args, kwargs)
        except RuntimeError as error:
            if not (maml.channels_last and "view size is not compatible" in str(error)):
                raise
            raise RuntimeError(
                f"the model's forward calls .view on an activation, which fails in the "
                f"channels_last layout that FiLMMAML(..., channels_last=True) runs it in: use "
                f".flatten(1) or .reshape there, or channels_last=False ({error})"
            ) from error


@contextmanager
def _film_hooks(maml: FiLMMAML, deviations: Deviations, sites: Sequence[str]) -> Iterator[None]:
    network = unwrap(maml.model)
    handles = [
        network.get_submodule(site).register_forward_hook(
            _site_hook(site, maml.site_channels[site], *deviations[site])
        )
        for site in sites
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _site_hook(
    site: str, channels: int, dgamma: Tensor, dbeta: Tensor
) -> Callable[[nn.Module, Any, Any], Tensor]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() < 2 or output.shape[1] != channels:
            found = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"FiLM site {site!r} ({type(module).__name__}) returned {found}; FiLM needs a "
                f"tensor [N, C, ...] with C = {channels} channels on dim 1: choose a site whose "
                "output has its channels there, or correct site_channels"
            )
        return modulate(output, dgamma, dbeta)

    return hook
