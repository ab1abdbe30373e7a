"""Bad input: every problem comes back as `file:line:column: field: message`, all at
once, with exit code 1 and no traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from repo_edits import edit, line_of, problems
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import load_desired_state

runner = CliRunner()


def test_a_wrong_value_names_file_line_column_field_and_value(example_repo: Path) -> None:
    policy = example_repo / "policies/svc-a.yaml"
    edit(policy, "tbt_ms: 40", "tbt_ms: -20")
    line = line_of(policy, "tbt_ms: -20")
    assert problems(example_repo) == [
        f"policies/svc-a.yaml:{line}:3: slo.tbt_ms: must be greater than 0 (got -20)"
    ]


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        (
            "max_instances: 256",
            "max_instances: true",
            "prefill.max_instances",
            "must be a whole number, not true",
        ),
        ("ttft_ms: 1000", 'ttft_ms: "1000"', "slo.ttft_ms", "must be a number, not a string"),
        ("priority: 400", "priority: 4e2", "priority", "must be a whole number, not a fraction"),
    ],
)
def test_a_number_field_takes_a_number_only_not_what_lax_parsing_would_make_of_it(
    example_repo: Path, old: str, new: str, field: str, message: str
) -> None:
    edit(example_repo / "policies/svc-b.yaml", old, new)
    [found] = problems(example_repo)
    assert found.startswith(
        f"policies/svc-b.yaml:{line_of(example_repo / 'policies/svc-b.yaml', new)}:"
    )
    assert f" {field}: {message}" in found


def test_a_whole_number_is_a_number_and_a_ratio_still_reads_its_own_forms(
    example_repo: Path,
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, "cost_per_hour: 2.50", "cost_per_hour: 3")
    edit(example_repo / "policies/svc-b.yaml", "ttft_ms: 1000", "ttft_ms: 1000.0")
    state = load_desired_state(example_repo)
    assert state.clusters["prod-east"].gpu_types["h800"].cost_per_hour == 3
    assert state.policies["svc-b"].slo.ttft_ms == 1000
    assert state.policies["svc-b"].pd_ratio.target == 3 / 5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1e308", "a P/D ratio must lie between 1:1000 and 1000:1 (got 1e+308)"),
        ('"3:0"', "a P/D ratio needs decode instances (D > 0) (got '3:0')"),
        ('"' + "x" * 800 + '"', "a P/D ratio is 'P:D' (e.g. '1:3') or a number (got 'xxx"),
    ],
    ids=["out of range", "no decode", "800 characters"],
)
def test_a_bad_ratio_is_quoted_once_and_cut(example_repo: Path, value: str, message: str) -> None:
    policy = example_repo / "policies/svc-b.yaml"
    edit(policy, 'target: "3:5"', f"target: {value}")
    [found] = problems(example_repo)
    assert f"pd_ratio.target: {message}" in found
    assert found.count("(got ") == 1 and len(found) < 400


def test_a_wrong_type_is_reported_with_the_value_given(example_repo: Path) -> None:
    edit(
        example_repo / "policies/svc-b.yaml",
        "min_instances: 2\n  max_instances: 256",
        "min_instances: lots\n  max_instances: 256",
    )
    [message] = problems(example_repo)
    assert re.fullmatch(
        r"policies/svc-b.yaml:\d+:3: prefill.min_instances: must be a whole number, not a string.*\(got 'lots'\)",
        message,
    )


def test_the_least_headroom_is_a_fraction_from_0_to_4(example_repo: Path) -> None:
    edit(
        example_repo / "policies/chat.yaml",
        "  tolerance: 0.1",
        "  tolerance: 0.1\n  min_headroom: 5",
    )
    [message] = problems(example_repo)
    assert message.endswith("scaling.min_headroom: must be less than or equal to 4 (got 5)")
    edit(example_repo / "policies/chat.yaml", "  min_headroom: 5", "  min_headroom: 0.8")
    chat = load_desired_state(example_repo).policies["chat"]
    assert chat.scaling.min_headroom == 0.8
    assert load_desired_state(example_repo).policies["svc-a"].scaling.min_headroom == 0.1


def test_an_unknown_key_suggests_the_closest_field(example_repo: Path) -> None:
    edit(example_repo / "policies/chat.yaml", "  tolerance: 0.1", "  tolerence: 0.1")
    [message] = problems(example_repo)
    assert message.endswith("scaling.tolerence: unknown key 'tolerence'; did you mean 'tolerance'?")


def test_an_unknown_key_in_a_cluster_file_suggests_too(example_repo: Path) -> None:
    edit(example_repo / "clusters/prod-east.yaml", "    memory_gib: 96", "    memory_gb: 96")
    missing, unknown = problems(example_repo)
    assert missing.endswith("gpu_types.h20.memory_gib: required field is missing")
    assert unknown.endswith(
        "gpu_types.h20.memory_gb: unknown key 'memory_gb'; did you mean 'memory_gib'?"
    )


def test_a_missing_required_field_is_named(example_repo: Path) -> None:
    edit(example_repo / "policies/svc-a.yaml", "  ttft_ms: 1000\n", "")
    [message] = problems(example_repo)
    assert re.fullmatch(
        r"policies/svc-a.yaml:\d+:1: slo.ttft_ms: required field is missing", message
    )


def test_a_reference_to_an_unknown_cluster_suggests_the_known_one(example_repo: Path) -> None:
    edit(example_repo / "policies/svc-a.yaml", "cluster: prod-east", "cluster: prod-eats")
    [message] = problems(example_repo)
    assert message.endswith("cluster: unknown cluster 'prod-eats'; did you mean 'prod-east'?")


def test_a_reference_to_an_unknown_gpu_type_is_located(example_repo: Path) -> None:
    edit(
        example_repo / "policies/svc-b.yaml",
        "gpu_types: {h20: 1.0, h800: 0.6}",
        "gpu_types: {h20: 1.0, h100: 0.6}",
    )
    [message] = problems(example_repo)
    assert "decode.gpu_types.h100: unknown GPU type in cluster 'prod-east' 'h100'" in message


def test_a_pinned_gpu_type_without_a_node_in_the_cluster_is_located(example_repo: Path) -> None:
    """A type the catalogue knows but no node has: a role pinned to it never places."""
    edit(
        example_repo / "clusters/prod-east.yaml",
        "  l20:\n",
        "  b200:\n    memory_gib: 192\n    bf16_tflops: 2250\n    memory_bandwidth_gbps: 8000\n"
        "    interconnect: nvlink-1800\n    cost_per_hour: 5.0\n  l20:\n",
    )
    svc_b = example_repo / "policies/svc-b.yaml"
    edit(svc_b, "gpu_types: {h800: 1.0}", "gpu_types: {b200: 1.0}")
    line = line_of(svc_b, "gpu_types: {b200: 1.0}")
    assert problems(example_repo) == [
        f"policies/svc-b.yaml:{line}:3: prefill.gpu_types: no node of cluster 'prod-east' has "
        "GPU type 'b200': the prefill role can never be placed"
    ]


def test_an_instance_larger_than_every_node_of_its_type_is_located(example_repo: Path) -> None:
    """Checked against each GPU type's largest node, indexed once per cluster."""
    edit(example_repo / "clusters/prod-east.yaml", "gpus_per_node: 8", "gpus_per_node: 2")
    chat = example_repo / "policies/chat.yaml"
    lines = chat.read_text().splitlines()
    prefill = lines.index("prefill:") + 2  # its gpus_per_instance, the role's first key
    decode = lines.index("decode:") + 2
    assert lines[prefill - 1] == lines[decode - 1] == "  gpus_per_instance: 4"
    assert [m for m in problems(example_repo) if "policies/chat.yaml" in m] == [
        f"policies/chat.yaml:{prefill}:3: prefill.gpus_per_instance: 4 GPUs per instance do "
        "not fit a h800 node (2 GPUs); multi-node instances are not supported yet",
        f"policies/chat.yaml:{decode}:3: decode.gpus_per_instance: 4 GPUs per instance do not "
        "fit a h20 node (2 GPUs); multi-node instances are not supported yet",
        f"policies/chat.yaml:{decode}:3: decode.gpus_per_instance: 4 GPUs per instance do not "
        "fit a h800 node (2 GPUs); multi-node instances are not supported yet",
    ]


