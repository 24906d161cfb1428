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

#[derive(Args)]
pub struct RecallArgs {
    /// Positions of each training sequence.
    #[arg(long, default_value_t = 512)]
    train_tokens: usize,
    /// Positions of each test sequence.
    #[arg(long, default_value_t = 2048)]
    eval_tokens: usize,
    /// Key–value pairs per sequence (each asked once).
    #[arg(long, default_value_t = 64)]
    pairs: usize,
    /// Distinct keys, and distinct values.
    #[arg(long, default_value_t = 512)]
    keys: usize,
    #[arg(long, default_value_t = 512)]
    values: usize,
    /// Training steps of each reader, and sequences per step.
    #[arg(long, default_value_t = 1500)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Then this many steps at the test length (a fresh optimizer and
    /// schedule, same peak rate), of `--long-batch` sequences.
    #[arg(long, default_value_t = 0)]
    long_steps: usize,
    #[arg(long, default_value_t = 4)]
    long_batch: usize,
    /// Test sequences (the same ones for every reader).
    #[arg(long, default_value_t = 100)]
    eval_examples: usize,
    /// Keys each query keeps in the sparse readings, and keys per block in
    /// the block top-k one (it keeps ⌈top-k / block⌉ blocks).
    #[arg(long, default_value_t = 256)]
    top_k: usize,
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Width of the decoder and of the LSTM; decoder layers and heads.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 2)]
    heads: usize,
    /// Rotary base of the decoder: a large one leaves slow dimensions that
    /// barely turn over the test length, so matching by content carries
    /// from training length to test length.
    #[arg(long, default_value_t = 1e6)]
    rope_theta: f64,
    /// Each prompt pair as one token (a one-step lookup) instead of `k v`
    /// (which needs an induction head).
    #[arg(long)]
    fused: bool,
    /// Skip the LSTM (it trains slowly: one step per position).
    #[arg(long)]
    no_lstm: bool,
    /// Write the trained readers' weights here (`decoder.safetensors`,
    /// `lstm.safetensors`).
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// Read the readers' weights from a `--save` directory of a run with
    /// the same task and sizes instead of training.
    #[arg(long)]
    load: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The recall decoder reading every key (`top_k` None), its top-k keys, or
/// its top-k keys chosen by blocks of `block` (the library's
/// `KeySelection`, from the config's two fields).
fn recall_decoder(
    a: &RecallArgs,
    vocab: usize,
    top_k: Option<usize>,
    block: Option<usize>,
    vm: &VarMap,
) -> Result<Llama> {
    let cfg: LlamaConfig = serde_json::from_value(json!({
        "vocab_size": vocab, "hidden_size": a.hidden, "intermediate_size": 4 * a.hidden,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.heads, "rope_theta": a.rope_theta,
        "max_position_embeddings": a.train_tokens.max(a.eval_tokens),
        "tie_word_embeddings": true, "attention_top_k": top_k, "attention_block_size": block
    }))?;
    cfg.validate(std::path::Path::new("bench long-recall"))?;
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    Ok(Llama::new(vb.pp("model"), vb.pp("lm_head"), &cfg)?)
}

