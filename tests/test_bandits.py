"""bayesdl.bandits: the problems' rewards, exact linear Thompson sampling against closed forms
and scipy, Thompson sampling beating greedy with sublinear regret, safe mode, every posterior
as an agent, agent files, and the bootstrap ensemble behind bootstrapped Thompson sampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bayesdl as bdl
from bayesdl import bandits
from bayesdl.files import ModelFileError
from bayesdl.models import mlp

scipy_stats = pytest.importorskip("scipy.stats")

MUSHROOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "mushroom"
MUSHROOM_FILE = MUSHROOM / "agaricus-lepiota.data"
LIK = "homoscedastic_gaussian"


def _small_mushroom_file(path: Path) -> Path:
    rows = [
        "p,x,s,n,t,p,f,c,n,k,e,e,s,s,w,w,p,w,o,p,k,s,u",
        "e,x,s,y,t,a,f,c,b,k,e,c,s,s,w,w,p,w,o,p,n,n,g",
        "e,b,s,w,t,l,f,c,b,n,e,?,s,s,w,w,p,w,o,p,n,n,m",
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


# ------------------------------------------------------------------------------------ problems
def test_load_mushroom_one_hot(tmp_path):
    features, edible, names = bandits.load_mushroom(_small_mushroom_file(tmp_path / "m.data"))
    assert edible.tolist() == [False, True, True]
    assert features.shape == (3, len(names))
    assert torch.equal(features.sum(1), torch.full((3,), 22.0))  # one value per attribute
    assert "attribute11=?" in names  # a missing value is a category of its own
    assert names.index("attribute1=b") < names.index("attribute1=x")


@pytest.mark.skipif(not MUSHROOM_FILE.exists(), reason="needs ../shared/data/mushroom")
def test_load_mushroom_uci_file_has_117_features():
    features, edible, _ = bandits.load_mushroom(MUSHROOM_FILE)
    assert features.shape == (8124, 117)
    assert int(edible.sum()) == 4208


def test_load_mushroom_refuses_other_files(tmp_path):
    bad = tmp_path / "bad.data"
    bad.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="not the UCI mushroom file"):
        bandits.load_mushroom(bad)
    with pytest.raises(FileNotFoundError, match="agaricus-lepiota"):
        bandits.load_mushroom(tmp_path / "missing.data")


def test_mushroom_rewards(tmp_path):
    data = bandits.load_mushroom(_small_mushroom_file(tmp_path / "m.data"))[:2]
    problem = bandits.mushroom_bandit("unused", 20_000, seed=1, data=data)
    assert problem.n_actions == 2 and bandits.MUSHROOM_ACTIONS == ("leave", "eat")
    assert torch.equal(problem.rewards[:, 0], torch.zeros(20_000))
    poisonous = problem.expected[:, 1] < 0
    eat = problem.rewards[:, 1]
    assert torch.equal(eat[~poisonous], torch.full_like(eat[~poisonous], 5.0))
    assert set(eat[poisonous].tolist()) == {5.0, -35.0}
    # +5 or -35 with probability 1/2 each: mean -15 within 4 standard errors (sd 20).
    assert abs(float(eat[poisonous].mean()) + 15) < 4 * 20 / math.sqrt(int(poisonous.sum()))
    assert torch.equal(problem.expected[poisonous, 1], torch.full((int(poisonous.sum()),), -15.0))
    oracle = problem.optimal_actions()
    assert torch.equal(oracle, (~poisonous).long())  # eat exactly the edible ones
    assert float(problem.regret(oracle).abs().sum()) == 0.0
    always_eat = torch.ones(20_000, dtype=torch.long)
    assert torch.allclose(problem.regret(always_eat), -eat * poisonous)


@pytest.mark.parametrize("delta", [0.5, 0.9])
def test_wheel_bandit_geometry(delta):
    problem = bandits.wheel_bandit(delta, 40_000, seed=0)
    x = problem.contexts
    radius = x.norm(dim=1)
    assert float(radius.max()) <= 1.0 and problem.n_actions == 5
    outside = radius > delta
    # Uniform on the disc: a fraction 1 - delta^2 outside, within 4 standard errors.
    share = 1 - delta**2
    assert abs(float(outside.float().mean()) - share) < 4 * math.sqrt(share * (1 - share) / 40_000)
    best = problem.optimal_actions()
    assert torch.all(best[~outside] == 0)
    assert torch.all(problem.expected[~outside, 0] == 1.2)
    quadrant = torch.where(
        x[:, 0] > 0, torch.where(x[:, 1] > 0, 1, 2), torch.where(x[:, 1] < 0, 3, 4)
    )
    assert torch.equal(best[outside], quadrant[outside])
    assert torch.all(problem.expected[outside].max(1).values == 50.0)
    noise = problem.rewards - problem.expected
    assert abs(float(noise.std()) - 0.01) < 0.001


def test_problem_checks():
    with pytest.raises(ValueError, match=r"delta must be a number in \(0, 1\)"):
        bandits.wheel_bandit(1.0)
    with pytest.raises(ValueError, match="same T"):
        bandits.BanditProblem("x", torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(4, 2))
    problem = bandits.linear_bandit(10, seed=0)
    with pytest.raises(ValueError, match=r"actions must lie in \[0, 3\)"):
        problem.regret(torch.full((10,), 3))


# ------------------------------------------------------------------------- linear Thompson
def test_linear_thompson_posterior_is_the_closed_form():
    problem = bandits.linear_bandit(200, n_actions=2, context_dim=3, noise_std=0.5, seed=3)
    agent = bandits.LinearThompson(2, a0=3.0, b0=2.0, lambda_prior=0.5)
    run_actions = bandits.run(agent, problem, seed=0).actions
    mean, precision, a, b = agent.posterior_parameters()
    x = np.hstack([problem.contexts.double().numpy(), np.ones((200, 1))])
    for action in range(2):
        rows = (run_actions == action).numpy()
        xa = x[rows]
        ya = problem.rewards[:, action].double().numpy()[rows]
        lam = xa.T @ xa + 0.5 * np.eye(4)
        mu = np.linalg.solve(lam, xa.T @ ya)
        a_n = 3.0 + rows.sum() / 2
        b_n = 2.0 + 0.5 * (ya @ ya - mu @ lam @ mu)
        np.testing.assert_allclose(precision[action].numpy(), lam, rtol=1e-12)
        np.testing.assert_allclose(mean[action].numpy(), mu, rtol=1e-9, atol=1e-12)
        assert float(a[action]) == pytest.approx(a_n, rel=1e-12)
        assert float(b[action]) == pytest.approx(b_n, rel=1e-9)


def test_linear_thompson_picks_each_action_with_its_posterior_probability():
    """P(action 1) is P(beta_1 . phi > beta_0 . phi) under the normal-inverse-gamma posterior:
    estimated with scipy's inverse-gamma and multivariate normal, then compared with the
    agent's choices on 20,000 copies of one context."""
    problem = bandits.linear_bandit(30, n_actions=2, context_dim=2, noise_std=1.0, seed=7)
    agent = bandits.LinearThompson(2)
    bandits.run(agent, problem, seed=0)
    mean, precision, a, b = agent.posterior_parameters()
    phi = np.array([0.3, -0.2, 1.0])
    rng = np.random.default_rng(0)
    n = 200_000
    values = []
    for action in range(2):
        sigma2 = scipy_stats.invgamma(float(a[action]), scale=float(b[action])).rvs(
            n, random_state=rng
        )
        cov = np.linalg.inv(precision[action].numpy())
        z = rng.multivariate_normal(np.zeros(3), cov, size=n)
        values.append((mean[action].numpy() + np.sqrt(sigma2)[:, None] * z) @ phi)
    p1 = float(np.mean(values[1] > values[0]))
    m = 20_000
    agent.initial_pulls = 0
    chosen = agent.act(
        torch.tensor([[0.3, -0.2]]).expand(m, 2), generator=torch.Generator().manual_seed(1)
    )
    freq = float(chosen.float().mean())
    assert 0.05 < p1 < 0.95  # the test is informative: both actions are plausible
    assert abs(freq - p1) < 4 * math.sqrt(p1 * (1 - p1) / m) + 0.005


