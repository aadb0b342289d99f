"""Meta-learning maths over a :class:`~metafilm.learner.FiLMLearner`: one task, a meta-batch, an
outer step, an evaluation, and the inputs they read. One job in about 590 lines: the maths of
meta-learning around the one per-task computation (``_query_logits``) that training and
evaluation share.

The outer objective, in one place. One outer step (:func:`meta_step`) on a meta-batch of ``T``
tasks minimises::

    L = 1/T sum_t [ CE(query_t | adapted_t) + outer.film_l2 * |adapted_t|^2 ]     (meta_backward)
      + outer.postmult_l2 * |encoder.postmult|^2                                  (meta_step)
      + auxiliary.weight * CE(classifier(backbone(aux images)), aux labels)       (meta_step)
      + Adam weight decay outer.encoder_weight_decay on the encoder's predictor   (make_optimizer)

with ``adapted_t`` the deviations after the inner loop (:func:`metafilm.inner.inner_loop`), which
takes ``adapt.inner_steps`` SGD steps on ``CE(support_t) + adapt.film_l2 * |deviations|^2`` from
the encoder's prediction; ``|d|^2`` is :func:`metafilm.film.l2_to_identity`, the squared distance
from identity FiLM. The auxiliary term is TADAM's co-training (``outer.aux_weight``, decayed by
``outer.aux_decay`` every ``outer.aux_decay_every`` steps: :func:`auxiliary_weight`); the weight
decay acts on the encoder's ``net`` alone (not its post-multipliers, nor anything else). The
meta-gradient is clipped to norm ``outer.grad_clip`` before the update.

One task (:func:`task_loss`), with the learner's parameters passed explicitly (``functional_call``):

1. starting deviations: the task encoder on the *unmodulated* support features, or identity;
2. :func:`metafilm.inner.inner_loop` on the support loss of the head, the prototypes rebuilt from
   the modulated support features at every step;
3. query loss and accuracy with the adapted deviations. Support and query go through the network
   in one pass (as Prototypical Networks do), so the prototypes and the queries see the same
   batch-norm statistics in episode mode. The linear head reads no support features: the query
   goes alone.

So a task costs one unmodulated support pass (if there is an encoder), one support pass per inner
step, and one pass over support and query; the inner loop differentiates only the deviations.

A meta-batch (:func:`meta_backward`) is either a per-task ``loop`` that back-propagates each task as
soon as it is computed (memory of one task at a time; the faster strategy on CPU), or one ``vmap``
over the tasks (``torch.func.grad`` inside; needs batch norm that updates no running statistics),
which tells the backbone so (``vmapped=True``: FiLM is then applied after batch norm).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from episodes.classes import ClassImages, to_pixels
from episodes.sampler import Episode, IndexEpisode, Task, gather
from metafilm.encoder import task_representation
from metafilm.film import Deviations, deviation_size, identity, l2_to_identity
from metafilm.inner import Differentiate, inner_loop
from metafilm.interop import as_episode
from metafilm.learner import FiLMLearner
from metafilm.specs import AdaptSpec, OuterSpec

Strategy = Literal["auto", "loop", "vmap"]
PrefixStore = Callable[[torch.nn.Module, int, Tensor, torch.dtype, Callable[[], Tensor]], Tensor]
"""Keeps a frozen backbone's prefix features between runs (see :func:`input_builder`)."""
STRATEGIES = ("auto", "loop", "vmap")


class _Modules(NamedTuple):
    """What one task calls: the learner's sub-modules, or ``functional_call`` wrappers of them
    over given tensors, and the Meta-SGD learning rates (``None`` without)."""

    backbone: Callable[..., Tensor]
    encoder: Callable[..., Deviations] | None
    head: Callable[..., Tensor]
    inner_lrs: Tensor | None


def _own_modules(learner: FiLMLearner) -> _Modules:
    """The learner's modules called directly: no re-parametrisation cost per call."""
    return _Modules(learner.backbone, learner.encoder, learner.head, learner.inner_lrs)