pub fn long_recall(g: &Global, a: RecallArgs) -> Result<()> {
    use autoglm::train::recall::{evaluate, train, Reader, RecallTask, RecallTraining};
    use std::time::Instant;

    if a.top_k == 0 || a.block == 0 || a.steps == 0 || a.batch == 0 || a.eval_examples == 0 {
        anyhow::bail!("--top-k, --block, --steps, --batch and --eval-examples must be ≥ 1");
    }
    if a.hidden == 0 || a.heads == 0 || a.hidden % a.heads != 0 || a.layers == 0 {
        anyhow::bail!("--hidden must be a positive multiple of --heads, and --layers ≥ 1");
    }
    let task = |tokens| RecallTask {
        tokens,
        pairs: a.pairs,
        keys: a.keys,
        values: a.values,
        fused: a.fused,
    };
    let (train_task, eval_task) = (task(a.train_tokens), task(a.eval_tokens));
    train_task
        .validate()
        .context("--train-tokens / --pairs / --keys / --values")?;
    eval_task
        .validate()
        .context("--eval-tokens / --pairs / --keys / --values")?;
    let vocab = train_task.vocab();
    // Each set from a generator of its own seed: training `seed`, the
    // test-length training `seed + 1`, the tests `seed + 1e6` and `+ 2e6`.
    let test = eval_task.examples(a.eval_examples, a.seed.wrapping_add(1_000_000))?;
    let training = RecallTraining {
        steps: a.steps,
        batch_size: a.batch,
        peak_lr: a.lr,
        warmup_steps: (a.steps / 20).max(1),
        clip_norm: 1.0,
        seed: a.seed,
    };
    let long_training = RecallTraining {
        steps: a.long_steps,
        batch_size: a.long_batch,
        seed: a.seed.wrapping_add(1),
        warmup_steps: (a.long_steps / 10).max(1),
        ..training
    };
    let threads = candle_core::utils::get_num_threads();
    let log = |name: &'static str| {
        let start = Instant::now();
        move |step: usize, loss: f64| {
            if step % 50 == 0 {
                eprintln!(
                    "{name} step {step:>5}  loss {loss:.4}  {:.0} s",
                    start.elapsed().as_secs_f64()
                );
            }
        }
    };

    // Trains at the training length, then (with --long-steps) at the test
    // length.
    // Or reads the weights of an earlier run; writes them with --save.
    let fit = |reader: &Reader, vm: &VarMap, name: &'static str| -> Result<f64> {
        let file = format!("{name}.safetensors");
        if let Some(dir) = &a.load {
            let path = dir.join(&file);
            let mut vm = vm.clone();
            vm.load(&path).with_context(|| {
                format!(
                    "reading {} (written by --save with the same task and sizes)",
                    path.display()
                )
            })?;
            return Ok(0.0);
        }
        let start = Instant::now();
        train(reader, vm, &train_task, &training, log(name))?;
        if a.long_steps > 0 {
            train(reader, vm, &eval_task, &long_training, log(name))?;
        }
        let seconds = start.elapsed().as_secs_f64();
        if let Some(dir) = &a.save {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            autoglm::train::save_safetensors_atomic(
                &dir.join(&file),
                &autoglm::train::varmap_tensors(vm)?,
            )?;
        }
        Ok(seconds)
    };

    // The dense decoder is trained; the sparse readings share its weights.
    let vm = VarMap::new();
    let dense = Reader::Decoder(Box::new(recall_decoder(&a, vocab, None, None, &vm)?));
    autoglm::train::vqa::init_weights(&vm, a.seed, None)?;
    let decoder_train_s = fit(&dense, &vm, "decoder").context(if a.load.is_some() {
        "loading the decoder"
    } else {
        "training the decoder"
    })?;
    let top_k = Reader::Decoder(Box::new(recall_decoder(
        &a,
        vocab,
        Some(a.top_k),
        None,
        &vm,
    )?));
    let blocks = Reader::Decoder(Box::new(recall_decoder(
        &a,
        vocab,
        Some(a.top_k),
        Some(a.block),
        &vm,
    )?));

    // The dense decoder at its training length: what the longer test adds.
    let short = train_task.examples(a.eval_examples, a.seed.wrapping_add(2_000_000))?;
    let dense_short = evaluate(&dense, &short)?;
    eprintln!(
        "dense decoder at {} tokens: {:.2} %",
        a.train_tokens,
        100.0 * dense_short.accuracy()
    );
    let mut rows = vec![
        ("dense decoder".to_string(), evaluate(&dense, &test)?),
        (format!("top-{} decoder", a.top_k), evaluate(&top_k, &test)?),
        (
            format!("block top-{} decoder (blocks of {})", a.top_k, a.block),
            evaluate(&blocks, &test)?,
        ),
    ];
    let mut lstm_train_s = None;
    if !a.no_lstm {
        let vm = VarMap::new();
        let lstm = Reader::lstm(
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            vocab,
            a.hidden,
        )?;
        autoglm::train::vqa::init_weights(&vm, a.seed, None)?;
        lstm_train_s = Some(fit(&lstm, &vm, "lstm").context(if a.load.is_some() {
            "loading the LSTM"
        } else {
            "training the LSTM"
        })?);
        rows.push(("LSTM (1 layer)".to_string(), evaluate(&lstm, &test)?));
    }

    let report = json!({
        "train_task": train_task, "eval_task": eval_task, "training": training,
        "long_training": (a.long_steps > 0).then_some(long_training),
        "hidden": a.hidden, "layers": a.layers, "heads": a.heads, "rope_theta": a.rope_theta,
        "top_k": a.top_k, "block": a.block, "threads": threads,
        "train_seconds": {"decoder": decoder_train_s, "lstm": lstm_train_s},
        "loaded_from": a.load,
        "dense_at_train_tokens": {"accuracy": dense_short.accuracy(), "questions": dense_short.questions},
        "readers": rows.iter().map(|(name, s)| json!({
            "reader": name, "accuracy": s.accuracy(), "correct": s.correct,
            "questions": s.questions, "median_seconds": s.median_seconds,
        })).collect::<Vec<_>>(),
    });
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "recall of {} pairs{}: trained at {} tokens ({} steps × {}{}), tested on {} sequences of {} tokens, {} threads",
            a.pairs,
            if a.fused { " (fused)" } else { "" },
            a.train_tokens,
            a.steps,
            a.batch,
            if a.long_steps > 0 {
                format!(", then {} × {} at {} tokens", a.long_steps, a.long_batch, a.eval_tokens)
            } else {
                String::new()
            },
            a.eval_examples,
            a.eval_tokens,
            threads
        );
        let dense_s = rows[0].1.median_seconds;
        for (name, s) in &rows {
            println!(
                "  {name:<40}{:>7.2} %  ({}/{})  {:.4} s per input ({:.2}× dense)",
                100.0 * s.accuracy(),
                s.correct,
                s.questions,
                s.median_seconds,
                s.median_seconds / dense_s
            );
        }
    }
    Ok(())
}
