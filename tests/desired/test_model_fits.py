"""A model too big for every GPU type a role allows is refused by validate, at the
policy's `model.params_b` line, with the arithmetic: the planner could only hold such
a service, and the simulated fleet would serve nothing. Where only some of a role's
types fit, validate warns and passes. The judgement is the planner's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from repo_edits import edit, line_of, problems
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import load_desired_state
from reconciler.desired.checks import check_model_fits
from reconciler.policy.gpu_economics import perf_context

runner = CliRunner()


def set_params(repo: Path, params_b: str) -> Path:
    policy = repo / "policies/chat.yaml"
    edit(policy, "  params_b: 70.6", f"  params_b: {params_b}")
    return policy


def set_gpus(repo: Path, role: str, gpus: int) -> None:
    edit(
        repo / "policies/chat.yaml",
        f"{role}:\n  gpus_per_instance: 4",
        f"{role}:\n  gpus_per_instance: {gpus}",
    )


def test_a_model_no_allowed_type_of_either_role_holds_is_refused_with_its_numbers(
    example_repo: Path,
) -> None:
    policy = set_params(example_repo, "200")
    where = f"policies/chat.yaml:{line_of(policy, 'params_b: 200')}:3: model.params_b"
    weights = "372.5 GiB of weights (200 B parameters x 2 bytes)"
    kv = "0.3 GiB for 1,024 tokens of KV cache = 372.8 GiB"
    derived = "(90% of each GPU's memory less 1.5 GiB per GPU for activations)"
    assert problems(example_repo) == [
        f"{where}: no allowed prefill GPU type holds the model at 4 GPUs per instance "
        f"(prefill.gpus_per_instance): it needs {weights} + {kv}; an instance holds "
        f"282.0 GiB on h800 {derived}; allow a larger GPU type or more GPUs per instance",
        f"{where}: no allowed decode GPU type holds the model at 4 GPUs per instance "
        f"(decode.gpus_per_instance): it needs {weights} + {kv}; an instance holds "
        f"339.6 GiB on h20, 282.0 GiB on h800 {derived}; allow a larger GPU type or more "
        "GPUs per instance",
    ]


def test_the_command_refuses_it_without_a_traceback(example_repo: Path) -> None:
    set_params(example_repo, "405")
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 1, result.output
    assert "754.4 GiB of weights (405 B parameters x 2 bytes)" in result.output
    assert "Traceback" not in result.output


def test_only_the_role_that_nothing_holds_is_refused(example_repo: Path) -> None:
    # 160 B: 298 GiB of weights fit a 4-GPU H20 instance (339.6 GiB), not an H800 one.
    set_params(example_repo, "160")
    [message] = problems(example_repo)
    assert "model.params_b: no allowed prefill GPU type holds the model" in message


def test_more_gpus_per_instance_make_a_large_model_fit(example_repo: Path) -> None:
    set_params(example_repo, "200")
    set_gpus(example_repo, "prefill", 8)
    set_gpus(example_repo, "decode", 8)
    assert load_desired_state(example_repo).policies["chat"].model.params_b == 200


def test_an_allowed_type_that_cannot_hold_the_model_is_warned_where_another_can(
    example_repo: Path,
) -> None:
    set_params(example_repo, "160")
    set_gpus(example_repo, "prefill", 8)
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stderr.splitlines() if "cannot hold" in line]
    policy = example_repo / "policies/chat.yaml"
    line = line_of(policy, "gpu_types: {h20")  # decode's
    assert warning.startswith(
        f"warning: policies/chat.yaml:{line}:3: decode.gpu_types: decode GPU type h800 cannot "
        "hold the model at 4 GPUs per instance: it needs 298.0 GiB of weights (160 B "
        "parameters x 2 bytes)"
    )
    assert warning.endswith(
        "the role is sized on h20, and an instance placed on a type that does not fit cannot serve"
    )


def test_the_example_repository_raises_no_fit_warning(repo_root: Path) -> None:
    result = runner.invoke(app, ["validate", str(repo_root)])
    assert result.exit_code == 0, result.output
    assert "cannot hold" not in result.stderr


@pytest.mark.parametrize("params_b", [8.0, 70.6, 150.0, 160.0, 200.0, 405.0, 100_000.0])
def test_validate_refuses_exactly_the_policies_the_planner_cannot_size(
    repo_root: Path, params_b: float
) -> None:
    state = load_desired_state(repo_root)
    for policy in state.policies.values():
        model = policy.model.model_copy(update={"params_b": params_b})
        resized = policy.model_copy(update={"model": model})
        cluster = state.clusters[policy.cluster]
        refused = bool(check_model_fits(resized, cluster))
        assert refused == (perf_context(resized, cluster) is None), (policy.name, params_b)
