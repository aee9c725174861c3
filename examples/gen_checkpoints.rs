//! Generates Llama-shaped bf16 checkpoints for benchmarks (deterministic, fast).
//!
//! ```text
//! cargo run --release --example gen_checkpoints -- OUT_DIR [--models 3] [--size-gb 0.98] [--shard-mb 400]
//! ```
//!
//! Writes `OUT_DIR/ft-1 … ft-N`, each a Hugging Face style folder: `config.json`,
//! `model-0000k-of-0000n.safetensors` shards and `model.safetensors.index.json` (written last
//! in each folder). The layer count is chosen so that each model holds about `--size-gb` GB
//! (10^9 bytes) of bf16 tensor data; `--shard-mb` (10^6 bytes) bounds the tensor data of one
//! shard (a single tensor larger than that gets a shard of its own).
//!
//! Values are finite bf16 numbers: approximately normal (a sum of four uniforms from a
//! per-model xorshift64 generator), standard deviation 0.02 for weight matrices and 1 ± 0.02
//! for norm weights. The same arguments always give the same bytes. The safetensors files are
//! written by hand (8-byte little-endian header length, JSON header padded with spaces to a
//! multiple of 8, then the data), independently of ladle's own writer.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// TinyLlama-like dimensions (hidden 2048, 16 heads of 128, 4 KV heads, MLP 5632).
const HIDDEN: u64 = 2048;
const INTERMEDIATE: u64 = 5632;
const VOCAB: u64 = 32000;
const HEADS: u64 = 16;
const KV_HEADS: u64 = 4;
const KV_DIM: u64 = HIDDEN / HEADS * KV_HEADS;

/// Bytes written per `write_all` of tensor data.
const BUF_BYTES: usize = 16 << 20;

struct Spec {
    name: String,
    shape: Vec<u64>,
}

impl Spec {
    fn new(name: impl Into<String>, shape: &[u64]) -> Spec {
        Spec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    fn bytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * 2
    }

    fn is_norm(&self) -> bool {
        self.shape.len() == 1
    }
}

/// Elements of one decoder layer.
fn layer_elems() -> u64 {
    2 * HIDDEN * HIDDEN + 2 * KV_DIM * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
}

/// Elements outside the layers: embeddings, final norm, untied LM head (`embed`: their shape).
fn fixed_elems(embed: [u64; 2]) -> u64 {
    2 * embed[0] * embed[1] + HIDDEN
}

/// The number of layers whose total is nearest to `target_bytes` of bf16 (at least 1).
fn layers_for(target_bytes: u64, embed: [u64; 2]) -> u64 {
    let want = (target_bytes / 2).saturating_sub(fixed_elems(embed));
    ((want + layer_elems() / 2) / layer_elems()).max(1)
}

/// The tensors of a model with `layers` layers whose embedding and LM head are `embed`
/// (`[VOCAB, HIDDEN]` for the Llama shape; `--embed` makes a wide one, e.g. 65536x4096).
fn llama_tensors(layers: u64, embed: [u64; 2]) -> Vec<Spec> {
    let mut specs = vec![Spec::new("model.embed_tokens.weight", &embed)];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        specs.extend([
            Spec::new(format!("{p}.input_layernorm.weight"), &[HIDDEN]),
            Spec::new(format!("{p}.self_attn.q_proj.weight"), &[HIDDEN, HIDDEN]),
            Spec::new(format!("{p}.self_attn.k_proj.weight"), &[KV_DIM, HIDDEN]),
            Spec::new(format!("{p}.self_attn.v_proj.weight"), &[KV_DIM, HIDDEN]),
            Spec::new(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, HIDDEN]),
            Spec::new(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN]),
            Spec::new(format!("{p}.mlp.gate_proj.weight"), &[INTERMEDIATE, HIDDEN]),
            Spec::new(format!("{p}.mlp.up_proj.weight"), &[INTERMEDIATE, HIDDEN]),
            Spec::new(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, INTERMEDIATE]),
        ]);
    }
    specs.push(Spec::new("model.norm.weight", &[HIDDEN]));
    specs.push(Spec::new("lm_head.weight", &embed));
    specs
}

/// f32 → bf16 bits, round to nearest even (the inputs here are always finite).
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Fills `out` with little-endian bf16 values `mean + std * N(0, 1)` (approximately normal:
/// the sum of the four 16-bit quarters of one xorshift64 draw, an Irwin–Hall(4) variable).
fn fill(state: &mut u64, out: &mut [u8], mean: f32, std: f32) {
    // Irwin–Hall(4) on [0, 4): mean 2, variance 1/3.
    let scale = std * 3f32.sqrt() / 65536.0;
    let offset = mean - 2.0 * 65536.0 * scale;
    let mut s = *state;
    for pair in out.chunks_exact_mut(2) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let sum = (s & 0xFFFF) + ((s >> 16) & 0xFFFF) + ((s >> 32) & 0xFFFF) + (s >> 48);
        let v = sum as f32 * scale + offset;
        pair.copy_from_slice(&bf16_bits(v).to_le_bytes());
    }
    *state = s;
}

