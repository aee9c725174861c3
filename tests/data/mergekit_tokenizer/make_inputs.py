"""Stand-in checkpoints with different tokenizers, for tests/mergekit_tokenizer.rs (run by
make.sh, with mergekit's venv, whose `tokenizers` package writes the tokenizer.json files).

Three tiny Llama-shaped bf16 checkpoints (2 layers, hidden 48: an embedding is more than one 1024-element chunk, cut mid-row), seeded, each with its own
WordLevel tokenizer:
- `inputs/base`: 24 tokens (`<unk>`, `<s>`, `</s>` (added, special), 21 words); template A.
- `inputs/ft1`: the same words, the first six in another order, plus the word `delta` and the
  added special token `<tool>` (26 tokens, 26 rows); template B.
- `inputs/ft2`: the base's vocabulary plus the added tokens `<tool>` (the same settings) and
  `<img>` (26 tokens), `vocab_size` 28 (two padding rows, as models padded to a multiple);
  template B.
`ftK = base + small delta` on every row a token shares with the base (ft1's rows follow its
own ids); a token's own rows are random.
"""

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

SEED = 20261207
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 48, 64, 2, 2, 1
HEAD_DIM = HIDDEN // HEADS
WORDS = [f"w{i}" for i in range(21)]
SPECIAL = ["<unk>", "<s>", "</s>"]
TEMPLATE_A = "{% for m in messages %}A: {{ m['content'] }}\n{% endfor %}"
TEMPLATE_B = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def layer_shapes():
    out = {}
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
    return out


def config(vocab_size):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
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


def tokenizer(vocab, added):
    """A WordLevel tokenizer: `vocab` its model's tokens in id order, then `added` (content,
    special) as added tokens."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<s>", "</s>"]])
    for content, special in added:
        if special:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        else:
            tok.add_tokens([AddedToken(content, normalized=True)])
    return tok


def write(folder, tensors, vocab_size, tok, template):
    os.makedirs(folder, exist_ok=True)
    save_file(
        {n: torch.from_numpy(np.asarray(x, dtype=np.float32)).to(torch.bfloat16) for n, x in tensors.items()},
        f"{folder}/model.safetensors",
        metadata={"format": "pt"},
    )
    with open(f"{folder}/config.json", "w") as f:
        json.dump(config(vocab_size), f, indent=2)
        f.write("\n")
    tok.save(f"{folder}/tokenizer.json")
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512,
        "chat_template": template,
    }
    with open(f"{folder}/tokenizer_config.json", "w") as f:
        json.dump(tc, f, indent=2)
        f.write("\n")


def main():
    rng = np.random.default_rng(SEED)
    base_vocab = SPECIAL + WORDS
    layers = {}
    for name, shape in layer_shapes().items():
        if name.endswith("norm.weight"):
            layers[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            layers[name] = 0.05 * rng.standard_normal(shape)
    rows = {t: 0.05 * rng.standard_normal((2, HIDDEN)) for t in base_vocab}

    def delta(x):
        return x + 0.05 * np.abs(x).mean() * rng.standard_normal(x.shape)

    def embeds(vocab, n_rows, own):
        e = np.zeros((n_rows, HIDDEN))
        h = np.zeros((n_rows, HIDDEN))
        for i, t in enumerate(vocab):
            r = own[t] if t in own else delta(rows[t])
            e[i], h[i] = r[0], r[1]
        for i in range(len(vocab), n_rows):
            e[i], h[i] = 0.05 * rng.standard_normal((2, HIDDEN))
        return {"model.embed_tokens.weight": e, "lm_head.weight": h}

    base = dict(layers)
    base.update(embeds(base_vocab, len(base_vocab), rows))
    write("inputs/base", base, len(base_vocab), tokenizer(base_vocab, []), TEMPLATE_A)

    ft1_words = SPECIAL + WORDS[5::-1] + WORDS[6:] + ["delta"]
    new_rows = {t: 0.05 * rng.standard_normal((2, HIDDEN)) for t in ["delta", "<tool>"]}
    ft1 = {n: delta(x) for n, x in layers.items()}
    ft1.update(embeds(ft1_words + ["<tool>"], 26, new_rows))
    write("inputs/ft1", ft1, 26, tokenizer(ft1_words, [("<tool>", True)]), TEMPLATE_B)

    new_rows = {t: 0.05 * rng.standard_normal((2, HIDDEN)) for t in ["<tool>", "<img>"]}
    ft2 = {n: delta(x) for n, x in layers.items()}
    ft2.update(embeds(base_vocab + ["<tool>", "<img>"], 28, new_rows))
    write("inputs/ft2", ft2, 28, tokenizer(base_vocab, [("<tool>", True), ("<img>", True)]), TEMPLATE_B)


if __name__ == "__main__":
    main()
