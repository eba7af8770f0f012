"""Plain DeepSpeed ZeRO-3 training, nothing of memlab in the process: the
reference memlab's refusals are checked against.

    python scripts/plain_deepspeed.py MODEL_CONFIG.json DS_CONFIG.json [--steps 3] [--seq-len 64] [--masters]

Builds the model as a Hugging Face Trainer script does (transformers'
`from_config` while an `HfDeepSpeedConfig` is live: the model is created
under `deepspeed.zero.Init` and its weights are initialized partition by
partition), trains `--steps` steps on random token ids (seed 0) with
`engine.backward` and `engine.step`, and prints one JSON line:
{"ok": true, "losses": [...]} or {"ok": false, "step": N, "phase": ..., "error": "..."}; with
--masters, "masters": {parameter name: its fp32 master weights after training, as hex of their bytes'
SHA-256} (deepspeed.utils.safe_get_full_fp32_param).
The swap folder is the ds_config's nvme_path; the script creates it if needed
and removes nothing. Run it on a single rank (it sets the rendezvous
variables itself when they are missing).
"""
import argparse
import json
import os
import sys
import traceback


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_config")
    parser.add_argument("ds_config")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--masters", action="store_true", help="print a digest of each fp32 master after training")
    args = parser.parse_args(argv)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"),
                        ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    with open(args.model_config) as f:
        model_config = json.load(f)
    with open(args.ds_config) as f:
        ds_config = json.load(f)
    zero = ds_config.get("zero_optimization", {})
    for part in ("offload_param", "offload_optimizer"):
        path = (zero.get(part) or {}).get("nvme_path")
        if path:
            os.makedirs(path, exist_ok=True)

    import deepspeed
    import torch
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    phase, step, losses = "init", 0, []
    try:
        deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                                   verbose=False)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if (ds_config.get("bf16") or {}).get("enabled") else torch.float32
        config = transformers.AutoConfig.for_model(**model_config)
        live = HfDeepSpeedConfig(ds_config)  # noqa: F841  kept alive: transformers builds under zero.Init
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.train()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        batch = ds_config.get("train_micro_batch_size_per_gpu", 1)
        for step in range(1, args.steps + 1):
            ids = torch.randint(0, config.get_text_config().vocab_size, (batch, args.seq_len))
            phase = "forward"
            loss = engine(input_ids=ids, labels=ids).loss
            phase = "backward"
            engine.backward(loss)
            phase = "optimizer_step"
            engine.step()
            losses.append(loss.item())
    except Exception as exc:  # the crash is the result
        tail = traceback.format_exc().strip().splitlines()[-12:]
        print(json.dumps({"ok": False, "step": step, "phase": phase, "losses": losses,
                          "error": f"{type(exc).__name__}: {exc}", "traceback": tail}), flush=True)
        return 1
    result = {"ok": True, "losses": losses}
    if args.masters:
        import hashlib

        from deepspeed.utils import safe_get_full_fp32_param

        result["masters"] = {name: hashlib.sha256(safe_get_full_fp32_param(p).numpy().tobytes()).hexdigest()
                             for name, p in engine.module.named_parameters()}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
