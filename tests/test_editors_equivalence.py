"""The two implementations of the editors (EditorParams.impl) compute the same method: on the same
tiny LLaVA, inputs and initial editors, `reference` (components/editors/hooks.py) and `fast`
(components/editors/fast/) give the same logits, the same gradient of every editor parameter, and
after a few optimiser steps the same saved files and the same generation scores, to rounding. On CPU the fast path runs its
operator path, and its Triton kernels in Triton's interpreter; the `gpu` case runs it on CUDA."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from components.core.config import EditorParams
from components.editors import attach, save_editors
from components.editors.fast import kernels
from test_editors import batch, tiny_llava

PARAMS = dict(visual={"layers": "all", "rank": 2}, projector={"enabled": True, "rank": 2},
              prefix={"layers": "all", "rank": 2, "length": 2}, suffix={"layers": "all", "rank": 3, "length": 2})


def _inputs(device: torch.device) -> dict[str, torch.Tensor]:
    b = batch([[10, 11, 12, 13, 14, 15], [20, 21, 22]], answers=[[30, 31], [32, 33, 34]], left_pad=True)
    return {k: v.to(device) for k, v in b.items()}


def _run(impl: str, device: torch.device, out_dir, steps: int = 3):
    """Logits and editor gradients of the first forward/backward, then `steps` Adam steps and a save."""
    model = tiny_llava(0).to(device)
    torch.manual_seed(1)  # the same initial editors for both implementations
    editors = attach(model, EditorParams.model_validate({**PARAMS, "impl": impl}))
    editors.train()
    optimiser = torch.optim.Adam(editors.parameters(), lr=1e-2)
    inputs = _inputs(device)
    try:
        out = model(**inputs)
        out.loss.backward()
        logits = out.logits.detach().cpu()
        grads = {k: g.detach().cpu().clone() for k, g in editors.editor_grads().items()}  # by state-dict key
        optimiser.step()
        for _ in range(steps - 1):
            optimiser.zero_grad()
            model(**inputs).loss.backward()
            optimiser.step()
        save_editors(editors, out_dir, "tiny", "sha256:test")
        model.eval()
        editors.eval()
        prompt = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():  # generation: the prompt pass edited, the decode steps not
            generated = model.generate(**prompt, max_new_tokens=3, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True, pad_token_id=0)
        scores = torch.stack(generated.scores).cpu()
    finally:
        editors.detach()
    saved = load_file(str(out_dir / "editors.safetensors"))
    return logits, grads, saved, (out_dir / "editor_config.json").read_text(), scores


def _check(tmp_path, device: torch.device, atol: float) -> None:
    logits_r, grads_r, saved_r, config_r, scores_r = _run("reference", device, tmp_path / "reference")
    logits_f, grads_f, saved_f, config_f, scores_f = _run("fast", device, tmp_path / "fast")
    torch.testing.assert_close(logits_f, logits_r, atol=atol, rtol=1e-4)
    assert grads_f.keys() == grads_r.keys() and len(grads_r) == 3 * (2 + 1 + 2 + 2)  # 2 readable vision layers
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], atol=atol, rtol=1e-4, msg=name)
    assert saved_f.keys() == saved_r.keys()
    for name in saved_r:
        torch.testing.assert_close(saved_f[name], saved_r[name], atol=atol, rtol=1e-4, msg=name)
    assert _without_sha(config_f) == _without_sha(config_r)  # the config does not record the impl
    torch.testing.assert_close(scores_f, scores_r, atol=atol, rtol=1e-4)  # generation with the trained editors


def _without_sha(config: str) -> str:
    return "\n".join(line for line in config.splitlines() if "weights_sha256" not in line)


@pytest.mark.parametrize("kernels_on_cpu", [False, True], ids=["operator-path", "triton-interpreter"])
def test_reference_and_fast_agree_on_cpu(tmp_path, kernels_on_cpu):
    if kernels_on_cpu and (os.environ.get("TRITON_INTERPRET") != "1" or kernels.import_triton() is None):
        pytest.skip("Triton's interpreter is off (a GPU is present): the gpu case covers the kernels")
    kernels._triton.cache_clear()
    with kernels.on_cpu_in_interpreter(kernels_on_cpu):
        _check(tmp_path, torch.device("cpu"), atol=1e-5)
    kernels._triton.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reference_and_fast_agree_on_cuda(tmp_path):
    _check(tmp_path, torch.device("cuda"), atol=1e-4)