def test_subgroup_switches_are_known_and_in_one_subgroup(example_repo: Path) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, "switches: [pod-b]", "switches: [pod-b, pod-x]")
    edit(cluster, "switches: [pod-c]", "switches: [pod-c, mp-a1]")
    rg_b, rg_c = line_of(cluster, "name: rg-b"), line_of(cluster, "name: rg-c")
    assert problems(example_repo) == [
        f"clusters/prod-east.yaml:{rg_b}:36: rdma_subgroups[1].switches[1]: unknown S1/S2 "
        "switch 'pod-x'; did you mean 'pod-d'?",
        f"clusters/prod-east.yaml:{rg_c}:18: rdma_subgroups[2].switches: S1 'mp-a1' is already "
        "in subgroup 'rg-a'",
    ]


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp: tmp / "absent", "no such directory"),
        (lambda tmp: tmp / "policies", "not a directory"),
        (
            lambda tmp: tmp,
            "not a desired-state repository (neither policies/ nor clusters/ in it)",
        ),
    ],
    ids=["missing", "a file", "no policies/ or clusters/"],
)
def test_a_wrong_root_is_one_problem_naming_it(
    make: Callable[[Path], Path], problem: str, tmp_path: Path
) -> None:
    (tmp_path / "policies").write_text("not a folder\n")
    if problem.startswith("not a desired-state"):
        (tmp_path / "policies").unlink()
    root = make(tmp_path)
    assert problems(root) == [f"{root}: {problem}"]