def _functional_modules(
    learner: FiLMLearner, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]
) -> _Modules:
    """The learner's modules evaluated at ``params``/``buffers`` (named as in the learner)."""
    groups: dict[str, dict[str, Tensor]] = {"backbone": {}, "encoder": {}, "head": {}, "": {}}
    for name, tensor in (*params.items(), *buffers.items()):
        module, _, rest = name.partition(".")
        groups[module if rest else ""][rest or name] = tensor

    def at(module: torch.nn.Module | None, tensors: dict[str, Tensor]) -> Callable[..., Any]:
        if module is None:
            return None
        return lambda *args, **kwargs: functional_call(module, tensors, args, kwargs)

    return _Modules(
        at(learner.backbone, groups["backbone"]),
        at(learner.encoder, groups["encoder"]),
        at(learner.head, groups["head"]),
        groups[""].get("inner_lrs"),
    )


def _adapted(
    modules: _Modules,
    learner: FiLMLearner,
    adapt: AdaptSpec,
    onehot: Tensor,
    start_block: int,
    differentiate: Differentiate,
    vmapped: bool,
    support_x: Tensor,
    support_y: Tensor,
) -> tuple[Deviations, Deviations]:
    """A task's deviations as the encoder predicts them from the support set, and after the inner
    loop on the support loss."""

    def embed(x: Tensor, film: Deviations | None) -> Tensor:
        return modules.backbone(x, film, start_block=start_block, vmapped=vmapped)

    if modules.encoder is None:
        predicted = identity(learner.site_channels, learner.used_sites, like=support_x)
    else:
        predicted = modules.encoder(task_representation(embed(support_x, None), onehot))

    def support_loss(deviations: Deviations) -> Tensor:
        features = embed(support_x, deviations)
        return F.cross_entropy(modules.head(features, onehot, features), support_y)

    adapted = inner_loop(
        predicted,
        support_loss,
        inner_steps=adapt.inner_steps,
        inner_lr=adapt.inner_lr,
        first_order=adapt.first_order,
        film_l2=adapt.film_l2,
        per_param_lr=learner.per_param_lr(modules.inner_lrs),
        differentiate=differentiate,
    )
    return predicted, adapted


def adapt_to_support(
    learner: FiLMLearner, support_x: Tensor, support_y: Tensor, ways: int, adapt: AdaptSpec
) -> Deviations:
    """One task's adapted deviations, as evaluation computes them (eval mode, no outer graph):
    ``support_x`` ``[N, C, H, W]`` images in the learner's dtype, ``support_y`` labels in
    ``0..ways-1``, any number of images per class (each class at least one)."""
    counts = torch.bincount(support_y, minlength=ways)
    if len(counts) != ways or bool((counts == 0).any()):
        raise ValueError(f"support labels must cover 0..{ways - 1}, each class at least once")
    onehot = (support_y.unsqueeze(-1) == torch.arange(ways)).to(support_x.dtype)
    first_order = replace(adapt, first_order=True)  # same values, no graph of the inner gradient
    was_training = learner.training
    learner.eval()
    try:
        with torch.no_grad():
            _, adapted = _adapted(
                _own_modules(learner),
                learner,
                first_order,
                onehot,
                0,
                "autograd",
                False,
                support_x,
                support_y,
            )
    finally:
        learner.train(was_training)
    return adapted


def _query_logits(
    modules: _Modules,
    learner: FiLMLearner,
    adapt: AdaptSpec,
    ways: int,
    start_block: int,
    differentiate: Differentiate,
    vmapped: bool,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
) -> tuple[Tensor, Deviations, Deviations]:
    """One task's query logits after adaptation, with its predicted and adapted deviations."""
    onehot = (support_y.unsqueeze(-1) == torch.arange(ways)).to(support_x.dtype)

    def embed(x: Tensor, film: Deviations | None) -> Tensor:
        return modules.backbone(x, film, start_block=start_block, vmapped=vmapped)

    predicted, adapted = _adapted(
        modules, learner, adapt, onehot, start_block, differentiate, vmapped, support_x, support_y
    )
    if learner.head.uses_support:
        features = embed(torch.cat([support_x, query_x]), adapted)
        head_inputs = (features[: len(support_x)], onehot, features[len(support_x) :])
    else:
        head_inputs = (None, onehot, embed(query_x, adapted))
    return modules.head(*head_inputs), predicted, adapted


