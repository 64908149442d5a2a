"""Agent files: a bandit agent, its posterior and its replay buffer in one safetensors file.

The file is written atomically and checksummed like a model file (:mod:`bayesdl.files`); it
holds the posterior as a model file does (:func:`bayesdl.io.model_payload`), the agent's
options and counters in the JSON header, and its buffer (or, for :class:`LinearThompson`, its
sufficient statistics) as tensors under ``agent.*``. A loaded agent continues where the saved
one stopped: the same next refit, on the same buffer.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from bayesdl.bandits.agents import Agent, LinearThompson, PosteriorAgent, Uniform
from bayesdl.files import ModelFileError, read_file, write_file
from bayesdl.io import model_payload, posterior_from_payload

__all__ = ["load_agent", "save_agent"]

_KIND = "bandit_agent"
_AGENTS: dict[str, type[Agent]] = {
    "posterior": PosteriorAgent,
    "linear_thompson": LinearThompson,
    "uniform": Uniform,
}
_PREFIX = "agent."


def save_agent(agent: Agent, path: str | os.PathLike) -> None:
    """Write ``agent`` (with its posterior and buffer) to ``path`` atomically.

    The folder must exist; a process killed while saving leaves the old file or the new one.
    """
    kinds = {cls: name for name, cls in _AGENTS.items()}
    if type(agent) not in kinds:
        raise TypeError(
            f"save_agent saves {', '.join(c.__name__ for c in kinds)}; got {type(agent).__name__}."
        )
    options, state, tensors = agent._agent_state()
    header = {"agent": kinds[type(agent)], "options": options, "state": state, "model": None}
    files = {_PREFIX + k: v for k, v in tensors.items()}
    if isinstance(agent, PosteriorAgent):
        model_header, model_tensors = model_payload(agent.posterior)
        header["model"] = model_header
        files.update(model_tensors)
    write_file(path, _KIND, header, files)


def load_agent(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    map_location: torch.device | str | None = None,
) -> Agent:
    """The agent saved at ``path`` by :func:`save_agent`, ready to act and learn on.

    ``model`` and ``map_location`` are those of :func:`bayesdl.load`: pass the module for a
    posterior over a network of your own (a network from :func:`~bayesdl.bandits.reward_model`
    is rebuilt from the file).
    """
    header, tensors = read_file(path, _KIND)
    path = os.fspath(path)
    name = header.get("agent")
    if name not in _AGENTS:
        raise ModelFileError(f"{path!r} holds an agent of unknown kind {name!r}.")
    options, state = header.get("options"), header.get("state")
    if not isinstance(options, dict) or not isinstance(state, dict):
        raise ModelFileError(f"{path!r} has a bad agent header.")
    own: dict[str, Tensor] = {
        k.removeprefix(_PREFIX): tensors.pop(k) for k in list(tensors) if k.startswith(_PREFIX)
    }
    try:
        if name == "posterior":
            model_header = header.get("model")
            if not isinstance(model_header, dict):
                raise ModelFileError(f"{path!r} has no posterior in its header.")
            model_header = {**model_header, "format_version": header["format_version"]}
            posterior = posterior_from_payload(model_header, tensors, path, model, map_location)
            agent = PosteriorAgent(posterior, **options)
        else:
            if tensors:
                raise ModelFileError(f"{path!r} holds tensors bayesdl does not know.")
            agent = _AGENTS[name](**options)
        agent._load_agent_state(state, own)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        if isinstance(err, ModelFileError):
            raise
        raise ModelFileError(
            f"{path!r} holds an agent this bayesdl cannot rebuild: {err}"
        ) from None
    return agent
