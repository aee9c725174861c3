#!/usr/bin/env python3
"""Inputs and recipes for benches/compare_outputs.sh (standard library only, deterministic).

    python3 benches/compare_inputs.py OUT_DIR

Writes OUT_DIR/{base,ft1,ft2,ft3}: Llama-shaped bf16 checkpoints (config.json +
model.safetensors), 2 layers, tensors of up to 2.9 M elements (larger than the engine's default
2 Mi-element chunk, so chunk boundaries and whole-tensor paths are both exercised), about 55 MB
each; and OUT_DIR/recipe-*.json: one JSON recipe per merge method (and a few variants: scope
row/model, per-tensor weights, f32 compute, f32 output), with model paths relative to the
recipe (ladle refuses `..` in URLs, so the recipes sit beside the models). Fine-tunes are the base with random low mantissa bytes, so task vectors are small and
many magnitudes are equal (which exercises the selection tie rules); one tensor has a zero
pattern shared by every model (sparse soups).
"""

import json
import os
import random
import struct
import sys

HIDDEN, KV, MLP, VOCAB, LAYERS = 1024, 256, 2816, 2100, 2


def tensors():
    yield "model.embed_tokens.weight", [VOCAB, HIDDEN]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", [HIDDEN]
        yield p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]
        yield p + "self_attn.k_proj.weight", [KV, HIDDEN]
        yield p + "self_attn.v_proj.weight", [KV, HIDDEN]
        yield p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]
        yield p + "post_attention_layernorm.weight", [HIDDEN]
        yield p + "mlp.gate_proj.weight", [MLP, HIDDEN]
        yield p + "mlp.up_proj.weight", [MLP, HIDDEN]
        yield p + "mlp.down_proj.weight", [HIDDEN, MLP]
    yield "model.norm.weight", [HIDDEN]
    yield "lm_head.weight", [VOCAB, HIDDEN]


# High byte of a bf16 (sign + 7 exponent bits): keep the sign, exponents 116..123 (2^-11..2^-4).
HIGH = bytes((b & 0x80) | (0x3A + (b & 3)) for b in range(256))
# Norm weights near 1: exponent 126/127.
NORM_HIGH = bytes(0x3F if b & 1 else 0x3E for b in range(256))
SHARED_ZEROS = "model.layers.1.self_attn.k_proj.weight"


def base_tensor(rng, name, n):
    raw = rng.randbytes(2 * n)
    out = bytearray(raw)
    table = NORM_HIGH if "norm" in name else HIGH
    out[1::2] = raw[1::2].translate(table)
    return out


def fine_tune(rng, name, base):
    out = bytearray(base)
    n = len(base) // 2
    out[0::2] = rng.randbytes(n)
    return out