def _task(
    modules: _Modules,
    learner: FiLMLearner,
    adapt: AdaptSpec,
    ways: int,
    start_block: int,
    differentiate: Differentiate,
    vmapped: bool,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Query loss and metrics of one task after adaptation (see the module docstring)."""
    logits, predicted, adapted = _query_logits(
        modules,
        learner,
        adapt,
        ways,
        start_block,
        differentiate,
        vmapped,
        support_x,
        support_y,
        query_x,
    )
    metrics = {
        "accuracy": (logits.argmax(-1) == query_y).to(logits.dtype).mean(),
        "film_l2": l2_to_identity(adapted),
    }
    for name, deviations in (("film_predicted", predicted), ("film_adapted", adapted)):
        for site, (dgamma, dbeta) in deviations.items():
            metrics[f"{name}/{site}"] = deviation_size(dgamma, dbeta)
    return F.cross_entropy(logits, query_y), metrics


def task_loss(
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    learner: FiLMLearner,
    task: Task,
    adapt: AdaptSpec,
    *,
    start_block: int = 0,
    differentiate: Differentiate = "autograd",
    vmapped: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One task's query loss after adaptation, and its metrics.

    ``params``/``buffers`` are named as in ``learner.named_parameters()``/``named_buffers()``.
    Metrics: ``accuracy``, ``film_l2`` (squared distance of the adapted deviations from identity,
    differentiable: the outer regulariser), ``film_predicted/<site>`` and ``film_adapted/<site>``
    (RMS size of the starting and adapted deviations). ``start_block > 0`` means the inputs are
    ``backbone.prefix(images, start_block)`` features. Under ``torch.func.vmap``, pass
    ``differentiate="func"`` and ``vmapped=True``.
    """
    return _task(
        _functional_modules(learner, params, buffers),
        learner,
        adapt,
        task.ways,
        start_block,
        differentiate,
        vmapped,
        task.support_x,
        task.support_y,
        task.query_x,
        task.query_y,
    )


def _task_of(
    modules: _Modules,
    learner: FiLMLearner,
    adapt: AdaptSpec,
    episode: Episode,
    start_block: int,
    i: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Task ``i`` of ``episode`` by the autograd inner loop (the per-task loop)."""
    return _task(
        modules,
        learner,
        adapt,
        episode.ways,
        start_block,
        "autograd",
        False,
        episode.support_x[i],
        episode.support_y[i],
        episode.query_x[i],
        episode.query_y[i],
    )


def _all_tasks_vmapped(
    modules: _Modules, learner: FiLMLearner, adapt: AdaptSpec, episode: Episode, start_block: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Every task of ``episode`` in one ``vmap`` (``torch.func.grad`` inner loop)."""
    one_task = partial(_task, modules, learner, adapt, episode.ways, start_block, "func", True)
    return torch.func.vmap(one_task)(
        episode.support_x, episode.support_y, episode.query_x, episode.query_y
    )


def _resolve_strategy(strategy: str, start_block: int) -> str:
    """``auto``: ``vmap`` over cached prefix features (small per-task work: ~3x faster than the
    loop on CPU, docs/benchmarks.md), the per-task ``loop`` over images (faster there)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if strategy == "auto":
        return "vmap" if start_block > 0 else "loop"
    return strategy


def meta_backward(
    learner: FiLMLearner,
    episode: Episode,
    adapt: AdaptSpec,
    *,
    film_l2: float = 0.0,
    strategy: Strategy = "auto",
    start_block: int | None = None,
) -> dict[str, Tensor]:
    """Add to every parameter's ``.grad`` the meta-gradient of
    ``mean over tasks (query loss + film_l2 * |adapted deviations|^2)`` (the first line of the
    outer objective, see the module docstring); return per-task metrics ``[tasks]`` (detached),
    ``loss`` included.

    ``loop`` back-propagates each task as soon as it is computed (the memory of one task);
    ``vmap`` computes all tasks at once (far fewer, larger operations: faster when the per-task
    work is small, as with a frozen backbone and a cached prefix); ``auto`` picks between them.
    ``start_block`` defaults to what the inputs are: 0 for images, the first used block for the
    cached prefix features of :func:`input_builder`. ``episode`` may also be a torchmeta batch or
    learn2learn task tuples (:func:`metafilm.interop.as_episode`).
    """
    episode = as_episode(episode)
    if start_block is None:
        start_block = _start_block(learner, episode.support_x)
    strategy = _resolve_strategy(strategy, start_block)
    modules = _own_modules(learner)
    if strategy == "vmap":
        losses, metrics = _all_tasks_vmapped(modules, learner, adapt, episode, start_block)
        (losses + film_l2 * metrics["film_l2"]).mean().backward()
        return {"loss": losses.detach(), **{k: v.detach() for k, v in metrics.items()}}
    per_task: list[dict[str, Tensor]] = []
    for i in range(episode.tasks):
        loss, metrics = _task_of(modules, learner, adapt, episode, start_block, i)
        ((loss + film_l2 * metrics["film_l2"]) / episode.tasks).backward()
        per_task.append({"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}})
    return {name: torch.stack([m[name] for m in per_task]) for name in per_task[0]}


def make_optimizer(learner: FiLMLearner, outer: OuterSpec) -> torch.optim.Adam:
    """Adam over the trainable parameters; the encoder weight decay acts on the encoder's
    predictor only (its post-multipliers have their own L2 in the loss: the outer objective of the
    module docstring). A frozen backbone is left out."""
    decayed = [] if learner.encoder is None else list(learner.encoder.net.parameters())
    decayed_ids = {id(p) for p in decayed}
    rest = [p for p in learner.parameters() if p.requires_grad and id(p) not in decayed_ids]
    groups = [{"params": rest, "weight_decay": 0.0}]
    if decayed:
        groups.append({"params": decayed, "weight_decay": outer.encoder_weight_decay})
    return torch.optim.Adam(groups, lr=outer.lr)


def learning_rate(outer: OuterSpec, step: int) -> float:
    """The outer learning rate for the update after ``step`` updates: ``lr`` decayed by
    ``lr_decay`` every ``lr_decay_every`` steps. A function of the step alone, so a resumed run
    follows the same schedule."""
    if outer.lr_decay_every == 0:
        return outer.lr
    return outer.lr * outer.lr_decay ** (step // outer.lr_decay_every)


def auxiliary_weight(outer: OuterSpec, step: int) -> float:
    """The weight of the auxiliary co-training loss at ``step``: ``aux_weight`` decayed by
    ``aux_decay`` every ``aux_decay_every`` steps (a function of the step alone)."""
    if outer.aux_decay_every == 0:
        return outer.aux_weight
    return outer.aux_weight * outer.aux_decay ** (step // outer.aux_decay_every)


@dataclass(frozen=True)
class Auxiliary:
    """TADAM's auxiliary co-training term of one outer step: ``classifier`` (over all training
    classes) on the unmodulated backbone embedding of ``images``, cross-entropy with ``labels``,
    times ``weight``."""

    classifier: torch.nn.Module
    images: Tensor
    labels: Tensor
    weight: float


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def meta_step(
    learner: FiLMLearner,
    optimizer: torch.optim.Optimizer,
    episode: Episode,
    adapt: AdaptSpec,
    outer: OuterSpec,
    *,
    reduce_gradients: Callable[[list[Tensor]], None] | None = None,
    auxiliary: Auxiliary | None = None,
) -> dict[str, float]:
    """One outer update on a meta-batch; returns its training metrics.

    Minimises the outer objective of the module docstring (the auxiliary term when
    ``auxiliary`` is given; its classifier must be in ``optimizer``), with the gradient norm
    clipped to ``outer.grad_clip``. Metrics (``aux_loss`` with ``auxiliary``):
    ``loss`` (query loss), ``accuracy``, ``grad_norm`` (before clipping) and per site
    ``film_predicted/<site>``, ``film_adapted/<site>`` (RMS deviation sizes, averaged over tasks).
    ``reduce_gradients`` (distributed training) replaces the trainable parameters' gradients in
    place, e.g. by their mean over processes, before clipping and the update.
    """
    learner.train()
    optimizer.zero_grad(set_to_none=True)
    metrics = meta_backward(learner, episode, adapt, film_l2=outer.film_l2, strategy=outer.strategy)
    if learner.encoder is not None and outer.postmult_l2:
        (outer.postmult_l2 * learner.encoder.postmult.pow(2).sum()).backward()
    trainable = [p for p in learner.parameters() if p.requires_grad]
    if auxiliary is not None:
        logits = auxiliary.classifier(learner.backbone(auxiliary.images))
        aux_loss = F.cross_entropy(logits, auxiliary.labels)
        (auxiliary.weight * aux_loss).backward()
        metrics["aux_loss"] = aux_loss.detach()
        trainable += list(auxiliary.classifier.parameters())
    if reduce_gradients is not None:
        reduce_gradients([p.grad for p in trainable if p.grad is not None])
    max_norm = math.inf if outer.grad_clip is None else outer.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    optimizer.step()
    summary = {name: float(values.mean()) for name, values in metrics.items() if name != "film_l2"}
    summary["grad_norm"] = float(grad_norm)
    return summary


def query_logits(
    learner: FiLMLearner, episode: Episode, adapt: AdaptSpec, *, strategy: Strategy = "auto"
) -> Tensor:
    """The query logits ``[tasks, ways*query, ways]`` of every task of ``episode`` after
    adaptation with ``adapt`` (its ``inner_steps`` may differ from training), as evaluation
    computes them: eval mode, no outer graph (the inner loop still differentiates the
    deviations). The learner is returned to the mode it was in. A learner with Meta-SGD rates uses
    them in place of ``adapt.inner_lr``. ``strategy`` as in :func:`meta_backward`.
    """
    first_order = replace(adapt, first_order=True)  # same values, no graph of the inner gradient
    modules = _own_modules(learner)
    was_training = learner.training
    learner.eval()  # before _start_block: an outer-trained backbone reads its prefix in eval mode
    try:
        start_block = _start_block(learner, episode.support_x)
        with torch.no_grad():
            task = partial(_query_logits, modules, learner, first_order, episode.ways, start_block)
            if _resolve_strategy(strategy, start_block) == "vmap":
                return torch.func.vmap(lambda sx, sy, qx: task("func", True, sx, sy, qx)[0])(
                    episode.support_x, episode.support_y, episode.query_x
                )
            return torch.stack(
                [
                    task("autograd", False, x, y, query_x)[0]
                    for x, y, query_x in zip(
                        episode.support_x, episode.support_y, episode.query_x, strict=True
                    )
                ]
            )
    finally:
        learner.train(was_training)


def accuracies_of(logits: Tensor, query_y: Tensor) -> Tensor:
    """Per-task query accuracy (float64) of ``logits [tasks, queries, ways]`` against
    ``query_y [tasks, queries]``; the first of tied maxima is the prediction."""
    return (logits.argmax(-1) == query_y).double().mean(-1)


def evaluate(
    learner: FiLMLearner,
    episodes: Iterable[Episode],
    adapt: AdaptSpec,
    *,
    strategy: Strategy = "auto",
) -> np.ndarray:
    """Query accuracy of every task of ``episodes`` after adaptation with ``adapt``, as a float64
    array in episode order (:func:`query_logits`, :func:`accuracies_of`)."""
    accuracies = [
        accuracies_of(query_logits(learner, episode, adapt, strategy=strategy), episode.query_y)
        for episode in map(as_episode, episodes)
    ]
    return torch.cat(accuracies).numpy() if accuracies else np.zeros(0)


def _start_block(learner: FiLMLearner, x: Tensor) -> int:
    """0 for images; the first used block for the cached prefix features of ``input_builder``."""
    if tuple(x.shape[-3:]) == learner.image_shape:
        return 0
    if learner.caches_prefix:
        return learner.first_used_block
    raise ValueError(
        f"expected images shaped [tasks, examples, {', '.join(map(str, learner.image_shape))}]; "
        f"got {tuple(x.shape)}. Cached prefix features (from input_builder) need running batch "
        "norm and a frozen backbone or eval mode"
    )


def input_builder(
    learner: FiLMLearner,
    classes: ClassImages,
    *,
    batch_size: int = 128,
    max_cache_bytes: int = 6 * 2**30,
    stored: PrefixStore | None = None,
    on_images: Callable[[int, int], None] | None = None,
) -> Callable[[IndexEpisode], Episode]:
    """What turns index episodes into the inputs :func:`meta_step` and :func:`evaluate` read.

    Normally ``episodes.sampler.gather`` (images, in the learner's dtype). With running batch norm
    and a backbone that is frozen, or in eval mode (a trained run under test), the blocks before the
    first used FiLM site are a fixed function of each image (``FiLMLearner.caches_prefix``), so
    their output is computed once here for every image (eval mode, ``batch_size`` at a time: 1024
    float64 miniImageNet images would take ~11 GB in block 1) and episodes gather those features
    instead; the network then runs from the first used block. With batch norm in episode mode the
    prefix depends on the episode's batch, so nothing is cached. When
    the cache would exceed ``max_cache_bytes`` (default 6 GiB: the 4.3 GB that miniImageNet's
    training split takes before block 3 of a 64-filter Conv-4 fits) this warns and gathers images.
    ``stored`` may keep the features between runs: it is called as ``stored(backbone, end_block,
    images, dtype, compute)`` and returns the features, computed by ``compute()`` or read back (the
    trainer passes :func:`metafilm.prefix_cache.prefix_store`). While features are computed (not
    read back), ``on_images(done, total)`` hears of the images done: 0 first, then after each batch
    (miniImageNet's training split takes minutes on a CPU).
    """
    backbone = learner.backbone
    dtype = next(backbone.parameters()).dtype
    if not learner.caches_prefix:
        return partial(gather, classes, dtype=dtype)
    end_block = learner.first_used_block
    images = classes.images

    def pixels(rows: slice) -> Tensor:  # as gather makes them
        return to_pixels(images[rows], dtype)

    with torch.no_grad():
        per_image = backbone.prefix(pixels(slice(0, 1)), end_block)[0]
        needed = per_image.numel() * per_image.element_size() * len(images)
        if needed > max_cache_bytes:
            warnings.warn(
                f"the prefix features before block {end_block} would take {needed / 2**30:.1f} "
                f"GiB (limit {max_cache_bytes / 2**30:.1f} GiB); gathering images instead",
                stacklevel=2,
            )
            return partial(gather, classes, dtype=dtype)

    def compute() -> Tensor:
        parts = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                if on_images is not None:
                    on_images(start, len(images))
                parts.append(backbone.prefix(pixels(slice(start, start + batch_size)), end_block))
        if on_images is not None:
            on_images(len(images), len(images))
        return torch.cat(parts)

    features = compute() if stored is None else stored(backbone, end_block, images, dtype, compute)
    return partial(_gather_features, features)


def _gather_features(features: Tensor, index_episode: IndexEpisode) -> Episode:
    """``gather`` for cached per-image features."""
    ep = index_episode
    if bool(ep.rotations.any()) or ep.affines is not None or ep.photo is not None:
        raise ValueError(
            "rotation, affine and photo augmentation change images, not cached prefix features: "
            "sample without augment_rotations, augment_affine and photo when the backbone is "
            "frozen with running batch norm"
        )
    return Episode(
        support_x=features[ep.support_idx],
        support_y=ep.support_y,
        query_x=features[ep.query_idx],
        query_y=ep.query_y,
        ways=ep.ways,
    )
