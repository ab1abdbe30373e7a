"""Hostile input: files a malicious or careless pull request could hold. Each is
refused with a located error (file:line:column) in bounded memory and time, and
the command line never interprets a value as console markup."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from repo_edits import edit, line_of
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import load_desired_state
from reconciler.desired.checks import MAX_FLEET_NODES
from reconciler.desired.loader import MAX_DEPTH, parse_yaml
from reconciler.desired.models import MAX_NODE_LABELS
from reconciler.errors import ConfigError

runner = CliRunner()


def refusal(raw: bytes, path: str = "policies/x.yaml") -> str:
    """The one located message ``parse_yaml`` refuses ``raw`` with."""
    with pytest.raises(ConfigError) as caught:
        parse_yaml(path, raw)
    [issue] = caught.value.issues
    assert issue.line is not None and issue.column is not None, str(issue)
    return str(issue)


def problems(repo: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_desired_state(repo)
    assert all(i.line is not None and i.column is not None for i in caught.value.issues)
    return [str(issue) for issue in caught.value.issues]


def billion_laughs() -> bytes:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return ("\n".join(lines) + "\n").encode()


# ------------------------------------------------------------------ the parser


def test_a_billion_laughs_is_refused_in_bounded_memory_and_time() -> None:
    raw = billion_laughs()
    assert len(raw) < 700
    tracemalloc.start()
    started = time.perf_counter()
    try:
        message = refusal(raw)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "expands to more than 500,000 YAML nodes" in message
    # Line 6 (l5, ~9**6 nodes) crosses the limit: refused there, not after 9**9 nodes.
    assert message.startswith("policies/x.yaml:6:")
    assert elapsed < 2.0 and peak < 20_000_000


def test_a_billion_laughs_in_a_repository_fails_validate_with_exit_1(example_repo: Path) -> None:
    (example_repo / "policies/chat.yaml").write_bytes(billion_laughs())
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 1
    assert "policies/chat.yaml:6:" in result.output and "YAML nodes" in result.output


@pytest.mark.parametrize("depth", [1_000, 40_000])
def test_deep_flow_nesting_is_located_not_a_recursion_error(depth: int) -> None:
    message = refusal(b"name: " + b"[" * depth + b"]" * depth + b"\n")
    # The bracket that would open level MAX_DEPTH + 1 (the mapping is level 1).
    assert message == f"policies/x.yaml:1:{6 + MAX_DEPTH}: nested deeper than {MAX_DEPTH} levels"


def test_deep_block_nesting_on_one_line_is_located() -> None:
    message = refusal(b"name:\n" + b"- " * 40_000 + b"x\n")
    assert message.startswith("policies/x.yaml:2:") and "nested deeper than" in message


def test_an_integer_of_thousands_of_digits_is_located() -> None:
    message = refusal(b"name: a\npriority: " + b"9" * 6_000 + b"\n")
    assert message == "policies/x.yaml:2:11: integer of 6000 characters (at most 100)"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"name: a\nengine: vl\x07lm\n", "policies/x.yaml:2:11: control character U+0007"),
        (b"name: a\x00\n", "policies/x.yaml:1:8: control character U+0000"),
        ("name: a\u009b\n".encode(), "policies/x.yaml:1:8: control character U+009B"),
        (b"", "policies/x.yaml:1:1: file is empty"),
        (b"# only a comment\n\n   \n", "policies/x.yaml:1:1: file is empty"),
        (b"name: &x [*x]\n", "policies/x.yaml:1:11: alias *x refers to its own ancestor"),
        (b"name: *nothing\n", "policies/x.yaml:1:7: alias *nothing has no anchor before it"),
        (b"name: 2001-02-30\n", "policies/x.yaml:1:7: invalid value: day is out of range"),
        (b"name: !!int\n", "policies/x.yaml:1:7: invalid value"),
        (b"name: a\n~: 1\n", "policies/x.yaml:2:1: a key must be a name, not null"),
        (
            b"name: a\nprefill:\n  ? [a, b]\n  : 2\n",
            "policies/x.yaml:3:5: prefill: a key must be a name, not a list",
        ),
        (b"name: a\ntrue: 1\n", "policies/x.yaml:2:1: a key must be a name, not true or false"),
    ],
)
def test_control_characters_empty_files_and_bad_scalars_are_located(
    raw: bytes, expected: str
) -> None:
    assert refusal(raw).startswith(expected)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # YAML's escapes make, once parsed, what the text itself may not hold.
        (
            b'name: a\ncluster: "prod\\e[31m"\n',
            "policies/x.yaml:2:1: cluster: the value holds the invisible or control character U+001B",
        ),
        (
            b'name: "a\\r\\nerror fake"\n',
            "policies/x.yaml:1:1: name: the value holds the invisible or control character U+000D",
        ),
        (
            b'name: "x\\u202egnp.exe"\n',
            "policies/x.yaml:1:1: name: the value holds the invisible or control character U+202E",
        ),
        (
            b'name: "chat\\u200b"\n',
            "policies/x.yaml:1:1: name: the value holds the invisible or control character U+200B",
        ),
        (
            b'name: a\nmodel: {name: "m\\0"}\n',
            "policies/x.yaml:2:9: model.name: the value holds the invisible or control character U+0000",
        ),
        (
            b'name: a\nlabels: ["ok", "b\\x9b"]\n',
            "policies/x.yaml:2:16: labels[1]: the value holds the invisible or control character U+009B",
        ),
        (
            b'name: a\n"k\\e": 1\n',
            "policies/x.yaml:2:1: k\x1b: the key holds the invisible or control character U+001B",
        ),
    ],
)
def test_control_and_invisible_characters_written_as_escapes_are_located(
    raw: bytes, expected: str
) -> None:
    assert refusal(raw).startswith(expected)


def test_tabs_and_line_breaks_of_block_scalars_and_crlf_files_still_load() -> None:
    parsed = parse_yaml("policies/x.yaml", b"name: a\r\nargs: |\r\n  one\ttwo\r\n  three\r\n")
    assert parsed.data == {"name": "a", "args": "one\ttwo\nthree\n"}


def test_validate_shows_a_control_character_in_a_file_name_as_an_escape(
    example_repo: Path,
) -> None:
    (example_repo / "policies/x\x1b[2Jy.yaml").write_bytes(b"name: [\n")
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 1
    assert "policies/x\\x1b[2Jy.yaml:" in result.output and "\x1b" not in result.output


def test_too_many_aliases_are_refused() -> None:
    raw = b"a: &a 1\nb: [" + b", ".join([b"*a"] * 1_001) + b"]\n"
    assert "more than 1000 aliases" in refusal(raw)


def test_an_oversized_document_is_located_where_it_crosses_the_limit() -> None:
    raw = b"name: a\n" + b"# padding\n" * 600_000
    message = refusal(raw)
    assert message.startswith("policies/x.yaml:524289:") and "over the 5 MiB limit" in message


# ----------------------------------------------------------- ranges and numbers


def test_ranges_have_a_fleet_wide_total_not_only_a_per_pattern_cap(example_repo: Path) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    # 40 leaf switches of 100,000 nodes each: every pattern is within its own cap.
    leaves = "".join(
        f'\n          - {{name: "hx{i}", nodes: "hx{i}-[1-100000]"}}' for i in range(40)
    )
    edit(cluster, 's0: [{name: "leaf-a1-[1-4]", nodes: "h800-a-[001-020]"}]', f"s0:{leaves}")
    started = time.perf_counter()
    found = problems(example_repo)
    assert time.perf_counter() - started < 10
    [budget] = [m for m in found if "node names expand to more than" in m]
    # The second range takes the total over: 100,000 + 100,000 > MAX_FLEET_NODES.
    assert MAX_FLEET_NODES == 100_000
    assert budget.startswith("clusters/prod-east.yaml:") and "s2[0].s1[0].s0[1].nodes" in budget


def test_the_fleet_total_is_blamed_on_the_large_range_not_on_the_next_small_one(
    example_repo: Path,
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, '"h800-a-[001-020]"', '"h800-a-[1-99999]"')
    found = problems(example_repo)
    [budget] = [m for m in found if "node names expand to more than" in m]
    line = line_of(cluster, "h800-a-[1-99999]")
    # The next range (20 nodes, s1[1]) takes the total over; the 99,999 are what to fix.
    assert budget.startswith(f"clusters/prod-east.yaml:{line}:")
    assert "s2[0].s1[0].s0[0].nodes: the fleet's node names expand to more than 100,000" in budget
    assert "(this range adds 99,999, and s2[0].s1[1].s0[0].nodes takes the total over)" in budget


def test_the_node_total_spans_every_cluster_file(example_repo: Path) -> None:
    def cluster(name: str) -> str:
        return (
            f"name: {name}\ngpu_types: {{h20: {{memory_gib: 96, bf16_tflops: 148, "
            "memory_bandwidth_gbps: 4000}}\ndefaults: {gpus_per_node: 8, gpu_type: h20}\n"
            f"s2:\n  - name: {name}-s2\n    s1:\n      - name: {name}-s1\n        s0:\n"
            f'          - {{name: "{name}-leaf", nodes: "{name}-[1-60000]"}}\n'
        )

    (example_repo / "clusters/big-1.yaml").write_text(cluster("big-1"))
    (example_repo / "clusters/big-2.yaml").write_text(cluster("big-2"))
    found = problems(example_repo)
    # Each file alone is within the total; the second one loaded takes it over.
    assert [m.split(":")[0] for m in found] == ["clusters/big-2.yaml"]
    assert "s2[0].s1[0].s0[0].nodes: the fleet's node names expand to more than" in found[0]


def labelled_cluster(per_level: int, nodes: int) -> str:
    """One cluster of ``nodes`` nodes in one range, ``per_level`` labels declared at
    each of the five levels a node inherits from (cluster, S2, S1, S0, the node)."""

    def labels(level: str) -> str:
        return "{" + ", ".join(f"{level}{i}: v" for i in range(per_level)) + "}"

    return (
        "name: big\ngpu_types: {h20: {memory_gib: 96, bf16_tflops: 148, "
        "memory_bandwidth_gbps: 4000}}\n"
        f"defaults: {{gpus_per_node: 8, gpu_type: h20, labels: {labels('c')}}}\n"
        f"s2:\n  - name: s2\n    defaults: {{labels: {labels('p')}}}\n"
        f"    s1:\n      - name: s1\n        defaults: {{labels: {labels('m')}}}\n"
        f"        s0:\n          - name: leaf\n            defaults: {{labels: {labels('l')}}}\n"
        f'            nodes: [{{name: "n-[1-{nodes}]", labels: {labels("n")}}}]\n'
    )


def test_labels_inherited_past_the_node_limit_are_refused_where_the_node_is_declared(
    example_repo: Path,
) -> None:
    (example_repo / "clusters/big.yaml").write_text(labelled_cluster(256, 99_000))
    [found] = problems(example_repo)
    assert found.startswith("clusters/big.yaml:13:")
    assert "s2[0].s1[0].s0[0].nodes[0]: node n-1 holds 1280 labels" in found
    assert f"(at most {MAX_NODE_LABELS})" in found


def test_the_nodes_of_one_range_share_one_labels_dict(example_repo: Path) -> None:
    (example_repo / "clusters/big.yaml").write_text(labelled_cluster(51, 20_000))
    tracemalloc.start()
    try:
        state = load_desired_state(example_repo)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    nodes = state.clusters["big"].nodes
    assert len(nodes) == 20_000 and len(nodes[0].labels) == 255
    assert all(node.labels is nodes[0].labels for node in nodes)
    # 20,000 copies of 255 labels alone would take about 200 MB.
    assert peak < 100_000_000


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("scale_in_window_s: 600", "scale_in_window_s: 1e18", "scaling.scale_in_window_s"),
        ("cooldown_s: 180", "cooldown_s: 7200", "scaling.cooldown_s"),
        ("max_instances: 128", "max_instances: 1e16", "decode.max_instances"),
        ("ttft_ms: 1500", "ttft_ms: 1e300", "slo.ttft_ms"),
        ("params_b: 70.6", "params_b: 1e9", "model.params_b"),
        (
            "gpus_per_instance: 4\n  gpu_types: {h800",
            "gpus_per_instance: 4096\n  gpu_types: {h800",
            "prefill.gpus_per_instance",
        ),
        ('target: "3:4"', 'target: "1:100000"', "pd_ratio.target"),
        ("prefill_instances: 3", "prefill_instances: 1e12", "deployment_group.prefill_instances"),
    ],
)
def test_every_number_has_a_sane_upper_bound(
    example_repo: Path, old: str, new: str, field: str
) -> None:
    policy = example_repo / "policies/chat.yaml"
    edit(policy, old, new)
    found = problems(example_repo)
    assert any("policies/chat.yaml:" in m and f" {field}: " in m for m in found), found


def test_a_per_instance_target_has_a_floor(example_repo: Path) -> None:
    """1e-300 tokens/s per instance sized ~1e305 instances before the clamp."""
    policy = example_repo / "policies/chat.yaml"
    edit(policy, "scaling:\n", "scaling:\n  target_per_instance: 1e-300\n")
    [found] = problems(example_repo)
    assert "policies/chat.yaml:" in found and " scaling.target_per_instance: " in found
    assert "greater than or equal to 0.001" in found


def test_cluster_numbers_are_bounded_too(example_repo: Path) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, "rdma_gbps: 400", "rdma_gbps: 1e12")
    edit(cluster, "memory_bandwidth_gbps: 3350", "memory_bandwidth_gbps: 1e12")
    found = problems(example_repo)
    assert any("network.rdma_gbps: must be less than or equal to" in m for m in found)
    assert any("gpu_types.h800.memory_bandwidth_gbps:" in m for m in found)


# ------------------------------------------------------------------ sources


def test_a_symlink_loop_in_directory_mode_is_located(example_repo: Path) -> None:
    (example_repo / "policies/loop.yaml").symlink_to(example_repo / "policies/loop.yaml")
    assert problems(example_repo) == ["policies/loop.yaml:1:1: is a symlink loop; refused"]


def test_a_template_path_with_a_nul_is_refused_where_it_is_written(example_repo: Path) -> None:
    policy = example_repo / "policies/chat.yaml"
    edit(policy, "template: templates/vllm-prefill.yaml", 'template: "templates/a\\0b.yaml"')
    [found] = problems(example_repo)
    assert "policies/chat.yaml:" in found
    assert "prefill.template: the value holds the invisible or control character U+0000" in found


def test_a_template_path_outside_the_root_is_an_error(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("secret") / "template.yaml"
    outside.write_text("kind: Pod\n")
    policy = example_repo / "policies/chat.yaml"
    edit(policy, "template: templates/vllm-decode.yaml", f"template: {outside}")
    found = problems(example_repo)
    assert any("outside the repository; refused" in m for m in found)
    assert not any(
        str(outside.parent) in m.split("template '")[-1].split("'", 1)[-1] for m in found
    )


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("text", ["[/red]", "[bold", "[red]x[/red]", ":thumbs_up:"])
def test_markup_in_a_value_is_printed_as_written(example_repo: Path, text: str) -> None:
    edit(example_repo / "policies/chat.yaml", "cluster: prod-east", f'cluster: "{text}"')
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"unknown cluster '{text}'" in result.output


def test_markup_in_a_file_name_is_printed_as_written(example_repo: Path) -> None:
    (example_repo / "policies/[bold]x[red.yaml").write_text("name: [\n")
    result = runner.invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 1
    assert "error policies/[bold]x[red.yaml:2:1: YAML syntax error" in result.output
