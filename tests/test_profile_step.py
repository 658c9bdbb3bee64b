"""experiments.profile_step: the training step's time per operation of its program."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import profile_step
from experiments.benchmark import Config

ROOT = Path(__file__).resolve().parents[1]

HLO = "\n".join(
    [
        "HloModule jit_step",
        "",
        "%fused_computation.3 (p: f32[4,8]) -> f32[8,4] {",
        "  %p = f32[4,8]{1,0} parameter(0)",
        "  ROOT %transpose.1 = f32[8,4]{1,0} transpose(%p), dimensions={1,0}",
        "}",
        "",
        "ENTRY %main (a: f32[4,8]) -> (f32[8,4], f32[2]) {",
        "  %a = f32[4,8]{1,0} parameter(0)",
        "  %copy_fusion.2 = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation.3, "
        'metadata={op_name="jit(step)/transpose" stack_frame_id=3}',
        "  %ffi_call.7 = (f32[2]{0}, f32[2,2]{1,0}) custom-call(%a), "
        'custom_call_target="k", metadata={op_name="jit(step)/ffi_call"}',
        "  ROOT %tuple.1 = (f32[8,4]{1,0}, f32[2]{0}) tuple(%copy_fusion.2, %ffi_call.7)",
        "}",
    ]
)


def test_hlo_operations_read_names_types_and_origins():
    ops = profile_step.hlo_operations(HLO)
    assert ops["copy_fusion.2"] == {
        "type": "f32[8,4]{1,0}",
        "opcode": "fusion",
        "origin": "jit(step)/transpose",
    }
    assert ops["ffi_call.7"]["opcode"] == "custom-call"
    assert ops["ffi_call.7"]["type"] == "(f32[2]{0}, f32[2,2]{1,0})"
    assert ops["transpose.1"]["opcode"] == "transpose"  # inside a fused computation
    assert ops["tuple.1"]["origin"] == ""


def test_implementations_are_the_networks():
    from rnn_jax import networks

    assert profile_step.IMPLEMENTATIONS == networks.IMPLEMENTATIONS


def test_trace_totals_sum_complete_events_by_name():
    events = [
        {"ph": "X", "name": "ffi_call.7", "dur": 5.0},
        {"ph": "X", "name": "ffi_call.7", "dur": 7.5},
        {"ph": "X", "name": "copy_fusion.2", "dur": 1},
        {"ph": "B", "name": "copy_fusion.2"},  # not a complete event
        {"ph": "M", "name": "process_name"},
    ]
    total, count = profile_step.trace_totals(events)
    assert total == {"ffi_call.7": 12.5, "copy_fusion.2": 1.0}
    assert count == {"ffi_call.7": 2, "copy_fusion.2": 1}


def test_profile_of_a_small_step_names_its_operations():
    """In-process, on the devices this process has: every row is an operation of
    the compiled program, the loops among them (the native kernels' calls, or the
    XLA loops' while), with times and calls per step."""
    n = len(jax.devices())
    spec = profile_step.spec_of(Config("tiny", 16, 8, 6), "lstm", 1, True, "auto")
    report = profile_step.profile(spec, steps=2, cpu_devices=str(n))
    rows = report["rows"]
    assert report["step_s"] > 0 and report["devices"] == (n if 8 % n == 0 else 1)
    assert rows == sorted(rows, key=lambda r: -r["ms_per_step"])
    assert all(r["ms_per_step"] >= 0 and r["calls_per_step"] > 0 and r["type"] for r in rows)
    opcodes = {r["opcode"] for r in rows}
    assert ("custom-call" if report["implementation"] == "native" else "while") in opcodes
    assert any("jit(train_step)" in r["origin"] for r in rows)
    text = profile_step.format_report("tiny", report, top=2)
    assert text.splitlines()[0].startswith(f"tiny: {report['implementation']}")
    assert f"the other {len(rows) - 2}" in text


def test_command_line(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "experiments.profile_step"]
    proc = subprocess.run(
        [*cmd, "--config_spec=tiny:16:4:5", "--config=tiny", "--steps=1", f"--output={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tiny (H=16 B=4 T=5) lstm, 1 layer(s)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["case"]["hidden_size"] == 16 and report["rows"]
    assert report["machine"]["cores"] >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=huge"], "--config: expected one of d2l, medium, long, large, got 'huge'"),
        (["--config_spec=x:1:2"], "--config_spec: expected name:hidden:batch:steps"),
        (["--cell=lstmx"], "--cell"),
        (["--output=/nonexistent/dir/x.json"], "--output"),
        (["--cpu_devices=foo"], "--cpu_devices=foo: expected auto or an integer >= 1"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.profile_step", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
