"""What a vLLM server keeps of its loaded tensors (integrations/vllm/capture.py), without vLLM
processes: the copies of each CAPTURE mode, loader-set state, online quantization. The modes
with real vLLM: tests/test_vllm_capture.py."""

import pytest
import torch
from torch import nn

from netloader.integrations.vllm import capture
from netloader.integrations.vllm.config import NetloaderConfig
from netloader.snapshot import Snapshot


def loaded() -> dict[str, torch.Tensor]:
    embed = torch.randn(64, 16, dtype=torch.bfloat16)
    return {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied
        "q.weight": torch.randint(-128, 128, (32, 16), dtype=torch.int8),
        "q.weight_scale": torch.rand(32, 1),
        "view.weight": torch.randn(8, 8).t(),  # not contiguous
        "empty": torch.empty(0),
        "flag": torch.tensor(True),
    }


@pytest.mark.parametrize("mode", ["host", "device"])
def test_copies_keep_the_bytes_and_the_ties_and_share_nothing(mode):
    tensors = loaded()
    kept = capture.kept(tensors, mode)
    assert list(kept) == list(tensors)
    for name, t in tensors.items():
        assert torch.equal(kept[name], t) and kept[name].dtype == t.dtype, name
        if t.numel():
            assert kept[name].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert kept["lm_head.weight"] is kept["embed.weight"]
    before = Snapshot(kept).digests
    for t in tensors.values():  # post-processing rewrites the originals in place
        if t.numel() and t.dtype != torch.bool:
            t.zero_()
    assert Snapshot(kept).digests == before


def test_references_are_the_tensors_and_int8_cache_keeps_its_meaning():
    tensors = loaded()
    config = NetloaderConfig.parse({"CAPTURE": "reference", "INT8_CACHE": "dram"})
    served = capture.served(tensors, config)
    assert all(served[n] is tensors[n] for n in tensors if n != "q.weight")
    assert served["q.weight"] is not tensors["q.weight"]  # a pristine int8 copy
    assert torch.equal(served["q.weight"], tensors["q.weight"])
    names = NetloaderConfig.parse({"INT8_CACHE": "hbm", "INT8_CACHE_NAME": ["other"]})
    assert all(capture.served(tensors, names)[n] is tensors[n] for n in tensors)


def test_auto_is_references_on_the_cpu_and_host_copies_on_accelerators():
    assert capture.resolve("auto", torch.device("cpu")) == "reference"
    assert capture.resolve("auto", torch.device("cuda", 0)) == "host"
    assert capture.resolve("auto", torch.device("xpu", 0)) == "host"
    assert capture.resolve("device", torch.device("cpu")) == "device"
    served = capture.served(loaded(), NetloaderConfig.parse({}))  # on the CPU: references
    assert served["embed.weight"].data_ptr() == served["lm_head.weight"].data_ptr()


def test_a_bad_capture_mode_is_refused_with_the_allowed_ones():
    with pytest.raises(Exception, match="CAPTURE = 'gpu' is not allowed; use one of auto, host"):
        NetloaderConfig.parse({"CAPTURE": "gpu"})
    assert NetloaderConfig.parse({"CAPTURE": "HOST"}).capture == "host"


class Experts(nn.Module):
    """Stands for vLLM's RoutedExperts: its weight loader fills ``_loaded_expert_biases``."""

    def __init__(self):
        super().__init__()
        self.w13_bias = nn.Parameter(torch.zeros(4))
        self._loaded_expert_biases: set[str] = set()


class Moe(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Experts(), nn.Linear(2, 2), Experts()])


def test_loaded_expert_biases_travel_with_the_weights():
    seed, client = Moe(), Moe()
    seed.layers[0]._loaded_expert_biases = {"w13_bias", "w2_bias"}
    seed.layers[2]._loaded_expert_biases = {"w2_bias"}
    sent = capture.loader_state(seed, torch.device("cpu"))
    placeholder = capture.loader_state(client, torch.device("cpu"))
    assert placeholder[capture.EXPERT_BIASES_TENSOR].shape == (2, 2)  # same manifest entry
    placeholder[capture.EXPERT_BIASES_TENSOR].copy_(sent[capture.EXPERT_BIASES_TENSOR])  # pulled
    capture.set_loader_state(client, placeholder)
    assert client.layers[0]._loaded_expert_biases == {"w13_bias", "w2_bias"}
    assert client.layers[2]._loaded_expert_biases == {"w2_bias"}
    assert capture.loader_state(nn.Linear(2, 2), torch.device("cpu")) == {}


def test_a_model_quantized_online_is_recognised():
    online = pytest.importorskip("vllm.model_executor.layers.quantization.online.fp8")
    model = Moe()
    assert capture.online_quantized(model) is None
    # A real online method's class; building one needs a platform's kernels, so no __init__.
    model.layers[1].quant_method = object.__new__(online.Fp8PerTensorOnlineLinearMethod)
    assert capture.online_quantized(model) == "layers.1 (Fp8PerTensorOnlineLinearMethod)"
