"""Inputs and the peft side of benches/lora_vs_peft.sh (run with the peft virtualenv's python).

  python lora_vs_peft.py make DIR HIDDEN LAYERS RANKS      # base + adapters (seeded)
  python lora_vs_peft.py peft DIR COMBINATION OUT [DENSITY] # peft's add_weighted_adapter
  python lora_vs_peft.py compare LADLE_OUT PEFT_OUT         # the two outputs' products

The base is a stack of LAYERS decoder layers holding only q_proj and v_proj (HIDDEN × HIDDEN,
bf16, no bias): the shapes of a 7B Llama's attention projections without the rest of the model
(peft and ladle only touch the adapted modules). One adapter per rank in RANKS (comma
separated), float32 factors, `lora_alpha = 2·r`, target q_proj and v_proj, in peft's file
format. `peft` loads the base and the adapters as the conformance pack does, then times
`add_weighted_adapter` alone and the whole call (load + merge + save), printing
`merge_s=… total_s=…`.
"""

import json
import os
import sys
import time

import torch
from safetensors.torch import save_file


class Attn(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.q_proj = torch.nn.Linear(h, h, bias=False)
        self.v_proj = torch.nn.Linear(h, h, bias=False)


class Layer(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.self_attn = Attn(h)


class Inner(torch.nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer(h) for _ in range(n)])


class Model(torch.nn.Module):
    def __init__(self, h, n):
        super().__init__()
        self.model = Inner(h, n)

    def forward(self, x):
        return x


def make(d, h, n, ranks):
    g = torch.Generator().manual_seed(0)
    os.makedirs(f"{d}/base", exist_ok=True)
    base = {}
    for l in range(n):
        for p in ("q_proj", "v_proj"):
            w = torch.randn(h, h, generator=g) * 0.02
            base[f"model.layers.{l}.self_attn.{p}.weight"] = w.to(torch.bfloat16)
    save_file(base, f"{d}/base/model.safetensors", metadata={"format": "pt"})
    with open(f"{d}/base/config.json", "w") as f:
        json.dump({"hidden_size": h, "num_hidden_layers": n}, f)
    for i, r in enumerate(ranks):
        a = f"{d}/adapters/a{i}"
        os.makedirs(a, exist_ok=True)
        t = {}
        for l in range(n):
            for p in ("q_proj", "v_proj"):
                k = f"base_model.model.model.layers.{l}.self_attn.{p}"
                t[f"{k}.lora_A.weight"] = torch.randn(r, h, generator=g) / h**0.5
                t[f"{k}.lora_B.weight"] = torch.randn(h, r, generator=g) * 0.01
        save_file(t, f"{a}/adapter_model.safetensors", metadata={"format": "pt"})
        cfg = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 2 * r,
            "target_modules": ["q_proj", "v_proj"],
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "base_model_name_or_path": f"{d}/base",
        }
        with open(f"{a}/adapter_config.json", "w") as f:
            json.dump(cfg, f)


def peft_run(d, combination, out, density):
    from peft import PeftModel
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    cfg = json.load(open(f"{d}/base/config.json"))
    with torch.device("meta"):
        model = Model(cfg["hidden_size"], cfg["num_hidden_layers"])
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.load_state_dict(load_file(f"{d}/base/model.safetensors"))
    names = sorted(os.listdir(f"{d}/adapters"))
    pm = PeftModel.from_pretrained(model, f"{d}/adapters/{names[0]}", adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(f"{d}/adapters/{n}", adapter_name=n)
    weights = [1.0 / len(names)] * len(names)
    kw = {}
    if density is not None:
        kw["density"] = density
    torch.manual_seed(0)
    t1 = time.perf_counter()
    pm.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kw)
    t2 = time.perf_counter()
    pm.save_pretrained(out, selected_adapters=["merged"])
    t3 = time.perf_counter()
    print(f"merge_s={t2 - t1:.3f} total_s={t3 - t0:.3f} threads={torch.get_num_threads()}")


def compare(ladle_out, peft_out):
    """Per module, max|P_ladle - P_peft| / max|P_peft| of the loaded deltas `s·B@A` (float64);
    prints the worst over the modules as `product_rel_diff=…`."""
    import glob

    from safetensors.torch import load_file

    def deltas(d):
        [f] = glob.glob(f"{d}/**/adapter_model.safetensors", recursive=True)
        cfg = json.load(open(os.path.join(os.path.dirname(f), "adapter_config.json")))
        r, alpha = cfg["r"], cfg["lora_alpha"]
        s = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
        t = load_file(f)
        out = {}
        for k, a in t.items():
            if k.endswith(".lora_A.weight"):
                b = t[k.replace("lora_A", "lora_B")]
                out[k[: -len(".lora_A.weight")]] = s * (b.double() @ a.double())
        return out

    got, want = deltas(ladle_out), deltas(peft_out)
    assert sorted(got) == sorted(want), (sorted(got)[:3], sorted(want)[:3])
    worst = max(((got[m] - want[m]).abs().max() / want[m].abs().max()).item() for m in want)
    print(f"product_rel_diff={worst:.2e} modules={len(want)}")


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), [int(r) for r in sys.argv[5].split(",")])
    else:
        peft_run(
            sys.argv[2],
            sys.argv[3],
            sys.argv[4],
            float(sys.argv[5]) if len(sys.argv) > 5 else None,
        )
