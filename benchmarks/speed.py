"""Speed benchmark: each bayesdl method against the plain-PyTorch loop it replaces.

Run from the repository root::

    python -m benchmarks.speed [--json] [--cases a,b] [--repeats N] [--quick] [--threads N]
                               [--device cuda]

Every case builds a ``(method, baseline, info)`` triple; :func:`time_pair` times both with the
same protocol (one warm-up call of each, then ``repeats`` interleaved calls ``A B A B ...`` so that
machine noise hits both alike, medians of :func:`time.perf_counter` intervals), and the row
reports ``ratio = seconds / baseline_seconds`` next to the target the issue set for it.

``--quick`` shrinks every size so the test suite can run the script in seconds; its timings say
nothing about the targets, and the output says it is quick.

Cases
-----
``ensemble_train_small``
    ``DeepEnsemble`` (5 members of a 13-50-2 Gaussian net) ``fit`` on 455 synthetic points,
    batch 32, 40 epochs, against ``Deterministic.fit`` of one member with the same settings.
``ensemble_train_small_homoscedastic``
    The same with the homoscedastic Gaussian likelihood (one noise variance per member, a
    13-50-1 net); also timed with the stacked fast path off (``extra_ratios``).
``mc_dropout_predict_10k``
    ``MCDropout.sample_outputs`` with 10,000 draws on 51 inputs of a 13-50-2 dropout net, against
    a Python loop of 10,000 forward passes with dropout active.
``ivon_train_epoch_mlp``
    One ``IVON.fit`` epoch (batch 128) on 10,000 synthetic 784-d inputs of a 784-400-400-10
    MLP, against one ``Deterministic.fit`` epoch (Adam) of the same net and data.
``laplace_fit_last_layer_kron``
    ``Laplace.fit`` (last layer, KFAC, marginal-likelihood prior) on 10,000 synthetic 784-d inputs
    of a randomly initialised 784-400-400-10 MLP, against one forward pass over the same inputs.
``laplace_predict_glm``
    ``Laplace.predictive_probs`` (linearised predictive, probit) on 1,000 inputs of that MLP,
    against a loop of 100 forward passes.
``mlp_predict_s100_<method>``
    For every registered method except ``deterministic``: 100 draws on 1,000 inputs of a
    784-400-400-10 dropout MLP, against 100 deterministic forward passes (the practical floor).
    An ensemble's draws are its 100 members, SG-MCMC's its 100 kept samples. Methods with
    Gaussian weights (mean-field VI, IVON, SWAG) run with their default
    ``prediction_noise="local"`` and are also timed against themselves with
    ``prediction_noise="weights"`` (whole weight draws in every layer).
``save_ensemble_1m``
    ``bayesdl.save`` of a 5-member ``DeepEnsemble`` of a 64-1000-900-2 MLP (967,702 weights per
    member, 19 MB of float32) to a temporary folder, against ``safetensors.torch.save_file`` of
    the same tensors (``post.state_dict()``, contiguous) to the same folder. ``bayesdl.save``
    also writes the JSON header and a checksum over every byte, and fsyncs a temporary file
    before renaming it into place.
``load_ensemble_1m``
    ``bayesdl.load`` of that file (a posterior ready to predict: every byte read and checked)
    against ``safetensors.torch.load_file`` of the same file with every tensor cloned (touching
    every byte). ``load_file`` alone maps the file lazily and reads almost nothing, so the row
    also reports the ratio against it (``extra_ratios``, printed under the table).

A case may time further baselines beside the main one (``extra_baselines`` in its info); their
seconds and ratios go into the row as ``extra_seconds`` and ``extra_ratios``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

import bayesdl as bdl
from bayesdl.posteriors.stacked import joint_draws

__all__ = ["all_cases", "main", "time_pair"]

Timed = Callable[[], object]
CaseBuilder = Callable[[bool, torch.device], tuple[Timed, Timed, dict]]

DEFAULT_REPEATS = 5
QUICK_REPEATS = 2
SEED = 0


# ----------------------------------------------------------------------------- timing
def time_interleaved(
    fns: Sequence[Timed], repeats: int, device: torch.device | None = None
) -> list[float]:
    """Median seconds of each of ``fns`` over ``repeats`` interleaved rounds.

    One warm-up call of each comes first (untimed); then ``A B C A B C ...``. The garbage
    collector runs before each call, outside the timed interval, so a collection triggered by
    one call's garbage does not land in another's time.
    """

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns:
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            gc.collect()
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def time_pair(
    method: Timed, baseline: Timed, repeats: int, device: torch.device | None = None
) -> tuple[float, float]:
    """Median seconds of ``method`` and of ``baseline`` over ``repeats`` interleaved calls
    ``A B A B ...``, after one warm-up call of each (see :func:`time_interleaved`)."""
    seconds, base = time_interleaved((method, baseline), repeats, device)
    return seconds, base


# ----------------------------------------------------------------------------- fixtures
def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under a fixed torch seed, without touching the global generator's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _regression_net() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 50), nn.ReLU(), nn.Linear(50, 2))


def _regression_dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 50), nn.ReLU(), nn.Dropout(0.1), nn.Linear(50, 2))


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(hidden, 10),
    )


def _regression_data(n: int, seed: int = SEED) -> tuple[Tensor, Tensor]:
    """``n`` points of a noisy linear-plus-sine function of 13 standard-normal features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 13, generator=g)
    w = torch.randn(13, generator=g) / 13**0.5
    y = x @ w + 0.5 * torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=g)
    return x, (y - y.mean()) / y.std()