# -------------------------------------------------------------- Thompson sampling over posteriors
def _two_armed(seed: int, horizon: int = 300) -> bandits.BanditProblem:
    """Action 1 is better by 0.5 on average, under unit noise: a greedy agent whose first
    estimates rank them wrongly never learns better."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(horizon, 2, generator=g)
    expected = torch.stack([0.2 * x[:, 0], 0.5 + 0.2 * x[:, 1]], dim=1)
    return bandits.BanditProblem(
        "two-armed", x, expected + torch.randn(horizon, 2, generator=g), expected
    )


def test_thompson_sampling_beats_greedy_and_its_regret_grows_sublinearly():
    thirds = {"thompson": np.zeros(3), "greedy": np.zeros(3)}
    for seed in range(8):
        problem = _two_armed(100 + seed)
        for policy in thirds:
            torch.manual_seed(seed)
            net = bandits.reward_model(2, 2, (16,))
            posterior = (
                bdl.DeepEnsemble(net, LIK, n_members=5, bootstrap=True, seed=seed)
                if policy == "thompson"
                else bdl.Deterministic(net, LIK)
            )
            agent = bandits.PosteriorAgent(
                posterior, 2, policy=policy, refit_every=10, train_steps=20, lr=1e-2, seed=seed
            )
            regret = bandits.run(agent, problem, seed=seed).expected_regret
            thirds[policy] += [float(regret[i * 100 : (i + 1) * 100].sum()) / 8 for i in range(3)]
    ts, greedy = thirds["thompson"], thirds["greedy"]
    assert ts.sum() < greedy.sum()
    assert ts[2] < 0.5 * ts[0]  # sublinear: the regret per round falls as the posterior learns
    assert ts[2] < greedy[2]


@pytest.mark.parametrize(
    "make",
    [
        lambda net: bdl.MCDropout(net, LIK),
        lambda net: bdl.DeepEnsemble(net, LIK, n_members=3, bootstrap=True, seed=0),
        lambda net: bdl.MeanFieldVI(net, LIK),
        lambda net: bdl.Laplace(net, LIK),
        lambda net: bdl.SWAG(net, LIK),
    ],
    ids=["mc_dropout", "deep_ensemble", "mean_field_vi", "laplace", "swag"],
)
@pytest.mark.parametrize("policy", ["thompson", "ucb", "epsilon_greedy"])
def test_every_posterior_plays(make, policy):
    torch.manual_seed(0)
    problem = bandits.wheel_bandit(0.5, 60, seed=0)
    net = bandits.reward_model(2, 5, (8,), dropout=0.1)
    agent = bandits.PosteriorAgent(make(net), 5, policy=policy, refit_every=10, train_steps=5)
    result = bandits.run(agent, problem, seed=0)
    assert agent.n_refits == 6 and agent.buffer.size == 60
    assert result.actions[:10].tolist() == [0, 1, 2, 3, 4] * 2  # the initial pulls
    draws = agent.expected_rewards(problem.contexts[:4], 6 if policy != "thompson" else None)
    assert draws.shape[1:] == (4, 5) and torch.isfinite(draws).all()


@pytest.mark.parametrize("method", ["mean_field_vi", "swag"])
def test_a_draw_scores_every_action_with_the_same_weights(method):
    """Methods whose prediction draws the first layer's noise per row
    (``prediction_noise="local"``) draw whole weight sets for an agent: the action rows of a
    context share each draw, so two copies of one context get equal draws. (A Gaussian with
    a mean and a variance per row: the network then runs on the stacked fast path, where the
    local draws apply.)"""
    torch.manual_seed(0)
    problem = bandits.wheel_bandit(0.5, 30, seed=0)
    post = bdl.get_posterior(method)(mlp(7, 2, (8,)), "gaussian")
    agent = bandits.PosteriorAgent(post, 5, refit_every=10, train_steps=5)
    bandits.run(agent, problem, seed=0)
    x = problem.contexts[:1].expand(2, 2)
    draws = agent.expected_rewards(x, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws[:, 0], draws[:, 1])  # equal up to float32 rounding
    assert post.prediction_noise.value == "local"  # restored after the agent's call
    same = torch.cat([x, torch.eye(5)[[0, 0]]], 1)  # one (context, action) row twice
    assert post._local_layers(same)
    rows = post.sample_outputs(same, 4)  # outside the agent: first-layer noise per row
    assert not torch.allclose(rows[:, 0], rows[:, 1])


def test_thompson_draws_once_per_decision():
    """Each context's action is the best under a draw of its own: with an ensemble, the
    chosen action is always the argmax of some member, and different contexts use different
    members."""
    torch.manual_seed(0)
    problem = bandits.wheel_bandit(0.5, 100, seed=0)
    ensemble = bdl.DeepEnsemble(bandits.reward_model(2, 5, (16,)), LIK, n_members=4, seed=0)
    agent = bandits.PosteriorAgent(ensemble, 5, refit_every=50, train_steps=5)
    bandits.run(agent, problem, seed=0)
    x = torch.rand(400, 2) - 0.5
    members = agent.expected_rewards(x)  # (M, B, A)
    best = members.argmax(dim=2)  # (M, B)
    chosen = agent.act(x, generator=torch.Generator().manual_seed(0))
    assert torch.all((best == chosen).any(dim=0))
    disagree = (best != best[0]).any(dim=0)
    assert disagree.any()  # the members differ somewhere: a fixed member would be caught
    uses = torch.stack([(best[m] == chosen)[disagree].float().mean() for m in range(4)])
    assert torch.all(uses < 0.95)


def test_safe_mode_never_takes_an_action_below_the_floor():
    torch.manual_seed(0)
    problem = bandits.wheel_bandit(0.5, 200, seed=1)
    ensemble = bdl.DeepEnsemble(bandits.reward_model(2, 5, (16,)), LIK, n_members=5, seed=0)
    agent = bandits.PosteriorAgent(ensemble, 5, refit_every=50, train_steps=20, lr=1e-2)
    bandits.run(agent, problem, seed=0)
    x = torch.rand(300, 2) * 2 - 1
    lower = torch.quantile(agent.expected_rewards(x), 0.05, dim=0)  # (B, A): members are fixed
    floor = float(lower.median())
    agent.floor, agent.fallback = floor, 0
    chosen = agent.act(x, generator=torch.Generator().manual_seed(0))
    any_safe = (lower >= floor).any(dim=1)
    assert 0 < int(any_safe.sum()) < 300
    picked = lower.gather(1, chosen[:, None])[:, 0]
    assert torch.all(picked[any_safe] >= floor)
    assert torch.all(chosen[~any_safe] == 0)  # nothing clears the floor: the fallback
    agent.fallback = None  # then the action of highest lower bound
    chosen = agent.act(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chosen[~any_safe], lower[~any_safe].argmax(1))


def test_agent_checks():
    net = bandits.reward_model(2, 5, (8,))
    with pytest.raises(ValueError, match="Gaussian likelihood"):
        bandits.PosteriorAgent(bdl.Deterministic(bdl.models.mlp(7, 3), "categorical"), 5)
    with pytest.raises(ValueError, match="unknown policy 'softmax'; choose one of"):
        bandits.PosteriorAgent(bdl.Deterministic(net, LIK), 5, policy="softmax")
    with pytest.raises(ValueError, match="fallback must be None or an action"):
        bandits.PosteriorAgent(bdl.Deterministic(net, LIK), 5, fallback=5)
    wrong = bandits.PosteriorAgent(bdl.Deterministic(bdl.models.mlp(3, 1), LIK), 5)
    with pytest.raises(ValueError, match=r"reward_model\(2, 5\)"):
        bandits.run(wrong, bandits.wheel_bandit(0.5, 20, seed=0))
    agent = bandits.PosteriorAgent(bdl.Deterministic(net, LIK), 5)
    with pytest.raises(ValueError, match="not been fitted"):
        agent.expected_rewards(torch.zeros(1, 2))
    agent.act(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"pass \(B, 2\) arrays"):
        agent.act(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one action and one reward per context"):
        agent.update(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="the agent has 2 actions but the problem 5"):
        bandits.run(bandits.Uniform(2), bandits.wheel_bandit(0.5, 5))


# ---------------------------------------------------------------------------------- agent files
@pytest.mark.parametrize("kind", ["ensemble", "laplace", "linear", "uniform"])
def test_saved_agent_continues_exactly(tmp_path, kind):
    torch.manual_seed(0)
    problem = bandits.wheel_bandit(0.7, 120, seed=2)

    def make():
        if kind == "linear":
            return bandits.LinearThompson(5)
        if kind == "uniform":
            return bandits.Uniform(5)
        net = bandits.reward_model(2, 5, (8,))
        post = (
            bdl.DeepEnsemble(net, LIK, n_members=3, bootstrap=True, seed=0)
            if kind == "ensemble"
            else bdl.Laplace(net, LIK)
        )
        return bandits.PosteriorAgent(post, 5, refit_every=20, train_steps=5, seed=3)

    agent = make()
    head = bandits.BanditProblem(
        "head", problem.contexts[:60], problem.rewards[:60], problem.expected[:60]
    )
    bandits.run(agent, head, seed=0)
    path = tmp_path / "agent.safetensors"
    bandits.save_agent(agent, path)
    loaded = bandits.load_agent(path)
    assert type(loaded) is type(agent)
    if isinstance(agent, bandits.PosteriorAgent):
        assert loaded.buffer.size == 60 and loaded.n_refits == agent.n_refits
    tail = bandits.BanditProblem(
        "tail", problem.contexts[60:], problem.rewards[60:], problem.expected[60:]
    )
    # Both continue on the same rounds with the same random streams: the same decisions.
    a = bandits.run(agent, tail, seed=5).actions
    b = bandits.run(loaded, tail, seed=5).actions
    assert torch.equal(a, b)


def test_agent_file_errors(tmp_path):
    agent = bandits.LinearThompson(3)
    agent.update(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), torch.randn(4))
    path = tmp_path / "agent.safetensors"
    bandits.save_agent(agent, path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="damaged"):
        bandits.load_agent(damaged)
    model_file = tmp_path / "model.safetensors"
    post = bdl.Deterministic(bdl.models.mlp(2, 1), LIK)
    post.fit((torch.randn(8, 2), torch.randn(8)), epochs=1)
    bdl.save(post, model_file)
    with pytest.raises(ModelFileError):
        bandits.load_agent(model_file)
    with pytest.raises(TypeError, match="save_agent saves"):
        bandits.save_agent(object(), path)


# ---------------------------------------------------------------------- bootstrap ensembles
def test_bootstrap_members_train_on_their_own_resamples():
    x = torch.linspace(-2, 2, 64)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(0))

    def fitted(bootstrap: bool, seed: int = 0):
        ens = bdl.DeepEnsemble(
            bdl.models.mlp(1, 1, (16,)), LIK, n_members=4, seed=0, bootstrap=bootstrap
        )
        ens.fit((x, y), epochs=5, batch_size=16, seed=seed)
        return ens.sample_outputs(x)[..., 0]

    same = fitted(True)
    assert torch.equal(same, fitted(True))  # drawn from the data seed: reproducible
    assert not torch.equal(same, fitted(False))
    assert not torch.equal(same, fitted(True, seed=1))
    with pytest.raises(ValueError, match="independent_data_order=True"):
        bdl.DeepEnsemble(bdl.models.mlp(1, 1), LIK, bootstrap=True, independent_data_order=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    ens = bdl.DeepEnsemble(bdl.models.mlp(1, 1), LIK, n_members=2, bootstrap=True)
    with pytest.raises(ValueError, match="not a DataLoader"):
        ens.fit(loader, epochs=1)


def test_bootstrap_rows_are_resamples():
    from bayesdl.training import _bootstrap_rows

    class Objective:
        bootstrap, n_orders = True, 3

    data = bdl.data.TensorData(torch.zeros(500, 1), torch.zeros(500))
    rows = _bootstrap_rows(Objective(), data, data_seed=4)
    assert rows.shape == (3, 500) and int(rows.min()) >= 0 and int(rows.max()) < 500
    assert torch.equal(rows, _bootstrap_rows(Objective(), data, data_seed=4))
    # About 1 - 1/e of the rows appear in a resample of n from n.
    distinct = torch.tensor([len(set(r.tolist())) / 500 for r in rows])
    assert torch.all((distinct - (1 - math.exp(-1))).abs() < 0.05)
    assert not torch.equal(rows[0], rows[1])


def test_bootstrap_is_kept_in_model_files(tmp_path):
    ens = bdl.DeepEnsemble(bdl.models.mlp(2, 1), LIK, n_members=2, bootstrap=True, seed=0)
    ens.fit((torch.randn(16, 2), torch.randn(16)), epochs=1)
    bdl.save(ens, tmp_path / "e.safetensors")
    assert bdl.load(tmp_path / "e.safetensors").bootstrap is True
