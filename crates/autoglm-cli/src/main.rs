//! `autoglm`: the command-line interface of Open-AutoGLM.
//!
//! Every command prints human-readable output by default and one JSON
//! document on stdout with `--json`; logs go to stderr. The exit code is 0
//! only on success; errors are one line saying what was wrong and what to do.

mod ask;
mod bench;
mod bench_lm;
mod bench_long;
mod bench_serve;
mod bench_train;
mod commands;
mod data_cmd;
mod fashion_cmd;
mod kg_cmd;
mod kg_eval;
mod serve_cmd;
mod train_cmd;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "autoglm",
    version,
    about = "Open-AutoGLM: vision-language understanding in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Print one JSON document on stdout instead of human-readable text.
    #[arg(long, global = true)]
    json: bool,
    /// CPU threads for the models (sets RAYON_NUM_THREADS unless already set).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Largest image accepted, in pixels (width × height); raise it only for
    /// trusted images.
    #[arg(long, global = true, default_value_t = autoglm::io::image::ImageLimits::default().max_pixels)]
    max_pixels: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Show the installed assets (weights and data) and where they are.
    Assets {
        #[command(subcommand)]
        command: AssetsCommand,
    },
    /// Embed texts (MiniLM) or images (EfficientNet-Lite0 features, or a CLIP model).
    Embed {
        #[command(subcommand)]
        command: EmbedCommand,
    },
    /// Classify images into the 1,000 ImageNet classes (EfficientNet-Lite0).
    Classify(commands::ClassifyArgs),
    /// Ask a vision-language model a question about images; the answer streams.
    Ask(ask::AskArgs),
    /// Describe an image with a vision-language model.
    Caption(ask::CaptionArgs),
    /// Train a VLM for visual question answering (easy-VQA or JSON lines).
    Train(train_cmd::TrainArgs),
    /// Exact-match accuracy of a VLM on VQA examples.
    Eval(train_cmd::EvalArgs),
    /// Generate datasets (Sort-of-CLEVR) as JSON lines with images.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
    /// The Fashion-MNIST classifier used by the knowledge-graph evaluation.
    Fashion {
        #[command(subcommand)]
        command: fashion_cmd::FashionCommand,
    },
    /// Knowledge graphs: load RDF, query with SPARQL, import WordNet.
    Kg {
        #[command(subcommand)]
        command: kg_cmd::KgCommand,
    },
    /// Serve a model over the OpenAI HTTP API (chat with images, embeddings).
    Serve(serve_cmd::ServeArgs),
    /// Zero-shot classification of images against free-text labels with a CLIP model.
    ZeroShot(commands::ZeroShotArgs),
    /// Benchmarks (speed against PyTorch on the same inputs and threads).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum AssetsCommand {
    /// List every asset, whether it is installed, its path and size.
    List,
}

#[derive(Subcommand)]
enum EmbedCommand {
    /// Sentence embeddings (unit length) with all-MiniLM-L6-v2 or another
    /// sentence-transformers BERT directory.
    Text(commands::EmbedTextArgs),
    /// Image embeddings (unit length): a CLIP model's with --model, else
    /// EfficientNet-Lite0's pooled features.
    Image(commands::EmbedImageArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// EfficientNet-Lite0 images/s (batch 1, 32) and MiniLM sentences/s
    /// (batch 1, 64), beside PyTorch when --python is given.
    Encoders(bench::EncodersArgs),
    /// Prefill and decode tokens/s of a ~100M-parameter Llama and the latency
    /// of one `ask` with a 224×224 image, beside transformers.
    Lm(bench_lm::LmArgs),
    /// Training samples/s of a model's architecture on real easy-VQA
    /// batches, beside transformers.
    Train(bench_train::TrainBenchArgs),
    /// Load test of `autoglm serve`: concurrent clients, mixed good and bad
    /// requests, batching on and off, resident memory.
    Serve(bench_serve::ServeBenchArgs),
    /// Knowledge-graph retrieval latency (2-, 3-, 4-step chains) over WordNet.
    Kg(kg_cmd::BenchArgs),
    /// Time to read one long input (2,048 positions by default): a dense
    /// decoder, the same with top-k sparse attention, and an LSTM.
    LongInput(bench_long::LongArgs),
    /// Accuracy and time on long inputs: trains a dense decoder and an LSTM
    /// on multi-query associative recall, then reads 2,048-token prompts
    /// densely, with top-k and block top-k attention, and with the LSTM.
    LongRecall(bench_long::RecallArgs),
}

/// mimalloc, told to keep what is freed (below). Tensors of many MB are
/// allocated and freed at every training step; glibc's malloc hands those
/// over its `mmap` threshold (32 MB at most) back to the kernel each time,
/// so every step faulted in and zeroed its activations afresh
/// (docs/benchmarks.md, "Training speed").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h; libmimalloc-sys names
/// its neighbours, 14 and 16, but not it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Never hand freed pages back to the OS: a training step frees and
    // reallocates the same large activations every time.
    // SAFETY: sets one option of the allocator; any value is valid.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // Like other Unix tools, stop quietly when the reader of our output goes
    // away (`autoglm … | head`) instead of panicking on a broken pipe.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to the default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // Benchmarks default to 2 threads, so that numbers compare across machines.
    let threads = cli
        .global
        .threads
        .or(matches!(cli.command, Command::Bench { .. }).then_some(2));
    // Before any thread pool exists: candle and our kernels read it. Set
    // even when not asked for (to the CPUs available), because candle
    // otherwise counts the CPUs again at every matmul (a /proc read: 4 %
    // of a busy server's time).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let t = threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let g = &cli.global;
    let result = match cli.command {
        Command::Assets {
            command: AssetsCommand::List,
        } => commands::assets_list(g),
        Command::Embed {
            command: EmbedCommand::Text(a),
        } => commands::embed_text(g, a),
        Command::Embed {
            command: EmbedCommand::Image(a),
        } => commands::embed_image(g, a),
        Command::Classify(a) => commands::classify(g, a),
        Command::ZeroShot(a) => commands::zero_shot(g, a),
        Command::Serve(a) => serve_cmd::serve(g, a),
        Command::Kg { command } => kg_cmd::kg(g, command),
        Command::Fashion { command } => fashion_cmd::fashion(g, command),
        Command::Data { command } => data_cmd::data(g, command),
        Command::Ask(a) => ask::ask(g, a),
        Command::Train(a) => train_cmd::train(g, a),
        Command::Eval(a) => train_cmd::eval(g, a),
        Command::Caption(a) => ask::caption(g, a),
        Command::Bench {
            command: BenchCommand::Encoders(a),
        } => bench::encoders(g, a),
        Command::Bench {
            command: BenchCommand::Lm(a),
        } => bench_lm::lm(g, a),
        Command::Bench {
            command: BenchCommand::Train(a),
        } => bench_train::train(g, a),
        Command::Bench {
            command: BenchCommand::Serve(a),
        } => bench_serve::serve(g, a),
        Command::Bench {
            command: BenchCommand::Kg(a),
        } => kg_cmd::bench(g, a),
        Command::Bench {
            command: BenchCommand::LongInput(a),
        } => bench_long::long_input(g, a),
        Command::Bench {
            command: BenchCommand::LongRecall(a),
        } => bench_long::long_recall(g, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
