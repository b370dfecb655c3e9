"""The benchmarks' logic on tiny models (CPU): every script answers --help and runs its --smoke mode,
every arm runs and reports sane numbers, the floor trains nothing, MRT trains exactly its editors,
the model is left clean between arms, generation edits only the prompt pass, and the 1-vs-N-process
comparison flags a systematic difference."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = ("cpu_train_step", "gpu_train_step", "gpu_generate", "pipeline_run")


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


def _has_impl() -> bool:
    from components.core.config import EditorParams

    return "impl" in EditorParams.model_fields


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_says_what_it_measures_and_takes_smoke_and_json(name):
    out = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "--smoke" in out.stdout and "--json" in out.stdout
    assert _load(name).__doc__.split("\n")[0].endswith("?")  # the question it answers


@pytest.fixture(scope="module")
def train_summary(tmp_path_factory):
    bench = _load("gpu_train_step")
    out = tmp_path_factory.mktemp("train")
    summary = bench.main(["--smoke", "--batch-sizes", "2", "--steps", "2", "--warmup", "1", "--json", str(out / "s.json")])
    return bench, summary, out


def test_every_arm_runs_and_reports_finite_numbers(train_summary):
    bench, summary, out = train_summary
    results = {r["arm"]: r for r in summary["results"]}
    assert set(results) == {"floor", "mrt", "lora", "lora_fp32", "full"}
    for arm, r in results.items():
        assert r["status"] == "ok", (arm, r)
        assert r["finite"], arm
        assert r["step_ms"] > 0 and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
    assert summary["gradient_checkpointing"] is False
    assert json.loads((out / "s.json").read_text())["results"][0]["arm"] == "floor"
    row = summary["compare"]["2"]
    assert row["mrt_step_vs_floor"] == results["mrt"]["step_ms"] / results["floor"]["step_ms"]
    assert row["mrt_throughput_vs_lora"] == results["mrt"]["tokens_per_s"] / results["lora"]["tokens_per_s"]
    assert "| 2 | mrt |" in bench.markdown(summary)


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
    # Only the trainable arms learn: the floor's loss cannot move.
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
    for arm in ("floor", "mrt", "lora", "floor_graphed", "mrt_vision"):
        r = bench.run_arm(arm, model, batch, torch.device("cpu"), bench.tiny_placement(), warmup=0, steps=1)
        assert r["status"] == "ok", r
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


def test_split_graphed_and_implementation_arms():
    """mrt_vision + mrt_lm train MRT's editors between them; floor_graphed is compared with the
    floor and mrt_graphed needs CUDA; the implementation arms run where EditorParams takes `impl`
    and are reported as skipped, with the reason, where it does not."""
    bench = _load("gpu_train_step")
    summary = bench.main(["--smoke", "--batch-sizes", "2", "--steps", "1", "--warmup", "0", "--cycles", "2", "--arms",
                          "floor", "mrt", "mrt_vision", "mrt_lm", "floor_graphed", "mrt_reference", "mrt_fast"])
    r = {x["arm"]: x for x in summary["results"] if x["cycle"] == 0}
    assert r["mrt_vision"]["trainable_params"] + r["mrt_lm"]["trainable_params"] == r["mrt"]["trainable_params"]
    row = summary["compare"]["2"]
    assert row["floor_graphed_step_vs_floor"] > 0 and len(row["floor_graphed_step_vs_floor_cycles"]) == 2
    assert "mrt_graphed_step_vs_floor" not in row
    for arm in ("mrt_reference", "mrt_fast"):
        if _has_impl():
            assert r[arm]["status"] == "ok" and r[arm]["trainable_params"] == r["mrt"]["trainable_params"]
        else:
            assert r[arm]["status"] == "skipped" and "impl" in r[arm]["note"]
            assert f"{arm}_step_vs_floor" not in row
    import torch

    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.setup_mrt_graphed(None, None, torch.device("cpu"), None)


def test_generation_edits_only_the_prompt_pass():
    gen = _load("gpu_generate")
    summary = gen.main(["--smoke", "--batch-sizes", "2", "--rounds", "1", "--warmup", "0"])
    (r,) = summary["results"]
    assert r["new_tokens"] == 8
    # One round per MRT arm = a prefill, a generate(), a second prefill and the decode loop's prefill:
    # four prompt passes, no decode step edited.
    bench = _load("gpu_train_step")
    from components.editors import resolve_placement

    layers = resolve_placement(bench.tiny_config(), bench.tiny_placement())
    assert r["edit_calls"]["visual"] == 4 * len(layers["visual"])
    assert r["edit_calls"]["prefix"] == 4 * len(layers["prefix"])
    assert r["edit_calls"]["suffix"] == 4 * len(layers["suffix"])
    assert r["base_generate_ms"] > 0 and r["mrt_generate_ms"] > 0
    assert r["mrt_prefill_warm_vs_base"] > 0 and r["mrt_generate_vs_base_paired"] > 0
    assert r["base_decode_ms"] > 0 and r["mrt_decode_vs_base"] > 0
    assert "| 2 | mrt |" in gen.markdown(summary)


def test_generation_graphed_split_and_implementation_arms():
    """The graphed arms give the same tokens as their eager twins (the graphs run eagerly on CPU,
    every vision layer call counted); --impl arms run or are skipped with the reason."""
    bench, gen = _load("gpu_train_step"), _load("gpu_generate")
    summary = gen.main(["--smoke", "--batch-sizes", "1", "--rounds", "1", "--warmup", "0", "--graphs", "--split", "--impl"])
    (r,) = summary["results"]
    assert r["base_graphed_tokens_equal_base"] and r["mrt_graphed_tokens_equal_mrt"]
    assert r["mrt_graphed_generate_vs_base_graphed"] > 0 and r["base_graphed_generate_vs_base"] > 0
    assert r["graph_stats_last_round"] == {"eager": 4 * bench.tiny_config().vision_config.num_hidden_layers}
    assert r["mrt_vision_generate_vs_base"] > 0 and r["mrt_lm_generate_vs_base"] > 0
    if _has_impl():
        assert r["mrt_fast_tokens_equal_mrt"] and r["mrt_reference_tokens_equal_mrt"]
    else:
        assert set(summary["skipped"]) == {"mrt_reference", "mrt_fast"} and "mrt_fast_generate_ms" not in r


def test_cpu_train_step_smoke_times_both_arms(tmp_path):
    bench = _load("cpu_train_step")
    summary = bench.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "c.json")])
    assert summary["batch_size"] == 2 and summary["steps_per_arm"] == 2
    assert summary["floor_ms_median"] > 0 and summary["mrt_ms_median"] > 0 and summary["editor_params"] > 0
    assert abs(summary["ratio_median"] - summary["mrt_ms_median"] / summary["floor_ms_median"]) < 0.01
    assert summary["met"] == (summary["ratio_median"] <= summary["target"])
    assert json.loads((tmp_path / "c.json").read_text()) == summary


@pytest.mark.slow
def test_training_loop_arms_run_against_the_model_only_step(tmp_path):
    """--loop --smoke: the model-only step and `mrt train`'s loop (prefetch 0 and 2) all run, and the
    patched base loader and method preparation are restored afterwards."""
    bench = _load("gpu_train_step")
    from components.model import backbone
    from components.train import training

    before = (backbone.load_base, training.prepare_method)
    summary = bench.main(["--loop", "--smoke", "--json", str(tmp_path / "loop.json")])
    arms = {a["arm"]: a for a in summary["arms"]}
    assert set(arms) == {"model_only", "loop_prefetch0", "loop_prefetch2", "model_only_again"}
    assert all("error" not in a and a["vs_model_only"] > 0 for a in arms.values()), arms
    assert arms["loop_prefetch2"]["trainable"] == arms["model_only"]["trainable"]
    assert (backbone.load_base, training.prepare_method) == before


# ---------------------------------------------------------------------------------------------
# gpu_train_step.py --ddp: the 1-vs-N-process comparison
# ---------------------------------------------------------------------------------------------
def test_ddp_launchers_and_comparison_flag_a_systematic_difference(tmp_path):
    ddp = _load("gpu_train_step")
    import torch
    from safetensors.torch import save_file

    gpu = ddp.launch(2, cpu=False, main_port=1)
    assert "accelerate.commands.launch" in gpu and "--multi_gpu" in gpu and gpu[gpu.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" not in ddp.launch(1, cpu=False, main_port=1)
    assert "torch.distributed.run" in ddp.launch(2, cpu=True, main_port=1)  # accelerate needs MPI for CPU
    one = {"heldout": {"a": 0.5, "b": 0.25}, "loss_final": 1.0, "heldout_mean": 0.375}
    same = ddp.compare_runs(one, dict(one), [2.0, 1.5, 1.0], [2.0, 1.5 + 2e-7, 1.0], 1e-3, 0.05)
    assert same["losses_within_tol"] and same["heldout_within_slack"]
    # per-process means instead of a global token mean: a 1e-2 drift must fail the check
    drift = ddp.compare_runs(one, dict(one, loss_final=1.01), [2.0, 1.5, 1.0], [2.0, 1.51, 1.01], 1e-3, 0.05)
    assert not drift["losses_within_tol"] and drift["loss_max_abs_diff_step"] == 2
    a = {"w": torch.zeros(3), "u": torch.ones(2, 2)}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([0.0, 3e-4, 0.0]), "u": torch.ones(2, 2)}, str(tmp_path / "b.safetensors"))
    d = ddp.editors_diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert d["worst_tensor"] == "w" and abs(d["max_abs"] - 3e-4) < 1e-9
    save_file({"w": torch.zeros(3)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(SystemExit, match="different tensors"):
        ddp.editors_diff(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    with pytest.raises(SystemExit, match="--work"):
        ddp.main(["--ddp", "--smoke"])


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
    """The whole --ddp flow on CPU (gloo, 2 processes, tiny sizes): real `mrt data/align/train`,
    then equal losses and editors within the script's tolerances (~40 s on 2 cores)."""
    bench = _load("gpu_train_step")
    summary = bench.main(["--ddp", "--smoke", "--work", str(tmp_path / "ddp"), "--json", str(tmp_path / "ddp.json")])
    assert summary["passed"], summary["compare"]
    assert summary["compare"]["steps_compared"] == 6
    assert summary["compare"]["editors"]["max_abs"] < 1e-5


@pytest.mark.slow
def test_pipeline_run_smoke_splits_the_flow_time_into_stages(tmp_path):
    """pipeline_run.py --smoke: the smoke profile in a fresh workspace; the stages and the overhead
    add up to the total, and the checkout is untouched (run in its own process: it changes directory)."""
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, str(BENCH / "pipeline_run.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["workspace"] == "fresh" and summary["profile"] == "profiles/smoke.yaml"
    assert {"data", "train", "benchmark"} <= set(summary["stages"])
    assert abs(summary["stages_sum_s"] + summary["overhead_s"] - summary["total_s"]) < 0.05
