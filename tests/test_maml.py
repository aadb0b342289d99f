"""FiLMMAML: the clone()/adapt() idiom over a user's own network.

Meta-gradients are checked against the functional core (`metafilm.meta` on a `FiLMLearner` with
the same weights) and against a hand-written task that shares no code with either inner loop;
adapt against bit-identity of the model, DDP against the plain model, and a learn2learn-style
loop on real Omniglot against test accuracy.
"""

from __future__ import annotations

import copy
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from episodes.sampler import Episode, EpisodeSampler, FixedEpisodes, gather
from metafilm.learner import FiLMLearner
from metafilm.maml import FiLMMAML, SupportEncoder
from metafilm.meta import meta_backward
from metafilm.specs import AdaptSpec, ModelSpec

IMAGE, WIDTH, WAYS = 16, 8, 5
BN_SITES = ["1", "5", "9", "13"]  # the batch norms of a Sequential Conv-4


pytestmark = pytest.mark.usefixtures("one_thread")


def conv4(width: int = WIDTH, *, conv_bias: bool = False) -> nn.Sequential:
    """A user's plain Conv-4: (conv3x3-BN-ReLU-maxpool) x 4, Flatten, Linear(width, 5)."""
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, width, 3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width, WAYS))


def random_episode(tasks: int, query: int, *, seed: int = 1) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        support_x=torch.rand(tasks, WAYS, 1, IMAGE, IMAGE, generator=g),
        support_y=torch.arange(WAYS).repeat(tasks, 1),
        query_x=torch.rand(tasks, WAYS * query, 1, IMAGE, IMAGE, generator=g),
        query_y=torch.arange(WAYS).repeat_interleave(query).repeat(tasks, 1),
        ways=WAYS,
    )


def twin_models(encoder: str, adapt: AdaptSpec) -> tuple[FiLMLearner, FiLMMAML, list]:
    """A CAVIA-style FiLMLearner (linear head) and a FiLMMAML over a plain Sequential with the
    same weights; returns them and the pairs of corresponding parameters."""
    torch.manual_seed(0)
    spec = ModelSpec(width=WIDTH, image_size=IMAGE, encoder=encoder, head="linear", head_ways=WAYS)
    learner = FiLMLearner(spec, adapt)
    model = conv4()
    pairs = []
    for i, block in enumerate(learner.backbone.blocks):
        pairs += [
            (block.conv.weight, model[4 * i].weight),
            (block.bn.weight, model[4 * i + 1].weight),
            (block.bn.bias, model[4 * i + 1].bias),
        ]
    pairs += [
        (learner.head.linear.weight, model[-1].weight),
        (learner.head.linear.bias, model[-1].bias),
    ]
    support_encoder = None
    if learner.encoder is not None:
        with torch.no_grad():  # away from zero, so that the encoder's path matters
            learner.encoder.postmult.normal_()
        support_encoder = SupportEncoder(model[:-1], WIDTH, dict.fromkeys(BN_SITES, WIDTH))
        pairs += list(
            zip(
                learner.encoder.parameters(), support_encoder.task_encoder.parameters(), strict=True
            )
        )
    with torch.no_grad():
        for theirs, ours in pairs:
            ours.copy_(theirs)
    maml = FiLMMAML(
        model, adapt.inner_lr, BN_SITES, first_order=adapt.first_order, encoder=support_encoder
    )
    return learner, maml, pairs


def reference_query_loss(model, support_encoder, task, adapt: AdaptSpec) -> torch.Tensor:
    """One task written out by hand, sharing no code with metafilm's inner loop: the Sequential
    run layer by layer with FiLM after each site, the inner loop by torch.autograd.grad."""

    def forward(x, flat):
        h = x
        for index, layer in enumerate(model):
            h = layer(h)
            if str(index) in BN_SITES:
                k = 2 * BN_SITES.index(str(index))
                h = h * (1 + flat[k].view(1, -1, 1, 1)) + flat[k + 1].view(1, -1, 1, 1)
        return h

    if support_encoder is None:
        flat = [torch.zeros(WIDTH, requires_grad=True) for _ in range(2 * len(BN_SITES))]
    else:
        predicted = support_encoder(task.support_x, task.support_y)
        flat = [t for site in BN_SITES for t in predicted[site]]
    for _ in range(adapt.inner_steps):
        loss = F.cross_entropy(forward(task.support_x, flat), task.support_y)
        loss = loss + adapt.film_l2 * sum(t.pow(2).sum() for t in flat)
        grads = torch.autograd.grad(loss, flat, create_graph=not adapt.first_order)
        flat = [t - adapt.inner_lr * g for t, g in zip(flat, grads, strict=True)]
    return F.cross_entropy(forward(task.query_x, flat), task.query_y)