def _forward_loop(net: nn.Module, x: Tensor, n: int, *, train_mode: bool) -> Timed:
    """``n`` forward passes of ``net`` in a Python loop, stacked to ``(n, B, K)`` like a method."""

    def run() -> Tensor:
        net.train(train_mode)
        with torch.no_grad():
            return torch.stack([net(x) for _ in range(n)])

    return run


# ----------------------------------------------------------------------------- cases
def case_ensemble_train_small(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
    n_points, epochs, n_members = (64, 2, 5) if quick else (455, 40, 5)
    x, y = (t.to(device) for t in _regression_data(n_points))
    settings = dict(epochs=epochs, batch_size=32, lr=1e-3, seed=SEED, progress=False)

    def method() -> None:
        net = _seeded(SEED, _regression_net).to(device)
        bdl.DeepEnsemble(net, "gaussian", n_members=n_members, seed=SEED).fit((x, y), **settings)

    def baseline() -> None:
        bdl.Deterministic(_seeded(SEED, _regression_net).to(device), "gaussian").fit(
            (x, y), **settings
        )

    info = {
        "target": 1.5,
        "baseline": "Deterministic.fit of one member (same net, data and settings)",
        "n_members": n_members,
        "n_points": n_points,
        "epochs": epochs,
        "batch_size": 32,
    }
    return method, baseline, info


def case_ensemble_train_small_homoscedastic(
    quick: bool, device: torch.device
) -> tuple[Timed, Timed, dict]:
    """``ensemble_train_small`` with one noise variance per member (the homoscedastic
    Gaussian, a 13-50-1 net): the members run on the stacked fast path and the likelihood's
    link under vmap. Also timed: the same ensemble with the fast path off (all of it under
    vmap, the route such a likelihood took before)."""
    n_points, epochs, n_members = (64, 2, 5) if quick else (455, 40, 5)
    x, y = (t.to(device) for t in _regression_data(n_points))
    settings = dict(epochs=epochs, batch_size=32, lr=1e-3, seed=SEED, progress=False)

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(13, 50), nn.ReLU(), nn.Linear(50, 1))

    def ensemble(fast: bool) -> None:
        post = bdl.DeepEnsemble(
            _seeded(SEED, net).to(device), "homoscedastic_gaussian", n_members=n_members, seed=SEED
        )
        post._stack.fast_path = fast
        post.fit((x, y), **settings)

    def baseline() -> None:
        plain = bdl.Deterministic(_seeded(SEED, net).to(device), "homoscedastic_gaussian")
        plain.fit((x, y), **settings)

    info = {
        "target": 1.5,
        "baseline": "Deterministic.fit of one member (same net, likelihood, data and settings)",
        "n_members": n_members,
        "n_points": n_points,
        "epochs": epochs,
        "batch_size": 32,
        "extra_baselines": {
            "vmap_route": (lambda: ensemble(False), "the same ensemble with the fast path off")
        },
    }
    return (lambda: ensemble(True)), baseline, info