/// Groups tensors, in order, into shards of at most `shard_bytes` of data each.
fn plan_shards(specs: &[Spec], shard_bytes: u64) -> Vec<Vec<&Spec>> {
    let mut shards: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut used = 0u64;
    for s in specs {
        if used > 0 && used + s.bytes() > shard_bytes {
            shards.push(Vec::new());
            used = 0;
        }
        if let Some(last) = shards.last_mut() {
            last.push(s);
        }
        used += s.bytes();
    }
    shards
}

/// Writes one checkpoint folder; returns its tensor data bytes.
fn write_model(
    dir: &Path,
    seed: u64,
    layers: u64,
    specs: &[Spec],
    shard_bytes: u64,
) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    // A stale index from an interrupted run must not make the folder look complete.
    let index_path = dir.join("model.safetensors.index.json");
    match std::fs::remove_file(&index_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let shards = plan_shards(specs, shard_bytes);
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    // Never zero (xorshift's fixed point); different for every seed.
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    if state == 0 {
        state = 1;
    }
    let mut buf = vec![0u8; BUF_BYTES];
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0u64;
        for s in shard {
            header.insert(
                s.name.clone(),
                serde_json::json!({
                    "dtype": "BF16",
                    "shape": s.shape,
                    "data_offsets": [off, off + s.bytes()],
                }),
            );
            weight_map.insert(s.name.clone(), file.clone());
            off += s.bytes();
        }
        let mut json = serde_json::to_vec(&header)?;
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let mut f = std::fs::File::create(dir.join(&file))?;
        let mut head = Vec::with_capacity(8 + json.len());
        head.extend_from_slice(&(json.len() as u64).to_le_bytes());
        head.extend_from_slice(&json);
        f.write_all(&head)?;
        // Tensors are laid out in the order of `shard`, matching the offsets above.
        for s in shard {
            let (mean, std) = if s.is_norm() {
                (1.0, 0.02)
            } else {
                (0.0, 0.02)
            };
            let mut left = s.bytes();
            while left > 0 {
                let take = left.min(buf.len() as u64) as usize;
                fill(&mut state, &mut buf[..take], mean, std);
                f.write_all(&buf[..take])?;
                left -= take as u64;
            }
        }
        f.flush()?;
        total += off;
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": layers,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "vocab_size": VOCAB,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
        }))?,
    )?;
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    // The index last: its presence means the folder is complete.
    std::fs::write(&index_path, serde_json::to_vec_pretty(&index)?)?;
    Ok(total)
}

fn usage() -> String {
    "usage: gen_checkpoints OUT_DIR [--models N] [--size-gb X] [--shard-mb N] [--embed ROWSxCOLS]"
        .into()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut out: Option<PathBuf> = None;
    let (mut models, mut size_gb, mut shard_mb) = (3u64, 0.98f64, 400u64);
    let mut embed = [VOCAB, HIDDEN];
    while let Some(a) = args.next() {
        match a.as_str() {
            "--models" => models = args.next().ok_or_else(usage)?.parse()?,
            "--size-gb" => size_gb = args.next().ok_or_else(usage)?.parse()?,
            "--shard-mb" => shard_mb = args.next().ok_or_else(usage)?.parse()?,
            "--embed" => {
                let v = args.next().ok_or_else(usage)?;
                let (r, c) = v.split_once('x').ok_or_else(usage)?;
                embed = [r.parse()?, c.parse()?];
            }
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other if other.starts_with("--") => {
                return Err(format!("unknown option {other}").into());
            }
            other if out.is_none() => out = Some(PathBuf::from(other)),
            other => return Err(format!("unexpected argument {other}").into()),
        }
    }
    let out = out.ok_or_else(usage)?;
    if models == 0 || !(size_gb.is_finite() && size_gb > 0.0) || shard_mb == 0 {
        return Err("--models, --size-gb and --shard-mb must be positive".into());
    }
    let layers = layers_for((size_gb * 1e9) as u64, embed);
    let specs = llama_tensors(layers, embed);
    for m in 1..=models {
        let dir = out.join(format!("ft-{m}"));
        let started = std::time::Instant::now();
        let bytes = write_model(&dir, m, layers, &specs, shard_mb * 1_000_000)?;
        println!(
            "{}: {} layers, {} tensors, {} bytes ({:.3} GB) in {:.1} s",
            dir.display(),
            layers,
            specs.len(),
            bytes,
            bytes as f64 / 1e9,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_values() {
        assert_eq!(layers_for(980_000_000, [VOCAB, HIDDEN]), 8);
        let total: u64 = llama_tensors(8, [VOCAB, HIDDEN])
            .iter()
            .map(Spec::bytes)
            .sum();
        assert!((total as f64 - 0.98e9).abs() < 0.01e9, "{total}");
        let mut state = 42u64;
        let mut buf = vec![0u8; 1 << 16];
        fill(&mut state, &mut buf, 0.0, 0.02);
        let vals: Vec<f32> = buf
            .chunks_exact(2)
            .map(|p| f32::from_bits((u16::from_le_bytes([p[0], p[1]]) as u32) << 16))
            .collect();
        assert!(vals.iter().all(|v| v.is_finite() && v.abs() < 0.1));
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        let var = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / vals.len() as f32;
        assert!(
            mean.abs() < 0.002 && (var.sqrt() - 0.02).abs() < 0.002,
            "{mean} {var}"
        );
    }
}
