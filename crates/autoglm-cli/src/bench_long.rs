//! `autoglm bench long-input`: the time to read one long input (a prompt of
//! `--tokens` positions, prefill) with a dense decoder, the same decoder
//! with token top-k attention and with block top-k attention, and an LSTM
//! of the same width. Random weights: this measures speed, not accuracy.

use anyhow::{Context, Result};
use autoglm::config::LlamaConfig;
use autoglm::text::llama::{Llama, Positions};
use autoglm::text::lstm::Lstm;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use serde_json::json;

use crate::bench::time_it;
use crate::Global;

#[derive(Args)]
pub struct LongArgs {
    /// Positions of the input.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Keys each query keeps in the sparse decoders.
    #[arg(long, default_value_t = 256)]
    top_k: usize,
    /// Keys per block in the block top-k decoder (it keeps ⌈top-k / block⌉
    /// blocks).
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Width of the decoder and the LSTM.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 3)]
    layers: usize,
    /// Seconds spent timing each model (after one warm-up run).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

fn decoder(a: &LongArgs, top_k: Option<usize>, block: Option<usize>, vm: &VarMap) -> Result<Llama> {
    let cfg: LlamaConfig = serde_json::from_value(json!({
        "vocab_size": 256, "hidden_size": a.hidden, "intermediate_size": 4 * a.hidden,
        "num_hidden_layers": a.layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": a.tokens, "tie_word_embeddings": true,
        "attention_top_k": top_k, "attention_block_size": block
    }))?;
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    Ok(Llama::new(vb.pp("model"), vb.pp("lm_head"), &cfg)?)
}

pub fn long_input(g: &Global, a: LongArgs) -> Result<()> {
    if a.tokens == 0
        || a.top_k == 0
        || a.block == 0
        || a.hidden == 0
        || a.hidden % 4 != 0
        || a.layers == 0
    {
        anyhow::bail!(
            "--tokens, --top-k, --block, --layers must be positive and --hidden a positive multiple of 4 (the decoder's heads)"
        );
    }
    let threads = candle_core::utils::get_num_threads();
    let dev = Device::Cpu;
    // One VarMap: the sparse decoder has the dense one's weights.
    let vm = VarMap::new();
    let dense = decoder(&a, None, None, &vm)?;
    let sparse = decoder(&a, Some(a.top_k), None, &vm)?;
    let blocks = decoder(&a, Some(a.top_k), Some(a.block), &vm)?;
    let lstm = Lstm::new(
        VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("lstm"),
        a.hidden,
        a.hidden,
    )?;
    let ids: Vec<u32> = (0..a.tokens as u32).map(|i| (i * 7 + 3) % 256).collect();
    let ids = Tensor::new(ids.as_slice(), &dev)?.unsqueeze(0)?;
    let embeds = dense.embed(&ids)?;
    let pos = Positions::contiguous(1, a.tokens, 0, &dev)?;
    let prefill = |m: &Llama| -> Result<f64> {
        time_it(a.seconds, || {
            m.forward_embeds(&embeds, &pos, &mut m.new_cache())?;
            Ok(())
        })
    };
    let t_dense = prefill(&dense).context("dense decoder")?;
    let t_sparse = prefill(&sparse).context("top-k decoder")?;
    let t_blocks = prefill(&blocks).context("block top-k decoder")?;
    let t_lstm = time_it(a.seconds, || {
        lstm.forward(&embeds, &[a.tokens])?;
        Ok(())
    })
    .context("LSTM")?;
    let report = json!({
        "tokens": a.tokens, "hidden": a.hidden, "layers": a.layers, "top_k": a.top_k,
        "block": a.block, "threads": threads,
        "seconds": {"dense": t_dense, "top_k": t_sparse, "block_top_k": t_blocks, "lstm": t_lstm},
        "top_k_over_dense": t_sparse / t_dense,
        "block_top_k_over_dense": t_blocks / t_dense,
    });
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} tokens, width {}, {} threads (median seconds per input):",
            a.tokens, a.hidden, threads
        );
        let rows = [
            (
                format!("dense decoder ({} layers)", a.layers),
                t_dense,
                String::new(),
            ),
            (
                format!("top-{} decoder", a.top_k),
                t_sparse,
                format!("  ({:.2}× dense)", t_sparse / t_dense),
            ),
            (
                format!("block top-{} decoder", a.top_k),
                t_blocks,
                format!(
                    "  ({:.2}× dense; blocks of {})",
                    t_blocks / t_dense,
                    a.block
                ),
            ),
            ("LSTM (1 layer)".to_string(), t_lstm, String::new()),
        ];
        for (name, secs, note) in rows {
            println!("  {name:<26}{secs:.4}{note}");
        }
    }
    Ok(())
}