def case_mc_dropout_predict_10k(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
    n_samples, batch = (200, 51) if quick else (10_000, 51)
    net = _seeded(SEED, _regression_dropout_net).to(device)
    post = bdl.MCDropout(net, "gaussian")
    x = torch.randn(batch, 13, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    generator = torch.Generator(device=device).manual_seed(SEED)

    def method() -> Tensor:
        with torch.no_grad():
            return post.sample_outputs(x, n_samples, generator=generator)

    info = {
        "target": 0.2,
        "baseline": f"loop of {n_samples} forward passes, net.train(), torch.no_grad()",
        "n_samples": n_samples,
        "batch": batch,
    }
    return method, _forward_loop(net, x, n_samples, train_mode=True), info


def _plain_mlp(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def _epoch_case(quick: bool, device: torch.device, build, target: float):
    """``build(net)``'s ``fit`` for one epoch against a plain network's, on 784-d inputs of
    random classes (``(posterior, net description, data description)`` and the info)."""
    n, hidden = (512, 64) if quick else (10_000, 400)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(n, 784, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    post = build(_seeded(SEED, lambda: _plain_mlp(hidden)).to(device))
    det = bdl.Deterministic(_seeded(SEED, lambda: _plain_mlp(hidden)).to(device), "categorical")
    info = {
        "target": target,
        "baseline": "one Deterministic.fit epoch of the same net (Adam), same data",
        "data": f"{n} synthetic 784-d inputs, 10 random classes",
        "net": f"784-{hidden}-{hidden}-10",
        "batch_size": 128,
    }
    return post, det, (x, y), info


def case_vi_train_epoch_mlp(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
    vi, det, data, info = _epoch_case(
        quick, device, lambda net: bdl.MeanFieldVI(net, "categorical"), 1.6
    )
    info["weight_draws_per_step"] = 1
    settings = dict(epochs=1, batch_size=128, lr=1e-3, seed=SEED, progress=False)
    return (lambda: vi.fit(data, **settings)), (lambda: det.fit(data, **settings)), info


def case_ivon_train_epoch_mlp(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
    """One IVON epoch against one plain epoch of the same net: the cost of variational learning
    with IVON's update (one weight draw and one backward per step, no KL term); the target is
    "near deterministic"."""
    ivon, det, data, info = _epoch_case(
        quick, device, lambda net: bdl.IVON(net, "categorical"), 1.3
    )
    settings = dict(epochs=1, batch_size=128, seed=SEED, progress=False)
    return (
        lambda: ivon.fit(data, lr=0.1, **settings),
        lambda: det.fit(data, lr=1e-3, **settings),
        info,
    )


def _other_library_vi(kind: str, x: Tensor, y: Tensor, epochs: int) -> Timed | None:
    """The same 13-50-2 Gaussian-NLL training with another library's Bayesian layers."""
    try:
        if kind == "bayesian_torch":
            from bayesian_torch.layers import LinearReparameterization as Layer
        else:
            from blitz.modules import BayesianLinear as Layer
    except ImportError:
        return None

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = Layer(13, 50), Layer(50, 2)

        def forward(self, inp: Tensor) -> tuple[Tensor, Tensor]:
            if kind == "bayesian_torch":
                h, kl_a = self.a(inp)
                out, kl_b = self.b(torch.relu(h))
                return out, kl_a + kl_b
            out = self.b(torch.relu(self.a(inp)))
            return out, self.a.log_variational_posterior - self.a.log_prior + (
                self.b.log_variational_posterior - self.b.log_prior
            )

    def run() -> None:
        net = _seeded(SEED, Net)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(SEED)
        n = len(x)
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=g).split(32):
                out, kl = net(x[idx])
                var = out[:, 1].exp() + 1e-6
                nll = 0.5 * ((y[idx] - out[:, 0]) ** 2 / var + var.log()).mean()
                opt.zero_grad()
                (nll + kl / n).backward()
                opt.step()

    return run


def _vi_train_small_case(kind: str) -> CaseBuilder:
    def case(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
        n_points, epochs = (64, 2) if quick else (455, 40)
        x, y = _regression_data(n_points)
        settings = dict(epochs=epochs, batch_size=32, lr=1e-3, seed=SEED, progress=False)

        def ours() -> None:
            net = _seeded(SEED, _regression_net)
            bdl.MeanFieldVI(net, "gaussian").fit((x, y), **settings)

        def baseline() -> None:
            bdl.Deterministic(_seeded(SEED, _regression_net), "gaussian").fit((x, y), **settings)

        method = ours if kind == "bayesdl" else _other_library_vi(kind, x, y, epochs)
        info = {
            "target": None,
            "baseline": "Deterministic.fit of the same 13-50-2 net (same data and settings)",
            "library": kind,
            "n_points": n_points,
            "epochs": epochs,
            "batch_size": 32,
        }
        return method, baseline, info

    return case


def _swag_with_trajectory(net: nn.Module) -> bdl.Posterior:
    """SWAG after a full rank-20 trajectory (20 epochs on 64 random inputs), so that its draws
    cost what they cost after a real fit (the fit is not timed)."""
    g = torch.Generator().manual_seed(SEED)
    device = next(net.parameters()).device
    x, y = torch.randn(64, 784, generator=g).to(device), torch.randint(10, (64,), generator=g)
    post = bdl.SWAG(net, "categorical", rank=20, swa_start=0)
    post.fit((x, y.to(device)), epochs=20, batch_size=64, seed=SEED, progress=False)
    return post


def _sgmcmc_with_samples(net: nn.Module, n_samples: int) -> bdl.Posterior:
    """SG-MCMC holding ``n_samples`` kept samples: one per full-batch step on 64 random inputs
    (the chain is not timed; its draws cost the same whatever the weights)."""
    g = torch.Generator().manual_seed(SEED)
    device = next(net.parameters()).device
    x, y = torch.randn(64, 784, generator=g).to(device), torch.randint(10, (64,), generator=g)
    post = bdl.SGMCMC(net, "categorical", n_kept=n_samples, burn_in=0.0, thin=1)
    post.fit((x, y.to(device)), epochs=n_samples, batch_size=64, lr=1e-3, seed=SEED)
    return post


def _laplace_inputs(n: int, device: torch.device, seed: int = SEED) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 784, generator=g), torch.randint(10, (n,), generator=g)
    return x.to(device), y.to(device)


def _laplace_fitted(net: nn.Module, n_fit: int = 256) -> bdl.Posterior:
    """Last-layer KFAC Laplace of ``net`` fitted on ``n_fit`` random inputs (not timed)."""
    device = next(net.parameters()).device
    post = bdl.Laplace(net, "categorical", subset="last_layer", hessian="kron")
    post.fit(_laplace_inputs(n_fit, device, SEED + 2))
    return post


_LAPLACE_NET = "randomly initialised, untrained (a fit's cost does not depend on the weights)"


def case_laplace_fit_last_layer_kron(
    quick: bool, device: torch.device
) -> tuple[Timed, Timed, dict]:
    n, hidden = (512, 64) if quick else (10_000, 400)
    x, y = _laplace_inputs(n, device)
    net = _seeded(SEED, lambda: _plain_mlp(hidden)).to(device)
    post = bdl.Laplace(net, "categorical", subset="last_layer", hessian="kron")

    def baseline() -> Tensor:
        net.eval()
        with torch.no_grad():
            return net(x)

    info = {
        "target": 1.5,
        "baseline": f"one forward pass of the same net over the same {n} inputs (eval, no_grad)",
        "timed": "Laplace.fit((x, y)): features once, KFAC factors, marginal-likelihood prior",
        "n_points": n,
        "net": f"784-{hidden}-{hidden}-10, {_LAPLACE_NET}",
    }
    return (lambda: post.fit((x, y))), baseline, info


def case_laplace_predict_glm(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
    n_passes = 100
    batch, hidden = (50, 64) if quick else (1000, 400)
    post = _laplace_fitted(_seeded(SEED, lambda: _plain_mlp(hidden)).to(device))
    x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    info = {
        "target": 0.05,
        "baseline": f"loop of {n_passes} forward passes, net.eval(), torch.no_grad()",
        "timed": "Laplace.predictive_probs(x): linearised (GLM) predictive, probit, KFAC",
        "batch": batch,
        "net": f"784-{hidden}-{hidden}-10, {_LAPLACE_NET}",
    }
    baseline = _forward_loop(post.model, x, n_passes, train_mode=False)
    return (lambda: post.predictive_probs(x)), baseline, info


def _fitted_ensemble(quick: bool, device: torch.device) -> tuple[bdl.Posterior, dict]:
    """A 5-member Gaussian ``DeepEnsemble`` of a ``bayesdl.models.mlp`` with 64 inputs, after one
    epoch on 8 random points (so it records its input shape, as a fitted one does)."""
    n_in, hidden, n_members = (64, (32, 32), 5) if quick else (64, (1000, 900), 5)
    net = _seeded(SEED, lambda: bdl.models.mlp(n_in, 2, hidden=hidden)).to(device)
    post = bdl.DeepEnsemble(net, "gaussian", n_members=n_members, seed=SEED)
    g = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(8, n_in, generator=g), torch.randn(8, generator=g)
    post.fit((x.to(device), y.to(device)), epochs=1, batch_size=8, seed=SEED, progress=False)
    n_weights = sum(p.numel() for p in net.parameters())
    info = {
        "net": f"{'-'.join(map(str, (n_in, *hidden, 2)))} (bayesdl.models.mlp), "
        f"{n_weights:,} weights per member",
        "n_members": n_members,
    }
    return post, info


def _temporary_folder(owner: Timed) -> str:
    """A new empty folder, removed with its files when ``owner`` is garbage collected (or at
    exit), so a case's files live exactly as long as its timed functions."""
    folder = tempfile.mkdtemp(prefix="bayesdl-bench-")
    weakref.finalize(owner, shutil.rmtree, folder, ignore_errors=True)
    return folder


def case_save_ensemble_1m(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
    from safetensors.torch import save_file

    post, info = _fitted_ensemble(quick, device)

    def method() -> None:
        bdl.save(post, ours)

    def baseline() -> None:
        save_file({k: v.contiguous() for k, v in post.state_dict().items()}, plain)

    folder = _temporary_folder(method)
    ours, plain = (os.path.join(folder, f"{n}.safetensors") for n in ("model", "plain"))
    method()
    info |= {
        "target": 1.5,
        "baseline": "safetensors.torch.save_file of post.state_dict() (contiguous), same folder",
        "timed": "bayesdl.save(post, path): header, checksum of every byte, temporary file, "
        "fsync, rename",
        "file_bytes": os.path.getsize(ours),
    }
    return method, baseline, info


def case_load_ensemble_1m(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
    from safetensors.torch import load_file

    def method() -> bdl.Posterior:
        return bdl.load(path, map_location=device)

    def baseline() -> dict[str, Tensor]:
        return {k: v.clone() for k, v in load_file(path, device=str(device)).items()}

    def lazy() -> dict[str, Tensor]:
        return load_file(path, device=str(device))

    path = os.path.join(_temporary_folder(method), "model.safetensors")
    post, info = _fitted_ensemble(quick, device)
    bdl.save(post, path)
    loaded = method().state_dict()  # what is timed gives the saved weights back (untimed check)
    if loaded.keys() != post.state_dict().keys() or not all(
        torch.equal(loaded[k], v) for k, v in post.state_dict().items()
    ):
        raise RuntimeError("bayesdl.load did not return the saved weights; not timing it.")
    info |= {
        "target": 1.5,
        "baseline": "safetensors.torch.load_file of the same file, every tensor cloned "
        "(every byte read)",
        "timed": "bayesdl.load(path): read and verify the file, build the network and the "
        "ensemble, load the weights",
        "file_bytes": os.path.getsize(path),
        "extra_baselines": {
            "lazy_load_file": (
                lazy,
                "safetensors.torch.load_file alone: maps the file, reads its bytes on first use",
            )
        },
    }
    return method, baseline, info


# How to build each registered method for ``mlp_predict_s100_<method>`` given the net and S (the
# constructor arguments); a registered method missing here is skipped with a note, so a new
# method gets its row by adding one line.
MLP_BUILDERS: dict[str, Callable[[nn.Module, int], bdl.Posterior]] = {
    "mc_dropout": lambda net, s: bdl.MCDropout(net, "categorical"),
    # S draws of an ensemble are its S members.
    "deep_ensemble": lambda net, s: bdl.DeepEnsemble(net, "categorical", n_members=s, seed=SEED),
    "mean_field_vi": lambda net, s: bdl.MeanFieldVI(net, "categorical"),
    "swag": lambda net, s: _swag_with_trajectory(net),
    "laplace": lambda net, s: _laplace_fitted(net),  # GLM draws, last-layer KFAC
    # S draws are the S kept samples of the chain, stacked like an ensemble's members.
    "sgmcmc": lambda net, s: _sgmcmc_with_samples(net, s),
    "ivon": lambda net, s: bdl.IVON(net, "categorical"),  # Gaussian draws, as mean-field VI
}


def _whole_weight_draws(post: bdl.Posterior, x: Tensor, n: int, generator) -> Timed:
    """``post.sample_outputs`` with whole weight sets in every layer."""

    def run() -> Tensor:
        with torch.no_grad(), joint_draws(post):
            return post.sample_outputs(x, n, generator=generator)

    return run


def _mlp_case(name: str) -> CaseBuilder:
    def case(quick: bool, device: torch.device) -> tuple[Timed, Timed, dict]:
        n_samples, batch, hidden = (10, 50, 64) if quick else (100, 1000, 400)
        post = MLP_BUILDERS[name](_seeded(SEED, lambda: _mlp(hidden)).to(device), n_samples)
        floor_net = _seeded(SEED, lambda: _mlp(hidden)).to(device)
        x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(SEED + 1)).to(device)
        generator = torch.Generator(device=device).manual_seed(SEED)

        def method() -> Tensor:
            with torch.no_grad():
                return post.sample_outputs(x, n_samples, generator=generator)

        info = {
            "target": 1.15,
            "baseline": f"loop of {n_samples} forward passes, net.eval(), torch.no_grad()",
            "n_samples": n_samples,
            "batch": batch,
            "net": f"784-{hidden}-{hidden}-10",
        }
        if hasattr(post, "prediction_noise"):  # what the local trick in the first layer buys
            info["prediction_noise"] = post.prediction_noise.value
            info["extra_baselines"] = {
                "whole_weight_draws": (
                    _whole_weight_draws(post, x, n_samples, generator),
                    "the same method with prediction_noise='weights'",
                )
            }
        return method, _forward_loop(floor_net, x, n_samples, train_mode=False), info

    return case


def all_cases() -> tuple[dict[str, CaseBuilder], list[str]]:
    """Every case by name (the S-draw case once per registered method), and skip notes."""
    cases: dict[str, CaseBuilder] = {
        "ensemble_train_small": case_ensemble_train_small,
        "ensemble_train_small_homoscedastic": case_ensemble_train_small_homoscedastic,
        "mc_dropout_predict_10k": case_mc_dropout_predict_10k,
        "vi_train_epoch_mlp": case_vi_train_epoch_mlp,
        "ivon_train_epoch_mlp": case_ivon_train_epoch_mlp,
        "vi_train_small": _vi_train_small_case("bayesdl"),
        "laplace_fit_last_layer_kron": case_laplace_fit_last_layer_kron,
        "laplace_predict_glm": case_laplace_predict_glm,
        "save_ensemble_1m": case_save_ensemble_1m,
        "load_ensemble_1m": case_load_ensemble_1m,
    }
    for kind in ("bayesian_torch", "blitz"):  # comparison rows when the libraries are there
        if _vi_train_small_case(kind)(True, torch.device("cpu"))[0] is not None:
            cases[f"vi_train_small_{kind}"] = _vi_train_small_case(kind)
    notes = []
    for name in bdl.available_posteriors():
        if name == "deterministic":
            continue
        if name in MLP_BUILDERS:
            cases[f"mlp_predict_s100_{name}"] = _mlp_case(name)
        else:
            notes.append(
                f"mlp_predict_s100_{name} skipped: no entry for {name!r} in "
                "benchmarks.speed.MLP_BUILDERS (how to build it for S=100 draws)."
            )
    return cases, notes


def run_case(
    name: str, build: CaseBuilder, quick: bool, repeats: int, device: torch.device | None = None
) -> dict:
    device = device or torch.device("cpu")
    method, baseline, info = build(quick, device)
    info = dict(info)
    extra = info.pop("extra_baselines", {})
    seconds, base, *others = time_interleaved(
        (method, baseline, *(fn for fn, _ in extra.values())), repeats, device
    )
    row = {
        "name": name,
        "seconds": seconds,
        "baseline_seconds": base,
        "ratio": seconds / base,
        **info,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "device": str(device),
    }
    if extra:
        row["extra_baselines"] = {label: text for label, (_, text) in extra.items()}
        row["extra_seconds"] = dict(zip(extra, others, strict=True))
        row["extra_ratios"] = {label: seconds / t for label, t in zip(extra, others, strict=True)}
    row["met"] = None if row["target"] is None else row["ratio"] <= row["target"]
    return row


# ----------------------------------------------------------------------------- output
def _target(target: float | None) -> str:
    return "-" if target is None else f"{target:.2f}"


def _status(met: bool | None) -> str:
    return "report" if met is None else ("ok" if met else "MISSED")


def format_table(result: dict, notes: list[str], quick: bool) -> str:
    head = (
        f"bayesdl speed benchmark: torch {result['torch']}, {result['device']}, "
        f"{result['threads']} threads"
    )
    lines = [head]
    if quick:
        lines.append("QUICK mode: sizes shrunk for the test suite; ratios say nothing of targets.")
    cols = f"{'case':<30} {'seconds':>10} {'baseline':>10} {'ratio':>7} {'target':>7}  status"
    lines += [cols, "-" * len(cols)]
    for r in result["cases"]:
        lines.append(
            f"{r['name']:<30} {r['seconds']:>10.4f} {r['baseline_seconds']:>10.4f} "
            f"{r['ratio']:>7.3f} {_target(r['target']):>7}  {_status(r['met'])}"
        )
    lines += [f"note: {n}" for n in notes]
    lines.append("baselines:")
    for r in result["cases"]:
        lines.append(f"  {r['name']}: {r['baseline']}")
        for label, text in r.get("extra_baselines", {}).items():
            lines.append(f"    also against {label} ({text}): ratio {r['extra_ratios'][label]:.3f}")
    return "\n".join(lines)


def _parse(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--repeats", type=int, help="timed repeats of each side (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's own choice)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}.")
    if args.cases is None:
        args.cases = names
    else:
        args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in args.cases if c not in names]
        if unknown or not args.cases:
            parser.error(f"unknown case(s) {unknown or args.cases}; choose from {names}.")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table (or JSON) and return the JSON dict."""
    cases, notes = all_cases()
    args = _parse(argv, list(cases))
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [run_case(name, cases[name], args.quick, repeats, device) for name in args.cases]
    result = {
        "cases": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if args.json:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result, notes, args.quick))
    return result


if __name__ == "__main__":
    main()