@pytest.mark.parametrize(
    ("encoder", "first_order", "steps", "film_l2", "form"),
    [
        ("none", False, 1, 0.0, "tensor"),
        ("none", True, 1, 0.0, "tensor"),
        ("none", False, 3, 0.05, "closure"),
        ("none", True, 2, 0.0, "tensor"),
        ("linear", False, 2, 0.05, "closure"),
        ("linear", False, 2, 0.0, "tensor"),
        ("linear", True, 1, 0.0, "tensor"),
    ],
)
def test_meta_gradients_equal_the_functional_core(encoder, first_order, steps, film_l2, form):
    adapt = AdaptSpec(inner_steps=steps, inner_lr=0.7, first_order=first_order, film_l2=film_l2)
    learner, maml, pairs = twin_models(encoder, adapt)
    episode = random_episode(tasks=3, query=3)
    metrics = meta_backward(learner, episode, adapt)

    losses = []
    for i in range(episode.tasks):
        task = episode.task(i)
        clone = maml.clone(task.support_x, task.support_y) if encoder != "none" else maml.clone()

        def support_loss(learner, task=task):
            return F.cross_entropy(learner(task.support_x), task.support_y)

        if form == "closure":
            clone.adapt(support_loss, steps=steps, film_l2=film_l2)
        else:  # learn2learn's loop: one adapt per step, each on a freshly computed loss
            for _ in range(steps):
                clone.adapt(support_loss(clone), film_l2=film_l2)
        query_loss = F.cross_entropy(clone(task.query_x), task.query_y)
        (query_loss / episode.tasks).backward()
        losses.append(query_loss.detach())

    torch.testing.assert_close(torch.stack(losses), metrics["loss"], rtol=1e-5, atol=1e-6)
    for theirs, ours in pairs:
        assert ours.grad is not None and bool(ours.grad.abs().sum() > 0)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    # and against the hand-written task, which shares nothing with either inner loop
    support_encoder = maml.encoder
    trained = [p for p in maml.parameters() if p.requires_grad]
    reference = (
        sum(
            reference_query_loss(maml.model, support_encoder, episode.task(i), adapt)
            for i in range(episode.tasks)
        )
        / episode.tasks
    )
    expected = torch.autograd.grad(reference, trained, allow_unused=True)
    for parameter, want in zip(trained, expected, strict=True):
        torch.testing.assert_close(
            parameter.grad,
            torch.zeros_like(parameter) if want is None else want,
            rtol=1e-5,
            atol=1e-5,
        )


def test_channels_last_gives_the_same_meta_gradients_in_place_of_the_same_parameters():
    """The layout changes the kernels, not the maths: a FiLMMAML in channels_last and one in the
    default layout, on copies of one model, give the same query losses and meta-gradients."""
    torch.manual_seed(0)
    model = conv4()
    twin = copy.deepcopy(model)
    parameters = list(twin.parameters())
    default = FiLMMAML(model, 0.7, BN_SITES)
    fast = FiLMMAML(twin, 0.7, BN_SITES, channels_last=True)
    assert all(a is b for a, b in zip(twin.parameters(), parameters, strict=True))
    conv = twin[4].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    episode = random_episode(tasks=2, query=3)
    losses = {}
    for name, maml in (("default", default), ("fast", fast)):
        losses[name] = []
        for i in range(episode.tasks):
            task = episode.task(i)
            clone = maml.clone()
            clone.adapt(lambda c, t=task: F.cross_entropy(c(t.support_x), t.support_y), steps=2)
            query_loss = F.cross_entropy(clone(task.query_x), task.query_y)
            (query_loss / episode.tasks).backward()
            losses[name].append(query_loss.detach())
    torch.testing.assert_close(torch.stack(losses["fast"]), torch.stack(losses["default"]))
    for ours, theirs in zip(twin.parameters(), model.parameters(), strict=True):
        assert bool(theirs.grad.abs().sum() > 0)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def test_a_forward_that_views_a_channels_last_activation_is_told_what_to_change():
    class Viewing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = conv4()[:12]  # three blocks: 2x2 activations at the end
            self.head = nn.Linear(4 * WIDTH, WAYS)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)
            return self.head(h.view(h.size(0), -1))

    episode = random_episode(tasks=1, query=1)
    model = Viewing()
    learner = FiLMMAML(model, 0.1, ["body.1", "body.5", "body.9"]).clone()
    assert learner(episode.support_x[0]).shape == (WAYS, WAYS)  # default layout: view works
    learner = FiLMMAML(model, 0.1, ["body.1", "body.5", "body.9"], channels_last=True).clone()
    with pytest.raises(RuntimeError, match=r"calls \.view on an activation.*\.flatten\(1\)"):
        learner(episode.support_x[0])


