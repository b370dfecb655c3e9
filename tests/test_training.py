"""The one trainer: what trains per method, answer-only loss, step-addressable batches, checkpoint/resume."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from components.data.batching import ChatFormatter
from components.core.config import LoraParams, TrainParams
from components.train.methods import METHODS
from components.train.training import (
    LoopSpec,
    StepSampler,
    batch_maker,
    encode_rows,
    prepare_method,
    run_loop,
)
from tiny_llava import tiny_model
from tiny_sweep import SMALL_EDITORS


def _setup(tmp_path, method: str, seed: int = 0, **train_kw):
    model, processor, rows, root = tiny_model(tmp_path, seed=seed)
    p = TrainParams(method=method, editors=SMALL_EDITORS, **train_kw)
    run_model, extra = prepare_method(model, p)
    fmt = ChatFormatter(processor, max_length=64)
    train_rows = [r for r in rows if r.split == "train"]
    sources = [encode_rows(fmt, train_rows, root)]
    return model, run_model, extra, processor, sources


def _spec(tmp_path, steps=4, **kw):
    base = dict(steps=steps, batch_size=4, lr=5e-3, seed=0, warmup_ratio=0.0, save_every=2)
    base.update(kw)
    return LoopSpec(**base)


def test_sampler_is_a_function_of_seed_and_step():
    a = StepSampler([10, 7], [0.5, 0.5], 4, seed=3)
    full = [a.next() for _ in range(20)]
    b = StepSampler([10, 7], [0.5, 0.5], 4, seed=3)
    b.skip(12)
    assert [b.next() for _ in range(8)] == full[12:]
    c = StepSampler([10], [1.0], 5, seed=3)
    epoch = [i for _ in range(2) for i in c.next()[1]]
    assert sorted(epoch) == list(range(10))  # one epoch visits every row once


def test_sampler_mixes_sources_by_weight():
    s = StepSampler([50, 50], [0.75, 0.25], 2, seed=0)
    picks = [s.next()[0] for _ in range(2000)]
    assert 0.70 < picks.count(0) / 2000 < 0.80


def test_sampler_rejects_empty_source():
    with pytest.raises(ValueError, match="at least one row"):
        StepSampler([5, 0], [0.5, 0.5], 2, seed=0)


def test_loss_is_answer_only(tmp_path):
    """The loss is the cross-entropy over answer tokens alone (answer + </s>, nothing of the prompt)."""
    model, run_model, extra, processor, sources = _setup(tmp_path, "full")
    make = batch_maker(processor, sources)
    batch = make(0, [0, 1, 2])
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[:, :-1]
        tgt = batch["labels"][:, 1:]
        m = tgt != -100
        manual = torch.nn.functional.cross_entropy(logits[m], tgt[m])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    tok = processor.tokenizer
    for row, enc in zip(batch["labels"], sources[0][:3]):
        answer = tok.decode(row[row != -100])
        assert answer.endswith("</s>") and "ASSISTANT" not in answer and "USER" not in answer
        assert len(row[row != -100]) == len(tok(answer, add_special_tokens=False)["input_ids"])


def test_mrt_trains_only_editors_and_leaves_backbone_bit_identical(tmp_path):
    model, run_model, editors, processor, sources = _setup(tmp_path, "mrt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed_before = {k: v.clone() for k, v in editors.state_dict().items()}
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training  # backbone dropout semantics: eval
    result = run_loop(run_model, batch_maker(processor, sources), StepSampler([len(sources[0])], [1.0], 4, 0),
                      _spec(tmp_path), extra=editors)
    assert result.steps == 4 and len(result.losses) == 4
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    changed = [k for k, v in editors.state_dict().items() if not torch.equal(ed_before[k], v)]
    assert changed, "no editor tensor moved"
    groups = {k.split(".")[0] for k in changed}
    assert {"visual", "projector", "prefix", "suffix"} <= groups


def test_lora_trains_only_lora_tensors(tmp_path):
    model, run_model, _, processor, sources = _setup(tmp_path, "lora", lora=LoraParams(r=2, alpha=4, dropout=0.0))
    before = {k: v.clone() for k, v in run_model.state_dict().items()}
    trainable = {n for n, p in run_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    run_loop(run_model, batch_maker(processor, sources), StepSampler([len(sources[0])], [1.0], 4, 0), _spec(tmp_path))
    after = run_model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved)


def test_full_keeps_vision_tower_frozen(tmp_path):
    model, run_model, _, processor, sources = _setup(tmp_path, "full")
    vis = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    proj = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    run_loop(run_model, batch_maker(processor, sources), StepSampler([len(sources[0])], [1.0], 4, 0), _spec(tmp_path))
    assert all(torch.equal(vis[k], v) for k, v in model.model.vision_tower.state_dict().items())
    assert any(not torch.equal(proj[k], v) for k, v in model.model.multi_modal_projector.state_dict().items())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_saves_what_its_output_kind_loads_and_counts(tmp_path, name):
    """A method's saved folder is recognised as its output kind and loads back onto the base; the
    parameters the kind counts on the loaded model are exactly those the method set to train."""
    from components.model.backbone import save_base
    from components.editors import model_fingerprint
    from components.evaluation.inference import load_model
    from components.evaluation.outputs import detect_kind, kind_named

    method = METHODS[name]
    model, processor, _, _ = tiny_model(tmp_path)
    save_base(model, processor, tmp_path / "base")
    fingerprint = model_fingerprint(model)
    p = TrainParams(method=name, editors=SMALL_EDITORS, base_dir=str(tmp_path / "base"), out_dir=str(tmp_path / "out"))
    run_model, extra = method.prepare(model, p)
    trained = sum(prm.numel() for m in (run_model, extra) if m is not None for prm in m.parameters() if prm.requires_grad)
    assert (trained > 0) == method.trains
    method.save(run_model, extra, processor, p, fingerprint)
    assert detect_kind(tmp_path / "out") == method.output.name
    loaded = load_model(tmp_path / "base", tmp_path / "out")
    assert loaded.kind == method.output.name
    assert kind_named(loaded.kind).trained_params(loaded.model, loaded.extra) == trained


def test_an_unknown_method_is_refused_by_the_params():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="method"):
        TrainParams(method="dora")


class _Crash(RuntimeError):
    pass


def _lora_run(tmp_path, ckpt, crash_after_calls=None, steps=6, prefetch=0):
    """A LoRA run with dropout (so the RNG state matters) and grad accumulation."""
    model, run_model, _, processor, sources = _setup(tmp_path, "lora", lora=LoraParams(r=2, alpha=4, dropout=0.2))
    make = batch_maker(processor, sources)
    calls = {"n": 0}

    def maybe_crash(source, idx):
        calls["n"] += 1
        if crash_after_calls is not None and calls["n"] > crash_after_calls:
            raise _Crash()
        return make(source, idx)

    spec = _spec(tmp_path, steps=steps, grad_accum=2, ckpt_dir=str(ckpt), curve=str(tmp_path / "curve.csv"),
                 fingerprint={"test": 1}, prefetch=prefetch)
    run_loop(run_model, maybe_crash, StepSampler([len(sources[0])], [1.0], 4, 0), spec)
    return {n: p.detach().clone() for n, p in run_model.named_parameters() if p.requires_grad}


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = _lora_run(tmp_path / "a", tmp_path / "a" / "ckpt")
    with pytest.raises(_Crash):
        _lora_run(tmp_path / "b", tmp_path / "b" / "ckpt", crash_after_calls=9)  # dies inside step 5
    kept = sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir())
    assert kept == ["step-2", "step-4"]
    resumed = _lora_run(tmp_path / "b", tmp_path / "b" / "ckpt")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir()) == ["step-4", "step-6"]  # last two kept
    with open(tmp_path / "b" / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]


def test_prefetched_batches_train_exactly_as_inline_ones_and_errors_surface_in_order(tmp_path):
    """train.loader_prefetch builds batches in a background thread: same batches, same weights; a
    failing batch stops the run at the step that needed it (checkpoints before it are kept) and a
    resumed, prefetched run ends bit-identical to the inline uninterrupted one."""
    straight = _lora_run(tmp_path / "a", tmp_path / "a" / "ckpt")
    with pytest.raises(_Crash):
        _lora_run(tmp_path / "b", tmp_path / "b" / "ckpt", crash_after_calls=9, prefetch=3)  # step 5's batch
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir()) == ["step-2", "step-4"]
    resumed = _lora_run(tmp_path / "b", tmp_path / "b" / "ckpt", prefetch=3)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_loop_reports_step_times_and_tokens(tmp_path):
    model, run_model, _, processor, sources = _setup(tmp_path, "lora", lora=LoraParams(r=2, alpha=4, dropout=0.0))
    res = run_loop(run_model, batch_maker(processor, sources), StepSampler([len(sources[0])], [1.0], 4, 0),
                   _spec(tmp_path, steps=4, prefetch=2))
    assert len(res.step_s) == len(res.step_tokens) == 4 and all(t > 0 for t in res.step_s)
    width = max(len(e.input_ids) for e in sources[0])
    assert all(0 < n <= 4 * width for n in res.step_tokens)
    tp = res.throughput(warmup=1)
    assert tp["steps_timed"] == 3 and tp["tokens_per_s"] == round(sum(res.step_tokens[1:]) / sum(res.step_s[1:]), 1)


def test_pixel_cache_is_bounded_and_returns_what_the_processor_gives(tmp_path):
    from components.train.training import PixelCache

    _, processor, rows, root = tiny_model(tmp_path)
    paths = sorted({root / r.image for r in rows if r.image})[:3]
    one = processor.image_processor(images=[__import__("PIL.Image").Image.open(paths[0]).convert("RGB")],
                                    return_tensors="pt")["pixel_values"][0]
    cache = PixelCache(processor, max_bytes=2 * one.numel() * one.element_size())
    first = cache(paths)
    assert len(cache.cache) == 2 and cache.bytes <= cache.max_bytes  # the oldest went out
    again = cache(paths[::-1])
    assert torch.equal(again, first.flip(0)) and torch.equal(first[0], one)


def test_checkpoint_from_other_settings_is_not_resumed(tmp_path):
    ckpt = tmp_path / "ckpt"
    _lora_run(tmp_path, ckpt, steps=2)
    model, run_model, _, processor, sources = _setup(tmp_path, "lora", lora=LoraParams(r=2, alpha=4, dropout=0.2))
    spec = _spec(tmp_path, steps=2, grad_accum=2, ckpt_dir=str(ckpt), fingerprint={"test": 2})
    res = run_loop(run_model, batch_maker(processor, sources), StepSampler([len(sources[0])], [1.0], 4, 0), spec)
    assert res.resumed_from is None


@pytest.mark.parametrize("method", ["mrt", "lora"])
def test_cuda_graphs_run_eagerly_on_cpu_and_release_the_layers(tmp_path, method):
    from components.train.training import _release_graphs, graph_vision_layers

    model, run_model, extra, processor, sources = _setup(tmp_path, method)
    graphs = graph_vision_layers(model, extra)
    layers = graphs.layers
    assert all("forward" in vars(layer) for layer in layers)
    res = run_loop(run_model, batch_maker(processor, sources), StepSampler([len(sources[0])], [1.0], 4, 0),
                   _spec(tmp_path, steps=2), extra=extra)
    assert res.steps == 2 and all(math.isfinite(x) for x in res.losses)
    stats = _release_graphs(graphs, extra)
    assert stats == {"eager": 2 * len(layers)}  # CPU tensors: every layer call ran eagerly
    assert all("forward" not in vars(layer) for layer in layers)
    if extra is not None:
        assert extra.graphs is None


def test_nothing_trainable_is_an_error(tmp_path):
    model, processor, rows, root = tiny_model(tmp_path)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        run_loop(model, lambda s, i: {}, StepSampler([3], [1.0], 2, 0), _spec(tmp_path))


# ---------------------------------------------------------------------------------------------
# end to end on a tiny generated set: align → train (mrt, frozen) → predict
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from components.core.config import AlignParams, DataParams
    from components.data.generate import write_dataset
    from components.align.joint import run_align
    from tiny_llava import TINY

    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    write_dataset(DataParams(out_dir=str(data), image_size=32, train_per_task=6, heldout_per_task=3, heldin_per_task=1, align_size=80,
                             text_per_type=3, mme_images_per_subtask=1), progress=False)
    ap = AlignParams(data_dir=str(data), out_dir=str(root / "base"), report=str(root / "align.json"), tiny=TINY,
                     steps=12, batch_size=8, eval_size=8, max_length=256)
    report = run_align(ap)
    return root, data, report


def test_align_writes_a_reloadable_base_and_report(tiny_pipeline):
    import json

    from components.model.backbone import load_base

    root, data, report = tiny_pipeline
    saved = json.loads((root / "align.json").read_text())
    assert saved["steps"] == 12 and saved["trained"] is True
    assert saved["loss_final"] < saved["loss_first"]
    for key in ("caption_exact_match", "caption_token_accuracy", "text_exact_match", "wall_s"):
        assert 0 <= saved[key] if key != "wall_s" else saved[key] > 0
    assert not (root / "base" / "checkpoints").exists()  # the base folder is a clean LLaVA folder
    model, processor = load_base(root / "base")
    assert processor.tokenizer.image_token == "<image>"


def test_train_mrt_and_frozen_end_to_end(tiny_pipeline):
    import json

    from components.evaluation.inference import load_model, predict
    from components.train.training import train

    root, data, _ = tiny_pipeline
    common = dict(base_dir=str(root / "base"), data_dir=str(data), steps=6, batch_size=8, save_every=3,
                  eval_per_task=2, max_length=256, editors=SMALL_EDITORS)
    rep = train(TrainParams(method="mrt", out_dir=str(root / "mrt"), report=str(root / "mrt.json"),
                            curve=str(root / "mrt.csv"), **common))
    assert rep["method"] == "mrt" and rep["steps"] == 6
    assert 0 < rep["trainable_pct"] < 100
    assert (root / "mrt" / "editor_config.json").is_file()
    assert set(rep["heldout"]) and all(t.startswith("hx_") for t in rep["heldout"])
    assert json.loads((root / "mrt.json").read_text())["trainable_params"] == rep["trainable_params"]
    assert not (root / "mrt" / "checkpoints").exists()  # finished: its checkpoints are gone, never resumed
    assert rep["cuda_graphs"] is None
    weights = (root / "mrt" / "editors.safetensors").read_bytes()
    # a second run trains again from scratch (cuda_graphs is a speed knob: on CPU every layer runs
    # eagerly) and, with the same seed, saves the same editors
    again = train(TrainParams(method="mrt", out_dir=str(root / "mrt"), report=str(root / "mrt2.json"),
                              curve=str(root / "mrt2.csv"), cuda_graphs=True, **common))
    assert again["resumed_from"] is None and again["steps"] == 6
    assert again["cuda_graphs"] == {"eager": again["cuda_graphs"]["eager"]} and again["cuda_graphs"]["eager"] > 0
    assert (root / "mrt" / "editors.safetensors").read_bytes() == weights

    frz = train(TrainParams(method="frozen", out_dir=str(root / "frozen"), report=str(root / "frozen.json"),
                            curve=str(root / "frozen.csv"), **common))
    assert frz["trainable_params"] == 0 and frz["steps"] == 0
    assert load_model(root / "base", root / "frozen").kind == "frozen"
    answers = predict(root / "base", root / "mrt", [None], ["Image description: a red circle\nWhat color?"])
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_composed_align_trains_only_the_projector(tiny_pipeline, tmp_path):
    import json

    from components.model.backbone import load_base
    from components.core.config import AlignParams
    from components.align.joint import run_align
    from tiny_llava import write_clip_and_llama

    root, data, _ = tiny_pipeline
    clip_dir, lm_dir, lm, _ = write_clip_and_llama(tmp_path)
    rep = run_align(AlignParams(backbone="composed", vision_model=str(clip_dir), language_model=str(lm_dir),
                                train_language_model=False, data_dir=str(data), out_dir=str(tmp_path / "base"),
                                report=str(tmp_path / "align.json"), steps=4, batch_size=4, eval_size=4, max_length=512))
    model, _ = load_base(tmp_path / "base")
    n_proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert rep["trainable_params"] == n_proj
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    assert json.loads((tmp_path / "align.json").read_text())["backbone"] == "composed"


@pytest.mark.slow
def test_mrt_beats_frozen_base_on_heldout_tasks(tmp_path):
    """The method's claim in miniature: on a base aligned from scratch, a short MRT run lowers its
    training loss and answers held-out instruction types better than the frozen base (≈ 3-4 min, 2 cores)."""
    from components.core.config import AlignParams, DataParams, TinyModelParams
    from components.data.generate import write_dataset
    from components.align.joint import run_align
    from components.train.training import train

    data = tmp_path / "data"
    write_dataset(DataParams(out_dir=str(data), train_per_task=60, heldout_per_task=20, heldin_per_task=1, align_size=1500,
                             text_per_type=60, mme_images_per_subtask=1), progress=False)
    tiny = TinyModelParams(patch_size=16, lm_hidden=128, lm_intermediate=384)
    run_align(AlignParams(data_dir=str(data), out_dir=str(tmp_path / "base"), report=str(tmp_path / "align.json"),
                          tiny=tiny, steps=700, eval_size=50))
    common = dict(base_dir=str(tmp_path / "base"), data_dir=str(data), eval_per_task=20)
    frozen = train(TrainParams(method="frozen", out_dir=str(tmp_path / "f"), report=str(tmp_path / "f.json"),
                               curve=str(tmp_path / "f.csv"), **common))
    mrt = train(TrainParams(method="mrt", steps=200, out_dir=str(tmp_path / "m"), report=str(tmp_path / "m.json"),
                            curve=str(tmp_path / "m.csv"), **common))
    assert mrt["loss_final"] < mrt["loss_first"]
    assert mrt["heldout_mean"] > frozen["heldout_mean"] + 0.1, (mrt["heldout_mean"], frozen["heldout_mean"])