def write(folder, data):
    os.makedirs(folder, exist_ok=True)
    header, offset = {}, 0
    for name, shape, buf in data:
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len(buf)]}
        offset += len(buf)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, buf in data:
            f.write(buf)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def recipes():
    m = lambda k: k  # noqa: E731
    three = lambda **p: [  # noqa: E731
        {"uri": m(f"ft{i}"), "weight": w, **({"parameters": p} if p else {})}
        for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))
    ]
    gta = lambda method, params=None, **per: {  # noqa: E731
        "method": method, "base_model": m("base"), "models": three(**per),
        "parameters": params or {}}
    r = {
        "linear": {"method": "linear", "models": [{"uri": m(k)} for k in ("base", "ft1", "ft2", "ft3")]},
        "linear_per_tensor": {"method": "linear", "models": [
            {"uri": m("ft1"), "parameters": {"weight": [0.2, 0.8]}},
            {"uri": m("ft2"), "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]}},
            {"uri": m("ft3"), "weight": 0.1}], "output": {"dtype": "float32"}},
        "task_arithmetic": gta("task_arithmetic", {"lambda": 0.8}),
        "ties": gta("ties", density=0.5),
        "ties_f32": gta("ties", {"compute_dtype": "float32"}, density=0.4),
        "ties_row": gta("ties", {"scope": "row"}, density=0.3),
        "ties_model": gta("ties", {"scope": "model"}, density=0.5),
        "breadcrumbs": gta("breadcrumbs", density=0.9, gamma=0.01),
        "breadcrumbs_ties": gta("breadcrumbs_ties", {"scope": "model"}, density=0.8, gamma=0.05),
        "dare_linear": gta("dare_linear", {"seed": 7}, density=0.5),
        "dare_ties": gta("dare_ties", {"seed": 8, "rescale": False}, density=[0.3, 0.7]),
        "della": gta("della", {"seed": 9}, density=0.5, epsilon=0.1),
        "della_linear": gta("della_linear", {"seed": 10}, density=0.6, epsilon=0.2),
        "slerp": {"method": "slerp", "base_model": m("base"), "models": [{"uri": m("ft1")}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}},
        "nearswap": {"method": "nearswap", "base_model": m("base"), "models": [{"uri": m("ft1")}],
                     "parameters": {"t": 0.001}},
        "nuslerp": {"method": "nuslerp", "base_model": m("base"),
                    "models": [{"uri": m("ft1"), "weight": 0.7}, {"uri": m("ft2"), "weight": 0.3}]},
        "nuslerp_rows": {"method": "nuslerp",
                         "models": [{"uri": m("ft1"), "weight": 0.6}, {"uri": m("ft2"), "weight": 0.4}],
                         "parameters": {"nuslerp_flatten": False}},
        "model_stock": {"method": "model_stock", "base_model": m("base"),
                        "models": [{"uri": m(k)} for k in ("ft1", "ft2", "ft3")],
                        "parameters": {"filter_wise": True}},
        "karcher": {"method": "karcher", "models": [{"uri": m(k)} for k in ("ft1", "ft2", "ft3")]},
        "sce": {"method": "sce", "base_model": m("base"),
                "models": [{"uri": m(k)} for k in ("ft1", "ft2", "ft3")],
                "parameters": {"select_topk": 0.5}},
        "passthrough": {"method": "passthrough", "slices": [
            {"sources": [{"uri": m("base"), "layer_range": [0, 2]}]},
            {"sources": [{"uri": m("ft1"), "layer_range": [1, 2],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1}]}}]}]},
        "sparse_soup": {"method": "sparse_soup", "models": [{"uri": m(k)} for k in ("ft1", "ft2", "ft3")]},
        "ema": {"method": "ema", "models": [{"uri": m(k)} for k in ("ft1", "ft2", "ft3")],
                "parameters": {"decay": 0.8}},
        "karcher_base": {"method": "karcher", "base_model": m("base"),
                         "models": [{"uri": m(k)} for k in ("ft1", "ft2", "ft3")]},
        "multislerp": {"method": "multislerp", "base_model": m("base"), "models": three()},
        "multislerp_nobase": {"method": "multislerp", "models": three(),
                              "parameters": {"normalize_weights": False}},
        "arcee_fusion": {"method": "arcee_fusion", "base_model": m("base"),
                         "models": [{"uri": m("ft1")}]},
        "ram": {"method": "ram", "base_model": m("base"),
                "models": [{"uri": m(k)} for k in ("ft1", "ft2", "ft3")]},
        "ramplus_tl": {"method": "ramplus_tl", "base_model": m("base"),
                       "models": [{"uri": m(k)} for k in ("ft1", "ft2", "ft3")],
                       "parameters": {"r": 0.2, "alpha": 0.5}, "output": {"dtype": "bfloat16"}},
        "ties_cast_f16": {**gta("ties", {"compute_dtype": "float16"}, density=0.5),
                          "input_dtype": "float16", "output": {"dtype": "float16"}},
    }
    for name, body in r.items():
        body.setdefault("output", {})["uri"] = f"unused-{name}"
        yield name, body


def main():
    out = sys.argv[1]
    rng = random.Random(20260105)
    bases = []
    for name, shape in tensors():
        n = 1
        for d in shape:
            n *= d
        bases.append((name, shape, base_tensor(rng, name, n)))
    models = {"base": bases}
    for k in ("ft1", "ft2", "ft3"):
        models[k] = [(n, s, fine_tune(rng, n, b)) for n, s, b in bases]
    for k, data in models.items():
        for name, shape, buf in data:
            if name == SHARED_ZEROS:
                buf[: len(buf) // 2] = bytes(len(buf) // 2)
        write(os.path.join(out, k), data)
    for name, body in recipes():
        with open(os.path.join(out, f"recipe-{name}.json"), "w") as f:
            json.dump(body, f, indent=1)


if __name__ == "__main__":
    main()
