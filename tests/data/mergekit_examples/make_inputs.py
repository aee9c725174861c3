"""Stand-in checkpoints for mergekit's examples (run by make.sh, with mergekit's venv).

Four tiny Llama-shaped checkpoints, seeded: `inputs/base` and `inputs/ft1..ft3` (`ftK = base +
small delta`, the deltas of two fine-tunes share half their variance, so their cosine is about
0.5). 40 layers, as the examples' slices need ([0, 40], [20, 40]); hidden 16, so each file is
about 0.2 MB. bf16, as the models the examples name.
"""

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

SEED = 20261203
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 16, 32, 40, 2, 1
HEAD_DIM = HIDDEN // HEADS


def shapes():
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (HIDDEN,)
        out[p + "post_attention_layernorm.weight"] = (HIDDEN,)
        out[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        out[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        out[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        out[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def config():
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def main():
    rng = np.random.default_rng(SEED)
    base, shared = {}, {}
    for name, shape in shapes().items():
        if name.endswith("norm.weight"):
            base[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            base[name] = 0.05 * rng.standard_normal(shape)
        shared[name] = rng.standard_normal(shape)
    models = {"base": base}
    for k in (1, 2, 3):
        models[f"ft{k}"] = {
            name: x
            + 0.05
            * np.abs(x).mean()
            * (np.sqrt(0.5) * shared[name] + np.sqrt(0.5) * rng.standard_normal(x.shape))
            for name, x in base.items()
        }
    for folder, tensors in models.items():
        os.makedirs(f"inputs/{folder}", exist_ok=True)
        save_file(
            {
                n: torch.from_numpy(np.asarray(x, dtype=np.float32)).to(torch.bfloat16)
                for n, x in tensors.items()
            },
            f"inputs/{folder}/model.safetensors",
            metadata={"format": "pt"},
        )
        with open(f"inputs/{folder}/config.json", "w") as f:
            json.dump(config(), f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