def test_a_missing_template_is_reported(example_repo: Path) -> None:
    (example_repo / "templates/sglang-decode.yaml").unlink()
    [message] = problems(example_repo)
    assert "policies/summarize.yaml" in message
    assert "decode.template: template 'templates/sglang-decode.yaml': no such file" in message


def test_cross_field_ranges_are_checked(example_repo: Path) -> None:
    policy = example_repo / "policies/svc-a.yaml"
    edit(policy, 'target: "1:1"', 'target: "3:1"')
    edit(
        policy, "min_instances: 2\n  max_instances: 128", "min_instances: 200\n  max_instances: 128"
    )
    found = problems(example_repo)
    assert any("pd_ratio.target: must lie inside [pd_ratio.min, pd_ratio.max]" in m for m in found)
    assert any("prefill.min_instances: must be <= max_instances (200 > 128)" in m for m in found)


def test_every_problem_of_a_run_is_reported_together(example_repo: Path) -> None:
    edit(example_repo / "policies/svc-a.yaml", "tbt_ms: 40", "tbt_ms: 0")
    edit(example_repo / "policies/svc-b.yaml", "quantile: 0.9", "quantile: 1.5")
    edit(example_repo / "clusters/prod-east.yaml", "bf16_tflops: 148", "bf16_tflops: fast")
    found = problems(example_repo)
    assert len(found) == 3
    assert [m.split(":")[0] for m in found] == [
        "clusters/prod-east.yaml",
        "policies/svc-a.yaml",
        "policies/svc-b.yaml",
    ]


def test_a_yaml_syntax_error_is_located(example_repo: Path) -> None:
    edit(example_repo / "policies/chat.yaml", "engine: vllm", "engine: [vllm")
    [message] = problems(example_repo)
    assert re.match(r"policies/chat.yaml:\d+:\d+: YAML syntax error", message)


def test_a_duplicate_key_is_an_error(example_repo: Path) -> None:
    policy = example_repo / "policies/chat.yaml"
    edit(policy, "engine: vllm\n", "engine: vllm\nengine: sglang\n")
    [message] = problems(example_repo)
    assert (
        f"policies/chat.yaml:{line_of(policy, 'engine: sglang')}:1: engine: duplicate key"
        in message
    )


