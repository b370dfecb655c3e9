"""The GPU benchmarks' logic on a tiny model (CPU): every arm runs, numbers are sane, the floor
trains nothing, MRT trains exactly its editors, and generation edits only the prompt pass."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def train_summary(tmp_path_factory):
    bench = _load("gpu_train_step")
    out = tmp_path_factory.mktemp("train")
    summary = bench.main(["--smoke", "--batch-sizes", "2", "--steps", "2", "--warmup", "1",
                          "--json", str(out / "s.json"), "--markdown", str(out / "s.md")])
    return bench, summary, out


def test_every_arm_runs_and_reports_finite_numbers(train_summary):
    _, summary, out = train_summary
    results = {r["arm"]: r for r in summary["results"]}
    assert set(results) == {"floor", "mrt", "lora", "lora_fp32", "full"}
    for arm, r in results.items():
        assert r["status"] == "ok", (arm, r)
        assert r["finite"], arm
        assert r["step_ms"] > 0 and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
    assert summary["gradient_checkpointing"] is False
    assert json.loads((out / "s.json").read_text())["results"][0]["arm"] == "floor"
    assert "| 2 | mrt |" in (out / "s.md").read_text()


def test_trainable_parameters_match_each_method(train_summary):
    bench, summary, _ = train_summary
    from components.editors import count_parameters

    results = {r["arm"]: r for r in summary["results"]}
    assert results["floor"]["trainable_params"] == 0
    assert results["mrt"]["trainable_params"] == count_parameters(bench.tiny_config(), bench.tiny_placement())["total"]
    # LoRA r128 on q,k,v,o,gate,up,down of a 3-layer LM (hidden 128, mlp 256): r·(in+out) each.
    h, m, r, layers = 128, 256, 128, 3
    assert results["lora"]["trainable_params"] == layers * r * (4 * (h + h) + 2 * (h + m) + (m + h))
    assert results["full"]["trainable_params"] > results["lora"]["trainable_params"] / 10
    # Only the trainable arms learn: the floor's loss cannot move, the others' can.
    assert results["floor"]["loss_first"] == results["floor"]["loss_last"]


def test_the_model_is_left_clean_between_arms(train_summary):
    """The arms share one model: after the run no editor hook, no LoRA layer, no trainable weight."""
    bench, _, _ = train_summary
    import torch

    model = bench.build_model(bench.tiny_config(), torch.device("cpu"), torch.float32)
    batch = bench.make_batch(bench.tiny_config(), 2, 24, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        model(**batch)  # transformers installs its own output-capturing hooks on first use
    hooks = {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for arm in ("floor", "mrt", "lora", "floor_graphed"):
        bench.run_arm(arm, model, batch, torch.device("cpu"), bench.tiny_placement(), warmup=0, steps=1)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())  # graphed layers restored
    assert not any("lora" in n for n, _ in model.named_modules())
    assert {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_batch_layout_supervises_only_answers():
    bench = _load("gpu_train_step")
    import torch

    config = bench.tiny_config()
    b = bench.make_batch(config, 4, 32, torch.device("cpu"), torch.float32)
    n_img = bench.n_image_tokens(config)
    assert b["input_ids"].shape == (4, n_img + 32)
    assert ((b["input_ids"] == config.image_token_id).sum(1) == n_img).all()
    lengths = b["attention_mask"].sum(1)
    assert lengths.tolist() == [n_img + 32, n_img + 28, n_img + 24, n_img + 20]
    supervised = b["labels"] != -100
    assert (supervised.sum(1) == 8).all()  # min(32, 32 // 4) answer tokens each
    last = lengths - 1  # the EOS closes every answer and is supervised
    assert (b["labels"][torch.arange(4), last] == b["input_ids"][torch.arange(4), last]).all()
    assert not (supervised & (b["attention_mask"] == 0)).any()


def test_generation_edits_only_the_prompt_pass():
    gen = _load("gpu_generate")
    summary = gen.main(["--smoke", "--batch-sizes", "2", "--rounds", "1", "--warmup", "0", "--compare-kernels"])
    (r,) = summary["results"]
    assert r["new_tokens"] == 8
    # One round per MRT arm = a prefill, a generate(), a second prefill and the decode loop's prefill:
    # four prompt passes, no decode step edited. The counts are of the last "mrt" arm.
    bench = _load("gpu_train_step")
    from components.editors.placement import resolve_placement

    layers = resolve_placement(bench.tiny_config(), bench.tiny_placement())
    assert r["edit_calls"]["visual"] == 4 * len(layers["visual"])
    assert r["edit_calls"]["prefix"] == 4 * len(layers["prefix"])
    assert r["edit_calls"]["suffix"] == 4 * len(layers["suffix"])
    assert r["base_generate_ms"] > 0 and r["mrt_generate_ms"] > 0
    assert r["prefill_warm_ratio"] > 0 and r["generate_ratio_paired"] > 0
    assert r["base_decode_ms"] > 0 and r["decode_ratio"] > 0
    assert r["mrt_kernels_generate_ratio_paired"] > 0 and r["kernels_tokens_equal"]  # same editors, same tokens
    assert "| 2 | mrt_kernels |" in gen.markdown(summary)


def test_graphed_arms_compare_against_both_floors_and_leave_the_layers_clean():
    """floor_graphed (plain layers graphed; eager on CPU) is compared with the floor; mrt_graphed
    needs CUDA and says so; the generation arms base_graphed/mrt_graphed give the same tokens."""
    bench = _load("gpu_train_step")
    summary = bench.main(["--smoke", "--batch-sizes", "2", "--steps", "1", "--warmup", "0",
                          "--arms", "floor", "floor_graphed"])
    row = summary["compare"]["2"]
    assert row["floor_graphed_step_vs_floor"] > 0
    assert "mrt_graphed_step_vs_floor" not in row
    import torch

    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.setup_mrt_graphed(None, None, torch.device("cpu"), None)
    gen = _load("gpu_generate")
    (r,) = gen.main(["--smoke", "--batch-sizes", "1", "--rounds", "1", "--warmup", "0", "--graphs"])["results"]
    assert r["graphed_tokens_equal"]
    assert r["mrt_graphed_generate_vs_base_graphed"] > 0 and r["base_graphed_generate_vs_base"] > 0
    assert r["graph_stats_last_round"] == {"eager": 4 * bench.tiny_config().vision_config.num_hidden_layers}


def test_baseline_editors_run_side_by_side_and_cost_split_arms(tmp_path):
    """--baseline-editors imports a copy of components/editors as its own package (arm mrt_before);
    mrt_vision / mrt_lm train only their groups' editors."""
    import shutil

    bench = _load("gpu_train_step")
    copy = tmp_path / "editors_copy"
    shutil.copytree(Path(bench.__file__).resolve().parents[1] / "components" / "editors", copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    summary = bench.main(["--smoke", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--baseline-editors",
                          str(copy), "--arms", "floor", "mrt", "mrt_before", "mrt_vision", "mrt_lm"])
    r = {x["arm"]: x for x in summary["results"]}
    assert all(x["status"] == "ok" for x in r.values())
    assert r["mrt_before"]["trainable_params"] == r["mrt"]["trainable_params"]
    assert r["mrt_vision"]["trainable_params"] + r["mrt_lm"]["trainable_params"] == r["mrt"]["trainable_params"]
    assert "mrt_before_step_vs_floor" in summary["compare"]["2"]
    with pytest.raises(SystemExit, match="__init__"):
        bench.load_editors_package(tmp_path)


def test_host_bound_mode_has_the_7b_depth_and_placement_and_cprofile_writes_tables(tmp_path):
    """--host-bound: tiny widths, the 7B depth (24 vision, 32 LM layers) and the paper's placement,
    so MRT trains 22 visual editors (rank 6, d 64), the projector's (rank 6, d 128) and 32 × 2 LM
    editors (rank 4, d 128); --cprofile writes each arm's host-time tables."""
    bench = _load("gpu_train_step")
    summary = bench.main(["--host-bound", "--batch-sizes", "2", "--steps", "1", "--warmup", "0",
                          "--arms", "floor", "mrt", "--cprofile", str(tmp_path)])
    assert summary["host_bound"] is True
    r = {x["arm"]: x for x in summary["results"]}
    assert all(x["status"] == "ok" for x in r.values())
    lora_like = lambda n, r_, d: n * (2 * r_ * d + r_)  # noqa: E731 - U and W rows, W's bias
    assert r["mrt"]["trainable_params"] == lora_like(22, 6, 64) + lora_like(1, 6, 128) + lora_like(64, 4, 128)
    assert r["floor"]["trainable_params"] == 0
    for arm in ("floor", "mrt"):
        text = (tmp_path / f"cprofile_{arm}_b2.txt").read_text()
        assert "sorted by tottime" in text and "sorted by cumulative" in text
        assert r[arm]["cprofile"]["wall_ms_per_step"] > 0
    assert "sites.py" in (tmp_path / "cprofile_mrt_b2.txt").read_text()  # the editors' hooks are in it


def test_nolaunch_arm_runs_the_editors_host_work_without_their_kernels(monkeypatch):
    """mrt_nolaunch: on the kernel path (Triton's interpreter here), the `mrt` arm launches editor
    kernels and `mrt_nolaunch` launches none while its hooks still run; the launchers are restored."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (no GPU)")
    from components.editors.fast import kernels, orthonormal_kernel

    monkeypatch.setenv("MRT_TRITON_INTERPRET", "1")
    kernels._triton.cache_clear()
    launched: list[str] = []

    def counting(module):
        real = module.launch

        def launch(kernel, *a, **k):
            launched.append(getattr(kernel, "__name__", str(kernel)))
            return real(kernel, *a, **k)
        return launch

    monkeypatch.setattr(kernels, "launch", counting(kernels))
    monkeypatch.setattr(orthonormal_kernel, "launch", counting(orthonormal_kernel))
    wrapped = (kernels.launch, orthonormal_kernel.launch)
    bench = _load("gpu_train_step")
    args = _tiny_model_batch(bench)
    try:
        for arm in ("mrt", "mrt_nolaunch"):
            launched.clear()
            step, n, cleanup = bench.SETUP[arm](*args)
            try:
                loss = step()
                assert n > 0 and loss.dim() == 0
                if arm == "mrt":
                    assert "whole_kernel" in launched and "whole_backward_kernel" in launched, launched
                else:
                    assert launched == [] and kernels.launch is not wrapped[0]
            finally:
                cleanup()
            assert (kernels.launch, orthonormal_kernel.launch) == wrapped
    finally:
        kernels._triton.cache_clear()


def _tiny_model_batch(bench):
    import torch

    torch.manual_seed(0)
    config = bench.tiny_config()
    model = bench.build_model(config, torch.device("cpu"), torch.float32)
    model.train()
    batch = bench.make_batch(config, 2, 24, torch.device("cpu"), torch.float32)
    return model, batch, torch.device("cpu"), bench.tiny_placement()


# ---------------------------------------------------------------------------------------------
# gpu_ddp.py: the 1-vs-N-process comparison
# ---------------------------------------------------------------------------------------------
def test_ddp_launchers_and_comparison_flag_a_systematic_difference(tmp_path):
    ddp = _load("gpu_ddp")
    import torch
    from safetensors.torch import save_file

    gpu = ddp.launch(2, cpu=False, main_port=1)
    assert "accelerate.commands.launch" in gpu and "--multi_gpu" in gpu and gpu[gpu.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" not in ddp.launch(1, cpu=False, main_port=1)
    assert "torch.distributed.run" in ddp.launch(2, cpu=True, main_port=1)  # accelerate needs MPI for CPU
    one = {"heldout": {"a": 0.5, "b": 0.25}, "loss_final": 1.0, "heldout_mean": 0.375}
    same = ddp.compare(one, dict(one), [2.0, 1.5, 1.0], [2.0, 1.5 + 2e-7, 1.0], 1e-3, 0.05)
    assert same["losses_within_tol"] and same["heldout_within_slack"]
    # per-process means instead of a global token mean: a 1e-2 drift must fail the check
    drift = ddp.compare(one, dict(one, loss_final=1.01), [2.0, 1.5, 1.0], [2.0, 1.51, 1.01], 1e-3, 0.05)
    assert not drift["losses_within_tol"] and drift["loss_max_abs_diff_step"] == 2
    a = {"w": torch.zeros(3), "u": torch.ones(2, 2)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([0.0, 3e-4, 0.0]), "u": torch.ones(2, 2)}, str(tmp_path / "b.safetensors"))
    d = ddp.editors_diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert d["worst_tensor"] == "w" and abs(d["max_abs"] - 3e-4) < 1e-9
    save_file({"w": torch.zeros(3)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(SystemExit, match="different tensors"):
        ddp.editors_diff(tmp_path / "a.safetensors", tmp_path / "c.safetensors")


def test_loss_counts_answer_tokens_of_the_whole_step():
    """`num_items_in_batch` = supervised tokens of every micro-batch (labels shifted by one) over
    the processes, divided by their number: per-token mean of the global batch after DDP's average."""
    import torch

    from components.train.training import _answer_tokens

    class OneProcess:
        num_processes = 1

    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])  # 2 + 1 supervised after the shift
    micro = [{"labels": labels}, {"labels": torch.tensor([[9, 9, 9]])}]  # the first label is never predicted: 2
    assert float(_answer_tokens(micro, OneProcess(), torch.device("cpu"))) == 5.0


