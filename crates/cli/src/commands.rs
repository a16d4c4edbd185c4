//! generate, tokenize, render-chat.

use anyhow::{bail, Context, Result};
use clap::Args;
use glassbox_engine::{EngineConfig, LLM};
use glassbox_model::{load, load_tokenizer, resolve, ChatContext, ChatTemplate, LoadOptions, LoadedModel};
use glassbox_protocol::{resolve_patterns, CapturePositions, CaptureSpec, EngineRequest, SamplingParams};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct GenerateArgs {
    /// A .gguf file, a Hugging Face model directory, or a hub id in the local hub cache.
    /// Default: SmolLM2-135M-Instruct (downloaded once).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hook names or globs to capture (repeatable), e.g. 'blocks.*.hook_resid_post'.
    #[arg(long = "capture")]
    pub capture: Vec<String>,
    /// all, last, prompt or generated.
    #[arg(long, default_value = "all")]
    pub capture_positions: CapturePositions,
    /// Where captures go (safetensors; numpy and torch load it).
    #[arg(long, default_value = "captures.safetensors")]
    pub capture_out: PathBuf,
    /// Run GGUF weights dequantized to f32 (reference numerics; slower).
    #[arg(long)]
    pub dequantize: bool,
    #[command(flatten)]
    pub profile: crate::profile::ProfileArgs,
}

pub fn load_model(model: Option<&str>, dequantize: bool, batch_invariant: bool) -> Result<LoadedModel> {
    let source = resolve(model)?;
    load(&source, LoadOptions { dequantize, batch_invariant }).with_context(|| format!("loading {}", source.path().display()))
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let model = Arc::new(load_model(a.model.as_deref(), a.dequantize, true)?);
    let capture = if a.capture.is_empty() {
        None
    } else {
        let hooks = resolve_patterns(&a.capture, &model.model.hook_names())?;
        Some(CaptureSpec { hooks, positions: a.capture_positions, dtype: Default::default() })
    };
    let prompt = if a.chat {
        let messages = serde_json::json!([{"role": "user", "content": a.prompt}]);
        let text = model.chat_template()?.render(&messages, &model.chat_context(true))?;
        model.tokenizer.encode(&text, false)?
    } else {
        model.tokenizer.encode(&a.prompt, true)?
    };
    let sampling = SamplingParams {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        ..Default::default()
    };
    let mut llm = LLM::from_model(model.clone(), EngineConfig::default())?;
    a.profile.start(&mut llm)?;
    llm.core_mut().add_request(EngineRequest { id: 0, prompt: prompt.clone(), sampling, capture, ..Default::default() });
    let mut stdout = std::io::stdout();
    let mut result = Ok(());
    let mut captures = vec![];
    llm.stream(|out| {
        let _ = stdout.write_all(out.text.as_bytes());
        let _ = stdout.flush();
        if let Some(glassbox_protocol::FinishReason::Error(msg)) = &out.finish {
            result = Err(anyhow::anyhow!("{msg}"));
        }
        captures.extend(out.capture.map(|p| p.assemble()).unwrap_or_default());
    });
    println!();
    a.profile.finish(&mut llm)?;
    result?;
    if !a.capture.is_empty() {
        crate::capture_file::write(&a.capture_out, &captures, &prompt, &model.name)?;
        eprintln!("wrote {} captured tensors to {}", captures.len(), a.capture_out.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct TokenizeArgs {
    /// A model (or a vocab-only .gguf). Default: the default model.
    #[arg(long)]
    pub model: Option<String>,
    /// The text, or `-` to read standard input byte for byte. With --decode: token ids.
    pub text: Vec<String>,
    /// Add BOS/EOS as the model does.
    #[arg(long)]
    pub add_special: bool,
    /// Turn token ids back into text.
    #[arg(long)]
    pub decode: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let bundle = load_tokenizer(&resolve(a.model.as_deref())?)?;
    let tok = &bundle.tokenizer;
    let input = if a.text.len() == 1 && a.text[0] == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        String::from_utf8(buf).context("standard input is not UTF-8")?
    } else {
        a.text.join(" ")
    };
    if a.decode {
        let ids = input
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u32>().with_context(|| format!("`{s}` is not a token id")))
            .collect::<Result<Vec<_>>>()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
            bail!("token id {bad} is outside the vocabulary (size {})", tok.vocab_size());
        }
        print!("{}", tok.decode(&ids, false)?);
        println!();
    } else {
        let ids = tok.encode(&input, a.add_special)?;
        println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
    }
    Ok(())
}

#[derive(Args)]
pub struct RenderChatArgs {
    /// Take the template (and bos/eos tokens) from this model.
    #[arg(long)]
    pub model: Option<String>,
    /// A Jinja template file (overrides the model's).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// JSON file: an array of messages, or an object with "messages" (and other variables).
    #[arg(long)]
    pub messages: PathBuf,
    #[arg(long)]
    pub add_generation_prompt: bool,
    /// Template variables, e.g. --var bos_token='<s>' --var date_string='26 Jul 2024'.
    /// Values that parse as JSON (true, 3, [..]) are passed as such.
    #[arg(long = "var", value_parser = parse_var)]
    pub vars: Vec<(String, String)>,
}

fn parse_var(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("`{s}` is not name=value"))
}

pub fn render_chat(a: RenderChatArgs) -> Result<()> {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&a.messages).with_context(|| format!("reading {}", a.messages.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", a.messages.display()))?;
    let (messages, mut vars) = match json {
        serde_json::Value::Array(_) => (json, serde_json::Map::new()),
        serde_json::Value::Object(mut o) => {
            let m = o.remove("messages").context("the JSON object has no `messages`")?;
            (m, o)
        }
        _ => bail!("messages must be a JSON array or an object with `messages`"),
    };
    let mut ctx = ChatContext { add_generation_prompt: a.add_generation_prompt, ..Default::default() };
    let template = match (&a.chat_template, &a.model) {
        (Some(path), _) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        (None, model) => {
            let bundle = load_tokenizer(&resolve(model.as_deref())?)?;
            ctx.bos_token = bundle.bos_token.clone();
            ctx.eos_token = bundle.eos_token.clone();
            bundle.chat_template.context("this model has no chat template; pass --chat-template FILE.jinja")?
        }
    };
    for (k, v) in a.vars {
        let value = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
        vars.insert(k, value);
    }
    if let Some(b) = vars.remove("bos_token") {
        ctx.bos_token = b.as_str().map(str::to_string).unwrap_or_else(|| b.to_string());
    }
    if let Some(e) = vars.remove("eos_token") {
        ctx.eos_token = e.as_str().map(str::to_string).unwrap_or_else(|| e.to_string());
    }
    if let Some(g) = vars.remove("add_generation_prompt") {
        ctx.add_generation_prompt = g.as_bool().unwrap_or(ctx.add_generation_prompt);
    }
    ctx.vars = vars;
    print!("{}", ChatTemplate::new(&template)?.render(&messages, &ctx)?);
    Ok(())
}