def test_an_empty_file_is_an_error(example_repo: Path) -> None:
    (example_repo / "policies/empty.yaml").write_text("# nothing here\n\n")
    assert problems(example_repo) == ["policies/empty.yaml:1:1: file is empty (no YAML content)"]


def test_a_file_that_is_not_a_mapping_is_an_error(example_repo: Path) -> None:
    (example_repo / "policies/list.yaml").write_text("- name: a\n- name: b\n")
    assert problems(example_repo) == [
        "policies/list.yaml:1:1: the document must be a mapping of keys to values, not a list"
    ]


def test_a_huge_file_is_refused_before_parsing(example_repo: Path) -> None:
    (example_repo / "policies/huge.yaml").write_text("# padding\n" * 1_000_000)  # 10 MB
    [message] = problems(example_repo)
    assert message.startswith("policies/huge.yaml:1:1: file is 10.0 MB, over the 5 MiB limit")


def test_a_non_utf8_file_is_located_at_the_bad_byte(example_repo: Path) -> None:
    (example_repo / "policies/latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert problems(example_repo) == ["policies/latin1.yaml:1:10: not valid UTF-8 (byte 0xe9)"]


def test_a_symlink_out_of_the_repository_is_refused(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside") / "secret.yaml"
    outside.write_text((example_repo / "policies/chat.yaml").read_text())
    (example_repo / "policies/chat.yaml").unlink()
    (example_repo / "policies/chat.yaml").symlink_to(outside)
    [message] = problems(example_repo)
    assert message == (
        "policies/chat.yaml:1:1: is a symlink to a file outside the repository; refused"
    )
    assert str(outside.parent) not in message  # nothing outside the root is named


def test_a_symlink_inside_the_repository_is_followed(example_repo: Path) -> None:
    (example_repo / "templates/alias.yaml").symlink_to(example_repo / "templates/vllm-decode.yaml")
    edit(
        example_repo / "policies/chat.yaml",
        "template: templates/vllm-decode.yaml",
        "template: templates/alias.yaml",
    )
    assert "chat" in load_desired_state(example_repo).policies


def test_a_declared_subgroup_class_must_match_the_hardware(example_repo: Path) -> None:
    edit(
        example_repo / "clusters/prod-east.yaml",
        "switches: [pod-c], class: medium",
        "switches: [pod-c], class: low",
    )
    [message] = problems(example_repo)
    assert "rdma_subgroups[2].class: declared 'low' but the GPUs below make it 'medium'" in message


def test_switch_names_are_unique(example_repo: Path) -> None:
    edit(example_repo / "clusters/prod-east.yaml", "- name: mp-b2", "- name: mp-b1")
    [message] = problems(example_repo)
    assert "s2[1].s1[1].name: switch 'mp-b1' is declared twice (also at s2[1].s1[0])" in message


def test_service_names_are_unique_across_files(example_repo: Path) -> None:
    text = (example_repo / "policies/chat.yaml").read_text()
    (example_repo / "policies/chat-copy.yaml").write_text(text)
    [message] = problems(example_repo)
    assert "name: service 'chat' is also defined in policies/chat" in message


# ---------------------------------------------------------------------- the CLI


def test_validate_exits_0_on_the_examples(repo_root: Path) -> None:
    result = runner.invoke(app, ["validate", str(repo_root)])
    assert result.exit_code == 0, result.output
    assert "valid: 4 services, 1 cluster (256 nodes, 2048 GPUs)" in result.output


def test_validate_exits_1_with_one_line_per_problem_and_no_traceback(example_repo: Path) -> None:
    edit(example_repo / "policies/svc-a.yaml", "tbt_ms: 40", "tbt_ms: -20")
    edit(example_repo / "policies/chat.yaml", "  tolerance: 0.1", "  tolerence: 0.1")
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "validate", str(example_repo)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "2 problems found"
    assert all(line.startswith("error policies/") for line in lines[:-1])


@pytest.mark.parametrize(
    "command",
    [
        ["simulate", "--service", "chat", "--diurnal-hours", "0.1", "--repo"],
        ["tune", "chat", "--repo"],
    ],
)
def test_other_commands_report_a_broken_desired_state_as_validate_does(
    example_repo: Path, command: list[str]
) -> None:
    edit(example_repo / "policies/svc-a.yaml", "tbt_ms: 40", "tbt_ms: -20")
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", *command, str(example_repo)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "1 problem found"
    assert lines[-2].startswith("error policies/svc-a.yaml:")


def test_validate_exits_2_on_usage_errors(tmp_path: Path) -> None:
    assert runner.invoke(app, ["validate", str(tmp_path / "absent")]).exit_code == 2
    assert runner.invoke(app, ["validate", "--no-such-flag"]).exit_code == 2


def test_a_metric_query_override_for_an_unknown_signal_is_located(example_repo: Path) -> None:
    policy = example_repo / "policies/svc-a.yaml"
    policy.write_text(
        policy.read_text() + "metrics:\n  queries:\n    decode_tsp: sum(rate(x[1m]))\n"
    )
    [message] = problems(example_repo)
    assert message.endswith(
        "metrics.queries.decode_tsp: unknown signal 'decode_tsp'; did you mean 'decode_tps'?"
    )


def test_a_metric_label_that_prometheus_cannot_carry_is_refused(example_repo: Path) -> None:
    policy = example_repo / "policies/svc-a.yaml"
    policy.write_text(policy.read_text() + "metrics:\n  service_label: heteroscale.io/service\n")
    [message] = problems(example_repo)
    assert (
        "metrics.service_label: 'heteroscale.io/service' is not a Prometheus label name" in message
    )


def test_reuse_unchanged_keeps_the_objects_of_services_and_clusters_that_did_not_change(
    example_repo: Path,
) -> None:
    """What is derived from a policy is cached per object, and the loop loads the
    desired state every cycle: equal policies and clusters keep their old objects, a
    changed one is the new one, and services come and go with the new state."""
    from reconciler.desired.loader import reuse_unchanged

    before = load_desired_state(example_repo)
    edit(example_repo / "policies/svc-a.yaml", "cooldown_s: 120", "cooldown_s: 240")
    (example_repo / "policies/summarize.yaml").unlink()
    after = reuse_unchanged(before, load_desired_state(example_repo))
    assert set(after.policies) == set(before.policies) - {"summarize"}
    assert after.policies["svc-a"] is not before.policies["svc-a"]
    assert after.policies["svc-a"].scaling.cooldown_s == 240
    assert all(after.policies[n] is before.policies[n] for n in ("chat", "svc-b"))
    assert all(after.clusters[n] is before.clusters[n] for n in before.clusters)
    fresh = load_desired_state(example_repo)
    assert reuse_unchanged(None, fresh) is fresh


def test_a_list_of_known_names_that_is_cut_says_how_many_more_there_are(
    example_repo: Path,
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, "switches: [pod-a]", "switches: [zzzz]")
    [found] = problems(example_repo)
    # 4 S2 and 13 S1 switches (no S0 one): eight shown, in order, the other nine counted.
    assert found.endswith(
        "rdma_subgroups[0].switches[0]: unknown S1/S2 switch 'zzzz'; known: mp-a1, mp-a2, "
        "mp-a3, mp-b1, mp-b2, mp-b3, mp-c1, mp-c2 and 9 more"
    )


@pytest.mark.parametrize(
    ("old", "new", "needle", "field", "message"),
    [
        (
            "network:\n",
            'labels: {s2: "bad key!/x y"}\nnetwork:\n',
            "labels: {s2:",
            "labels.s2",
            "must be a Kubernetes label key (prefix 'bad key!': lower-case letters",
        ),
        (
            "defaults: {gpu_type: h800}",
            "defaults: {gpu_type: h800, labels: {'bad key!': v}}",
            "bad key!",
            "s2[0].defaults.labels.bad key!",
            "must be a Kubernetes label key (name 'bad key!': letters, digits, '-', '_' and "
            "'.' only, a letter or digit at both ends)",
        ),
        (
            "defaults: {gpu_type: h800}",
            "defaults: {gpu_type: h800, labels: {team: 'a b'}}",
            "team:",
            "s2[0].defaults.labels.team",
            "must be a Kubernetes label value (letters, digits",
        ),
        (
            "interconnect: nvlink-400\n",
            "interconnect: nvlink-400\n    node_label: -h800\n",
            "node_label",
            "gpu_types.h800.node_label",
            "must be a Kubernetes label value (",
        ),
        (
            "- name: mp-a2",
            '- name: "mp a2"',
            "mp a2",
            "s2[0].s1[1].name",
            "switch 'mp a2' is not a Kubernetes label value, as the value of node label "
            "heteroscale.io/s1 must be (letters, digits",
        ),
        (
            '{name: "leaf-a1-[1-4]"',
            '{name: "leaf a1-[1-4]"',
            "leaf a1",
            "s2[0].s1[0].s0[0].name",
            "switch 'leaf a1-1' is not a Kubernetes label value, as the value of node label "
            "heteroscale.io/s0 must be",
        ),
    ],
    ids=["topology key", "node key", "node value", "gpu node_label", "s1 name", "s0 range"],
)
def test_node_label_keys_and_values_are_refused_where_kubernetes_would_refuse_them(
    example_repo: Path, old: str, new: str, needle: str, field: str, message: str
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, old, new)
    found = problems(example_repo)
    # One problem per pattern, not one per name a range expands to.
    assert len(found) == 1, found
    line = line_of(cluster, needle)
    assert found[0].startswith(f"clusters/prod-east.yaml:{line}:")
    assert f" {field}: {message}" in found[0]


def test_a_gpu_type_that_is_no_label_value_needs_a_node_label(example_repo: Path) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    block = "    memory_gib: 48\n    bf16_tflops: 119.5\n    memory_bandwidth_gbps: 864\n"
    edit(
        cluster, "\n# KV-cache", f"  L20 PCIe:\n{block}  l20x:\n{block}    node_label: l20\n\n# KV"
    )
    found = problems(example_repo)
    assert len(found) == 1, found
    assert found[0].startswith(f"clusters/prod-east.yaml:{line_of(cluster, 'L20 PCIe:')}:3: ")
    assert "gpu_types.L20 PCIe: GPU type 'L20 PCIe' is not a Kubernetes label value" in found[0]
    assert found[0].endswith("; set its node_label")


def test_a_cluster_is_named_as_its_file_and_its_services_are_never_skipped_silently(
    example_repo: Path,
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, "name: prod-east", "name: prod-west")
    # Checked against its cluster, this would be two problems (no such GPU type; 64
    # GPUs fit no node): it must not pass unchecked and unsaid.
    policy = example_repo / "policies/svc-a.yaml"
    edit(policy, "gpu_types: {h800: 1.0, h20: 0.3}", "gpu_types: {h801: 1.0}")
    edit(policy, "gpus_per_instance: 2", "gpus_per_instance: 64")
    found = problems(example_repo)
    assert found[0] == (
        f"clusters/prod-east.yaml:{line_of(cluster, 'name: prod-west')}:1: name: must equal the "
        "file name 'prod-east' (got 'prod-west'): a cluster is written in clusters/<name>.yaml"
    )
    # The cluster's own error says why its services are not checked against it.
    assert len(found) == 1, found


def test_a_cluster_whose_nodes_cannot_be_read_never_passes_a_service_unchecked(
    example_repo: Path,
) -> None:
    from reconciler.desired.checks import check_policy_against_cluster
    from reconciler.desired.loader import parse_yaml
    from reconciler.desired.models import ClusterSpec

    policy = load_desired_state(example_repo).policies["svc-a"]
    text = (example_repo / "clusters/prod-east.yaml").read_text()
    # Valid as a model, but no node has a GPU count: check_cluster refuses it.
    spec = ClusterSpec.model_validate(
        parse_yaml("c.yaml", text.replace("gpus_per_node: 8", "labels: {}").encode()).data
    )
    [(path, message)] = check_policy_against_cluster(policy, spec)
    assert path == ("cluster",)
    assert message.startswith("cluster 'prod-east' could not be read (node h800-a-001 has no")
    assert message.endswith("), so the service is not checked against it")