@pytest.mark.slow
def test_two_cpu_processes_train_the_same_editors_as_one(tmp_path):
    """The whole gpu_ddp.py flow on CPU (gloo, 2 processes, tiny sizes): real `mrt data/align/train`,
    then equal losses and editors within the script's tolerances (~40 s on 2 cores)."""
    ddp = _load("gpu_ddp")
    summary = ddp.main(["--smoke", "--work", str(tmp_path / "ddp"), "--json", str(tmp_path / "ddp.json")])
    assert summary["passed"], summary["compare"]
    assert summary["compare"]["steps_compared"] == 6
    assert summary["compare"]["editors"]["max_abs"] < 1e-5


def test_trace_phases_cuts_a_step_at_its_attention_kernels(tmp_path):
    """A synthetic trace: 2 vision + 2 LM attention forwards, 2 LM + 1 vision backwards, a 5 µs gap
    in front, a 10 µs tail with a 4 µs gap. Spans and idle time per phase are read off exactly."""
    import gzip
    import json

    tp = _load("trace_phases")

    def k(name, ts, dur):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [
        k("embed", 0, 5), k("fprop_v0", 10, 10), k("fprop_v1", 20, 10), k("fprop_lm0", 30, 10),
        k("fprop_lm1", 40, 10), k("bprop_lm1", 50, 10), k("bprop_lm0", 60, 10), k("bprop_v1", 70, 10),
        k("adam", 84, 6),
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    got = tp.phases(str(path), lm_layers=2)
    assert got["front"] == (0.010, 0.005)
    assert got["vision forward"] == (0.020, 0.0)
    assert got["LM forward"] == (0.020, 0.0)
    assert got["LM backward"] == (0.020, 0.0)
    assert got["vision backward"] == (0.010, 0.0)
    assert got["tail"] == (0.010, 0.004)
    assert got["step"] == (0.090, 0.009)
    # host ops: top-level ones per thread (nested ones not counted again), placed by their start
    ops = [{"cat": "cpu_op", "ph": "X", "name": n, "ts": ts, "dur": dur, "pid": 1, "tid": tid}
           for n, ts, dur, tid in (("aten::linear", 12, 6, 1), ("aten::addmm", 13, 4, 1), ("EditWhole", 22, 3, 1),
                                   ("EditWhole", 26, 2, 1), ("EditRowsBackward", 55, 4, 2), ("tail_op", 85, 1, 1))]
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events + ops}, fh)
    host = tp.host_ops(str(path), lm_layers=2)
    assert host["vision forward"] == {"aten::linear": (0.006, 1), "EditWhole": (0.005, 2)}
    assert host["LM backward"] == {"EditRowsBackward": (0.004, 1)}
    assert host["tail"] == {"tail_op": (0.001, 1)} and host["front"] == {}
    diff = tp.host_op_diff({p: {} for p in host}, host, top=1)
    assert diff["vision forward"] == [("aten::linear", 0.006, 0, 1)]


