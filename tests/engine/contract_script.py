"""A plain DeepSpeed training script, with memlab's MemAscend switches installed
as the worker installs them, that exercises ZeRO-3's public contract beyond
forward/backward/step and prints what it saw as one JSON line:

- deepspeed.utils.safe_get_full_fp32_param / safe_get_full_optimizer_state of
  every parameter (sums: equal means equal values; safe_get_full_grad is left
  out: with the optimizer on NVMe stock DeepSpeed 0.19.8 fails it, the fp32
  gradient is None between steps);
- safe_set_full_fp32_param on the largest parameter, then a step;
- GatheredParameters: read every weight, modify one (modifier_rank 0), a step;
- gradient accumulation over 2 micro-batches (engine.backward twice, one step);
- save_16bit_model with stage3_gather_16bit_weights_on_model_save (the weights gathered whole).

    python contract_script.py SWAP_DIR '{"memascend.pool": "adaptive"}' [engine]

tests/engine/test_contracts.py runs it stock and with each switch.
"""
import json
import os
import sys

import torch

from memlab import Knobs, Lab
from memlab.ds_rules import DTYPE_BYTES
from memlab.engine import memascend
from memlab.engine.probes import Probes
from memlab.sizing import nvme_footprint
from memlab.telemetry import EventWriter

STREAMED = {"model_type": "qwen2", "vocab_size": 32768, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": True, "max_position_embeddings": 512}


def main(swap_dir, switches, engine):
    knobs, spec, resolved = Lab(os.path.join(swap_dir, "store")).plan(
        Knobs({**switches, "run.dtype": "fp32", "run.seq_len": 64, "run.micro_batch": 1}, engine=engine),
        STREAMED, None, None)
    v = resolved.values
    swap_path = os.path.join(swap_dir, "swap")
    os.makedirs(swap_path)
    footprint = nvme_footprint([t.numel for t in spec.tensors()], DTYPE_BYTES[v["run.dtype"]], v["aio.block_size"],
                               v["zero_optimization.sub_group_size"], v["aio.intra_op_parallelism"])
    os.environ.update({k: v for k, v in Lab._worker_env(None, resolved).items() if k.startswith(("DS_", "MALLOC_",
                                                                                                  "TORCH_EXT"))})
    probes = Probes(EventWriter(os.path.join(swap_dir, "events.jsonl")))
    memascend.install(v, {"probes": probes, "swap_path": swap_path, "region_bytes": footprint})

    import deepspeed
    import transformers
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = resolved.to_ds_config(swap_path)
    ds_config["gradient_accumulation_steps"] = 2
    ds_config["train_batch_size"] = 2
    ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    import socket

    with socket.socket() as free:  # one rank of its own: a free port for gloo's rendezvous
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  transformers builds the model under zero.Init
    model = transformers.AutoModelForCausalLM.from_config(spec.hf_config(), dtype=torch.float32)
    model.train()
    engine_, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    generator = torch.Generator().manual_seed(0)
    out = {"losses": []}

    def step():
        for _ in range(2):  # two micro-batches, one optimizer step
            ids = torch.randint(0, STREAMED["vocab_size"], (1, 64), generator=generator)
            loss = engine_(input_ids=ids, labels=ids).loss
            engine_.backward(loss)
            out["losses"].append(float(loss.item()))
        engine_.step()

    params = dict(engine_.module.named_parameters())
    largest = max(params, key=lambda n: params[n].ds_numel)
    step()
    step()
    out["fp32"] = {n: float(safe_get_full_fp32_param(p).double().sum()) for n, p in params.items()}
    out["exp_avg"] = {n: float(safe_get_full_optimizer_state(p, "exp_avg").double().abs().sum())
                      for n, p in params.items()}
    changed = safe_get_full_fp32_param(params[largest]) * 0.5
    safe_set_full_fp32_param(params[largest], changed)
    out["set_read_back"] = float(safe_get_full_fp32_param(params[largest]).double().sum())
    step()
    with deepspeed.zero.GatheredParameters(list(params.values())):
        out["gathered"] = {n: float(p.data.double().sum()) for n, p in params.items()}
    norm = params["model.norm.weight"]
    with deepspeed.zero.GatheredParameters([norm], modifier_rank=0):
        norm.data.mul_(0.5)
    step()
    # save_16bit_model: the weights gathered whole on rank 0 (stage3_gather_16bit_weights_on_model_save)
    saved = os.path.join(swap_dir, "model16")
    engine_.save_16bit_model(saved)
    state = torch.load(os.path.join(saved, "pytorch_model.bin"), weights_only=True)
    out["saved_16bit"] = {n: float(t.double().sum()) for n, t in state.items()}
    print("CONTRACT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "deepspeed")
