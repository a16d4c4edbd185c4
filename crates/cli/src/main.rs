//! The `glassbox` command line.

mod batch;
mod bench;
mod capture_file;
mod commands;
mod dump;
mod profile;
mod replay;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Freed activation-sized blocks are kept for the next step's (`glassbox_model::alloc`).
#[global_allocator]
static ALLOC: glassbox_model::alloc::ReuseLarge = glassbox_model::alloc::ReuseLarge;

#[derive(Parser)]
#[command(name = "glassbox", version, about = "An LLM inference engine you can see inside")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text or as one JSON object per line (fields included: request ids, the
    /// access log's method, path, status, tokens and time). Which lines: `GLASSBOX_LOG` (or
    /// `RUST_LOG`) filters, e.g. `glassbox=debug` or `warn,glassbox::access=info`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "GLASSBOX_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text, streaming it to stdout; optionally capture activations.
    Generate(commands::GenerateArgs),
    /// Serve the OpenAI-compatible API.
    Serve(glassbox_server::ServeArgs),
    /// Print the token ids of a text (or, with --decode, the text of token ids).
    Tokenize(commands::TokenizeArgs),
    /// Print exactly the prompt a chat template renders.
    RenderChat(commands::RenderChatArgs),
    /// Rerun the requests of a crash dump (together, then each alone) and say whether the
    /// failure reproduces, and for which request.
    Replay(replay::ReplayArgs),
    /// Work with capture files and tensor dumps.
    #[command(subcommand)]
    Dump(dump::DumpCommand),
    /// Run a JSONL file through a multi-stage prompt pipeline (in-process or against servers).
    Batch(batch::BatchArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("GLASSBOX_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "warn,glassbox=info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
    }
    let result = match cli.command {
        Command::Generate(a) => commands::generate(a),
        Command::Serve(a) => glassbox_server::serve(a),
        Command::Tokenize(a) => commands::tokenize(a),
        Command::RenderChat(a) => commands::render_chat(a),
        Command::Replay(a) => replay::replay(a),
        Command::Dump(d) => dump::run(d),
        Command::Bench(b) => bench::run(b),
        Command::Batch(a) => batch::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