def test_host_overhead_benchmark_measures_every_call_kind():
    bench = _load("gpu_host_overhead")
    result = bench.main(["--cpu", "--calls", "3", "--repeats", "1"])
    per_call = result["per_call_us"]
    for key in ("torch_add_us", "module_call_us", "module_with_forward_hook_us", "module_with_pass_hooks_us",
                "site_whole_operator_path_us"):
        assert per_call[key] > 0, key


def test_kernel_tuning_checks_every_configuration_against_float64(tmp_path, monkeypatch):
    """gpu_kernel_tuning.py --smoke: every kernel (whole, rows, backward, rows_backward, rows_train) times its configurations in
    Triton's interpreter, checks each against float64 and names the fastest correct ones."""
    pytest.importorskip("triton")
    import torch

    if torch.cuda.is_available():
        pytest.skip("the smoke run is the interpreter's; on a GPU run the real tuning")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored afterwards (main sets both)
    monkeypatch.setenv("MRT_TRITON_INTERPRET", "1")
    bench = _load("gpu_kernel_tuning")
    from components.editors.fast import kernels as kernel_module

    train_config = dict(kernel_module.ROWS_TRAIN_CONFIG)
    out = bench.main(["--smoke", "--json", str(tmp_path / "t.json")])
    assert kernel_module.ROWS_TRAIN_CONFIG == train_config  # rows_train sets it per configuration, then restores it
    saved = json.loads((tmp_path / "t.json").read_text())
    assert set(bench.KINDS) == {"whole", "rows", "backward", "rows_backward", "rows_train"}
    for kind in bench.KINDS:
        rows = out[kind]
        assert rows and all("us" in r and r["us"] > 0 for r in rows), rows  # none refused
        assert all(r["beyond_fp32_units"] <= bench.TOLERANCE for r in rows), rows
        best = saved[f"{kind}_best"]
        assert best and all(len(v) == len(rows) // len(best) for v in best.values())
        for listed in best.values():
            assert [r["us"] for r in listed] == sorted(r["us"] for r in listed)
    from components.editors.fast import kernels

    kernels._triton.cache_clear()  # the next test builds its own


def test_kernel_tuning_times_the_device_not_the_host():
    """device_us captures the calls in a CUDA graph: a ~2 µs kernel times below a plain loop of
    launches that is bound by the host (what the tool measured before the seventh pass), and the
    graph's calls really ran (the counter moved by 5 warm-up + 3 side-stream + reps × 6 replays)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    bench = _load("gpu_kernel_tuning")
    x = torch.zeros(1, device="cuda")
    reps = 50
    graph_us = bench.device_us(lambda: x.add_(1), reps)
    torch.cuda.synchronize()
    assert int(x.item()) == 5 + 3 + reps * 6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        x.add_(1)
        x.view(-1).sum()  # a second launch per call: the loop is bound by the host
    end.record()
    torch.cuda.synchronize()
    loop_us = start.elapsed_time(end) * 1e3 / reps
    assert 0 < graph_us < loop_us


@pytest.mark.parametrize("mode", ["prefill", "decode", "train"])
def test_cpu_host_cost_benchmark_times_every_arm_and_restores_the_launcher(tmp_path, mode):
    """cpu_host_cost.py: base, current and baseline editors, interleaved, on the kernel path with
    launches stubbed; the real launcher is back afterwards and the JSON holds what was printed."""
    pytest.importorskip("triton")
    import shutil

    from components.editors import kernels, launch

    interp_before = os.environ.get("MRT_TRITON_INTERPRET")
    base = tmp_path / "before"
    shutil.copytree(Path(__file__).resolve().parents[1] / "components" / "editors", base)
    bench = _load("cpu_host_cost")
    out = bench.main(["--mode", mode, "--baseline-editors", str(base), "--rounds", "1", "--passes", "2",
                      "--json", str(tmp_path / "p.json")])
    assert out["mode"] == mode and set(out["ms_min"]) == {"base", "now", "before"}
    assert all(0 < v <= out["ms_median"][k] for k, v in out["ms_min"].items())
    assert set(out["added_ms_min"]) == {"now", "before"}
    assert json.loads((tmp_path / "p.json").read_text()) == out
    assert kernels.launch is launch.launch
    assert os.environ.get("MRT_TRITON_INTERPRET") == interp_before