def test_identity_film_is_the_plain_model_and_hooks_do_not_outlive_the_forward():
    model = conv4()
    maml = FiLMMAML(model, 0.1, BN_SITES)
    x = torch.rand(6, 1, IMAGE, IMAGE)
    model.eval()  # running statistics: the same output for every call
    expected = model(x)
    assert torch.equal(maml(x), expected)
    assert torch.equal(maml.clone()(x), expected)
    assert all(not module._forward_hooks for module in model.modules())


def test_film_is_folded_into_per_channel_affine_sites_and_hooked_elsewhere():
    model = conv4()
    model[5] = nn.BatchNorm2d(WIDTH, affine=False)  # no weight and bias to fold into
    maml = FiLMMAML(model, 0.1, ["1", "2", "5", "9"], site_channels={"2": WIDTH})
    assert maml.folded_sites == ("1", "9")
    model.eval()
    with torch.no_grad():  # affine parameters away from their initial 1 and 0
        for site in maml.folded_sites:
            model.get_submodule(site).weight.uniform_(0.5, 1.5)
            model.get_submodule(site).bias.normal_()
    clone = maml.clone()
    g = torch.Generator().manual_seed(3)
    clone.deviations = {
        site: (torch.randn(WIDTH, generator=g), torch.randn(WIDTH, generator=g))
        for site in maml.sites
    }
    x = torch.rand(4, 1, IMAGE, IMAGE)
    h = x
    for i, layer in enumerate(model):  # FiLM written out after each site, by hand
        h = layer(h)
        if str(i) in maml.sites:
            dgamma, dbeta = clone.deviations[str(i)]
            h = h * (1 + dgamma.view(-1, 1, 1)) + dbeta.view(-1, 1, 1)
    torch.testing.assert_close(clone(x), h)


def test_film_acts_on_channel_dim_1_of_each_site():
    model = conv4()
    model.eval()
    maml = FiLMMAML(model, 0.1, ["5"])
    clone = maml.clone()
    dgamma, dbeta = torch.randn(WIDTH), torch.randn(WIDTH)
    clone.deviations = {"5": (dgamma, dbeta)}
    x = torch.rand(4, 1, IMAGE, IMAGE)
    h = model[:6](x) * (1 + dgamma.view(-1, 1, 1)) + dbeta.view(-1, 1, 1)
    torch.testing.assert_close(clone(x), model[6:](h))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"


def test_adapt_writes_nothing_of_the_model():
    model = conv4()
    maml = FiLMMAML(model, 0.5, BN_SITES)
    episode = random_episode(tasks=1, query=2)
    task = episode.task(0)
    clone = maml.clone()
    start = {
        site: tuple(t.detach().clone() for t in pair) for site, pair in clone.deviations.items()
    }
    loss = F.cross_entropy(clone(task.support_x), task.support_y)
    before = _snapshot(model)
    clone.adapt(loss)  # the loss tensor form runs no forward: parameters and buffers unchanged
    _assert_bit_identical(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert all(
        not torch.equal(now, then)
        for site in BN_SITES
        for now, then in zip(clone.deviations[site], start[site], strict=True)
    )

    # the closure form runs the closure's forwards, which update batch-norm running statistics
    # as any forward in train mode does; the parameters stay bit-identical
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    tracked = int(model[1].num_batches_tracked)
    clone.adapt(lambda c: F.cross_entropy(c(task.support_x), task.support_y), steps=3)
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())
    assert int(model[1].num_batches_tracked) == tracked + 3
    assert all(p.grad is None for p in model.parameters())


def test_the_closure_form_adapts_under_no_grad_as_with_grad():
    model = conv4()
    model.eval()
    maml = FiLMMAML(model, 0.5, BN_SITES)
    task = random_episode(tasks=1, query=2).task(0)

    def support_loss(learner):
        return F.cross_entropy(learner(task.support_x), task.support_y)

    with_grad = maml.clone()
    with_grad.adapt(support_loss, steps=2)
    without = maml.clone()
    with torch.no_grad():
        without.adapt(support_loss, steps=2)
        query_without = without(task.query_x)
    torch.testing.assert_close(query_without, with_grad(task.query_x).detach())


def test_the_inner_l2_pulls_toward_identity():
    maml = FiLMMAML(conv4(), 0.5, BN_SITES)
    task = random_episode(tasks=1, query=2).task(0)
    clone = maml.clone()
    clone.deviations = {s: (torch.ones(WIDTH), torch.ones(WIDTH)) for s in BN_SITES}
    clone.adapt(lambda c: c(task.support_x).sum() * 0, film_l2=0.5)  # only the L2 acts
    for dgamma, dbeta in clone.deviations.values():  # 1 - lr * 2 * film_l2 * 1 = 0.5
        torch.testing.assert_close(dgamma, torch.full((WIDTH,), 0.5))
        torch.testing.assert_close(dbeta, torch.full((WIDTH,), 0.5))


def test_an_unknown_site_lists_the_valid_names():
    with pytest.raises(
        ValueError, match=r"\['features'\] are not submodules.*valid names: \['0', '1'"
    ):
        FiLMMAML(conv4(), 0.1, ["features"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        FiLMMAML(conv4(), 0.1, "1")


def test_a_site_without_declared_channels_asks_for_site_channels():
    with pytest.raises(ValueError, match=r"site '2' \(ReLU\).*site_channels=\{'2': C\}"):
        FiLMMAML(conv4(), 0.1, ["2"])
    maml = FiLMMAML(conv4(), 0.1, ["2"], site_channels={"2": WIDTH})
    assert maml.clone()(torch.rand(2, 1, IMAGE, IMAGE)).shape == (2, WAYS)


class Squash(nn.Module):
    """A module whose output has no channel dimension: ``[N]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(1)


def test_a_site_output_without_channels_fails_at_the_first_forward():
    model = nn.Sequential(nn.Linear(4, 3), Squash())
    maml = FiLMMAML(model, 0.1, ["1"], site_channels={"1": 3})  # construction cannot tell
    with pytest.raises(ValueError, match=r"site '1' \(Squash\) returned \(2,\).*C = 3"):
        maml.clone()(torch.rand(2, 4))
    wrong = FiLMMAML(nn.Sequential(nn.Linear(4, 3)), 0.1, ["0"], site_channels={"0": 5})
    with pytest.raises(ValueError, match=r"returned \(2, 3\).*C = 5"):
        wrong.clone()(torch.rand(2, 4))


def test_adapt_refuses_the_wrapper_and_losses_it_cannot_use():
    model = conv4()
    maml = FiLMMAML(model, 0.1, BN_SITES)
    task = random_episode(tasks=1, query=2).task(0)
    with pytest.raises(TypeError, match=r"learner = maml.clone\(\); learner.adapt\(loss\)"):
        maml.adapt(F.cross_entropy(model(task.support_x), task.support_y))
    clone = maml.clone()
    loss = F.cross_entropy(clone(task.support_x), task.support_y)
    with pytest.raises(ValueError, match="for steps=2 pass a closure"):
        clone.adapt(loss, steps=2)
    with pytest.raises(ValueError, match="does not depend on this learner's current FiLM"):
        clone.adapt(F.cross_entropy(model(task.support_x), task.support_y))
    clone.adapt(loss)
    with pytest.raises(ValueError, match="does not depend on this learner's current FiLM"):
        clone.adapt(loss)  # computed before the latest adapt
    with torch.no_grad():
        frozen = F.cross_entropy(clone(task.support_x), task.support_y)
    with pytest.raises(ValueError, match="no autograd graph"):
        clone.adapt(frozen)


def test_clone_takes_a_support_set_exactly_when_an_encoder_is_attached():
    model = conv4()
    task = random_episode(tasks=1, query=2).task(0)
    with pytest.raises(TypeError, match="only when an encoder is attached"):
        FiLMMAML(model, 0.1, BN_SITES).clone(task.support_x, task.support_y)
    encoder = SupportEncoder(model[:-1], WIDTH, dict.fromkeys(BN_SITES, WIDTH))
    maml = FiLMMAML(model, 0.1, BN_SITES, encoder=encoder)
    with pytest.raises(TypeError, match=r"maml.clone\(support_x, support_y\)"):
        maml.clone()
    assert set(maml.clone(task.support_x, task.support_y).deviations) == set(BN_SITES)
    assert {id(p) for p in encoder.task_encoder.parameters()} <= {id(p) for p in maml.parameters()}

    bad = FiLMMAML(model, 0.1, BN_SITES, encoder=lambda x, y: {"1": (x, y)})
    with pytest.raises(ValueError, match=r"exactly the FiLM sites \['1', '5', '9', '13'\]"):
        bad.clone(task.support_x, task.support_y)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}"
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _meta_gradient(maml: FiLMMAML, episode: Episode) -> None:
    for i in range(episode.tasks):
        task = episode.task(i)
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(task.support_x), task.support_y))
        F.cross_entropy(learner(task.query_x), task.query_y).backward()


def test_ddp_model_meta_gradients_go_through_the_all_reduce(gloo_group):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.manual_seed(0)
    plain = conv4()
    wrapped = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
    reduced_buckets = []

    def counting_allreduce(state, bucket):
        reduced_buckets.append(bucket.index())
        return allreduce_hook(state, bucket)

    wrapped.register_comm_hook(None, counting_allreduce)
    episode = random_episode(tasks=2, query=2)
    _meta_gradient(FiLMMAML(plain, 0.5, BN_SITES), episode)
    ddp_maml = FiLMMAML(wrapped, 0.5, BN_SITES)  # sites are named as in the unwrapped model
    assert ddp_maml.model is wrapped
    _meta_gradient(ddp_maml, episode)

    assert reduced_buckets, "the DDP reducer never all-reduced: the forward bypassed DDP"
    for (name, ours), theirs in zip(
        wrapped.module.named_parameters(), plain.parameters(), strict=True
    ):
        assert ours.grad is not None, name
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)


TRAIN_STEPS, META_BATCH, TRAIN_QUERY, INNER_STEPS, INNER_LR = 150, 8, 3, 2, 12.0
TEST_EPISODES, TEST_QUERY, TEST_INNER_STEPS = 100, 15, 4
MIN_TEST_ACCURACY = 0.70  # measured 0.816 +- 0.020 (95% CI) with these settings


@pytest.mark.slow
@pytest.mark.data
def test_learn2learn_style_loop_learns_omniglot_5way_1shot(omniglot_split):
    """The learn2learn MAML loop with a plain Conv-4 and FiLM on its four batch norms.

    Protocol: 5-way 1-shot, trained on Vinyals `train` for 150 steps (3 query per class, 8 tasks,
    2 inner steps at lr 12, second order, Adam 3e-3); evaluated on 100 fixed Vinyals `test`
    episodes (seed 1, 15 query per class) after 4 inner steps, batch norm in train mode (batch
    statistics of the support or query set: transductive, as MAML). Chance is 20%.
    """
    train, test = omniglot_split("train"), omniglot_split("test")
    torch.manual_seed(0)
    model = conv4(64, conv_bias=True)
    maml = FiLMMAML(model, lr=INNER_LR, film_sites=BN_SITES, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=3e-3)
    sampler = EpisodeSampler(train, WAYS, 1, TRAIN_QUERY, seed=0)
    for step in range(TRAIN_STEPS):
        episode = gather(train, sampler.sample(step, META_BATCH))
        optimizer.zero_grad()
        for i in range(episode.tasks):
            task = episode.task(i)
            learner = maml.clone()
            for _ in range(INNER_STEPS):
                support_loss = F.cross_entropy(learner(task.support_x), task.support_y)
                if step % 25 == 0 and i == 0:  # adapt changes the FiLM deviations only
                    before = _snapshot(model)
                    learner.adapt(support_loss)
                    _assert_bit_identical(model, before)
                else:
                    learner.adapt(support_loss)
            query_loss = F.cross_entropy(learner(task.query_x), task.query_y)
            (query_loss / episode.tasks).backward()
        optimizer.step()

    accuracies = []
    fixed = FixedEpisodes(test, WAYS, 1, TEST_QUERY, seed=1, episodes=TEST_EPISODES)
    for index_episode in fixed.batches(50):
        episode = gather(test, index_episode)
        for i in range(episode.tasks):
            task = episode.task(i)
            learner = maml.clone()
            learner.adapt(
                lambda l, t=task: F.cross_entropy(l(t.support_x), t.support_y),
                steps=TEST_INNER_STEPS,
                first_order=True,
            )
            with torch.no_grad():
                predictions = learner(task.query_x).argmax(-1)
            accuracies.append(float((predictions == task.query_y).float().mean()))
    accuracy = float(np.mean(accuracies))
    assert accuracy >= MIN_TEST_ACCURACY, f"test accuracy {accuracy:.3f}"
