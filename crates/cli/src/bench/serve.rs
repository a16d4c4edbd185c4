//! `glassbox bench serve`: load on an OpenAI-compatible server, as `vllm bench serve` does.
//!
//! Prompts are token ids drawn from the served model's vocabulary (a local `--tokenizer`, or
//! the server's `/tokenize`), sent as id arrays to `/v1/completions` so input lengths are
//! exact; the chat backend sends their text. Requests leave at a Poisson (or, with
//! `--burstiness`, gamma) rate under a concurrency cap and are streamed, so time to first
//! token and every inter-token gap are measured on the client.

use super::report::{self, Outcome};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// `/v1/completions` with token-id prompts (exact input lengths).
    Openai,
    /// `/v1/chat/completions` with the prompts' text as one user message.
    OpenaiChat,
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// The model name to send (default: the first one the server lists).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value_t = Api::Openai)]
    pub backend: Api,
    #[arg(long, default_value_t = 100)]
    pub num_prompts: usize,
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Vary lengths uniformly in [len * (1 - r), len * (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    pub range_ratio: f64,
    /// A mixture instead of random lengths: JSONL lines `{"input_len": N, "output_len": M}`
    /// or `{"prompt": "text", "output_len": M}`, used in turn.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Requests in flight at most (default: no cap).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Requests per second (`inf`: all at once).
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Gamma shape of the arrival process: 1 is Poisson, below 1 burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generate exactly `output_len` tokens (ask the server to ignore EOS).
    #[arg(long)]
    pub ignore_eos: bool,
    /// A local model whose tokenizer builds the prompts (default: the server's /tokenize).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// SLOs in ms for goodput, e.g. `--goodput ttft:500 tpot:50 e2el:5000`.
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Write the results (vLLM's key names) here.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    /// Plot the latency distributions (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// A name for this run in reports (default: the server's model name and the concurrency).
    #[arg(long)]
    pub label: Option<String>,
}

/// One request to send.
struct Planned {
    prompt: Value,
    input_len: Option<usize>,
    output_len: usize,
}

/// English words for the server's tokenizer to turn into a pool of ordinary token ids.
const CORPUS: &str = "the of and to in is was that for on with as by at from his her they this which are be had not but were one all have there their an been has when who will more no if out so said what up its about into than them can only other new some could time these two may then do first any my now such like our over man me even most made after also did many before must through back years where much your way well down should because each just those people how too little state good very make world still own see men work long get here between both life being under never day same another know while last might us great old year off come since against go came right used take three states himself few house use during without again place american around however home small found thought went say part once general high upon school every don does got united left number course war until always away something fact though water less public put think almost hand enough far took head yet government system better set told nothing night end why called did eyes find going look asked later knew point next city business give group toward young days let room president side social given present several order national possible rather second face per among form important often things looked early white case john become large big need four within felt children along saw best church ever least power development light thing seemed family interest want members mind country area others done turn although open god service certain kind problem began different door thus help sense means whole matter perhaps itself york times law human line above name example action company hands local show five history whether gave either act today feet across taken past quite anything seen having death experience body word half really week car field money words already information tell together college shall themselves";

pub fn run(a: ServeArgs) -> Result<()> {
    if a.num_prompts == 0 || a.input_len == 0 || a.output_len == 0 {
        bail!("--num-prompts, --input-len and --output-len must be positive");
    }
    if a.request_rate.is_nan() || a.request_rate <= 0.0 || a.burstiness.is_nan() || a.burstiness <= 0.0 {
        bail!("--request-rate and --burstiness must be positive");
    }
    if !(0.0..1.0).contains(&a.range_ratio) {
        bail!("--range-ratio must be in [0, 1)");
    }
    let slos = report::parse_goodput(&a.goodput)?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(1800))).build().into();
    let base = a.url.trim_end_matches('/').to_string();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => served_model(&agent, &base)?,
    };
    let vocab = Vocab::new(&agent, &base, a.tokenizer.as_deref())?;
    let planned = plan(&a, &vocab, &agent, &base)?;
    let label = a.label.clone().unwrap_or_else(|| format!("{model} c={}", a.max_concurrency.map_or("inf".into(), |c| c.to_string())));
    eprintln!(
        "{label}: {} requests to {base} ({:?}), rate {}, burstiness {}, max concurrency {}",
        planned.len(),
        a.backend,
        a.request_rate,
        a.burstiness,
        a.max_concurrency.map_or("none".into(), |c| c.to_string())
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C ends the process the usual way.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping: no new requests; reporting what was measured (Ctrl-C again to quit now)");
        });
    }
    let workers = a.max_concurrency.unwrap_or(a.num_prompts).clamp(1, 1024);
    let (job_tx, job_rx) = channel::<Planned>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (done_tx, done_rx) = channel::<Outcome>();
    let started = Instant::now();
    for _ in 0..workers {
        let (rx, tx, agent, base, model, stop) = (job_rx.clone(), done_tx.clone(), agent.clone(), base.clone(), model.clone(), stop.clone());
        let (api, ignore_eos) = (a.backend, a.ignore_eos);
        std::thread::spawn(move || loop {
            let next = rx.lock().ok().and_then(|r| r.recv().ok());
            let Some(p) = next else { return };
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let outcome = send(&agent, &base, &model, api, ignore_eos, &p, started);
            if tx.send(outcome).is_err() {
                return;
            }
        });
    }
    drop(done_tx);
    // Arrivals: gamma-distributed gaps with mean 1/rate (shape 1 = exponential = Poisson).
    let dispatcher = {
        let stop = stop.clone();
        let (rate, shape, seed) = (a.request_rate, a.burstiness, a.seed);
        std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
            for p in planned {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                if job_tx.send(p).is_err() {
                    return;
                }
                if rate.is_finite() {
                    let gap = gamma(&mut rng, shape) / (shape * rate);
                    std::thread::sleep(Duration::from_secs_f64(gap));
                }
            }
        })
    };
    let bar = indicatif::ProgressBar::new(a.num_prompts as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} requests {elapsed_precise} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let mut outcomes = Vec::with_capacity(a.num_prompts);
    while outcomes.len() < a.num_prompts {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(o) => {
                if o.error.is_some() {
                    bar.set_message(format!("{} failed", outcomes.iter().filter(|o: &&Outcome| o.error.is_some()).count() + 1));
                }
                outcomes.push(o);
                bar.inc(1);
            }
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => break,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let duration = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    drop(dispatcher);
    let cancelled = a.num_prompts - outcomes.len();
    let config = json!({
        "label": label, "backend": format!("{:?}", a.backend).to_lowercase(), "model_id": model, "base_url": base,
        "num_prompts": a.num_prompts, "request_rate": if a.request_rate.is_finite() { json!(a.request_rate) } else { json!("inf") },
        "burstiness": a.burstiness, "max_concurrency": a.max_concurrency, "input_len": a.input_len, "output_len": a.output_len,
        "range_ratio": a.range_ratio, "seed": a.seed, "cancelled": cancelled,
        "date": chrono_now(),
    });
    let result = report::summarize(config, &outcomes, duration, &slos);
    report::print(&result);
    if let Some(path) = &a.output_json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        report::plot(&[result], path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn chrono_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs}")
}

/// A gamma(shape, 1) draw (Marsaglia and Tsang; shape < 1 by the boost `U^(1/shape)`).
fn gamma(rng: &mut ChaCha8Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // A standard normal by Box-Muller.
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
        let x = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Token ids to build prompts from, and a way back to text for the chat backend.
enum Vocab {
    Local { ids: Vec<u32>, tok: Box<glassbox_model::Tokenizer> },
    Server { ids: Vec<u32> },
}

impl Vocab {
    fn new(agent: &ureq::Agent, base: &str, tokenizer: Option<&str>) -> Result<Vocab> {
        if let Some(m) = tokenizer {
            return Self::local(Some(m));
        }
        let mut ids = match tokenize(agent, base, CORPUS) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("warning: the server's /tokenize did not work ({e:#}); building prompts with the local default model's tokenizer (give --tokenizer MODEL to choose)");
                return Self::local(None);
            }
        };
        ids.sort_unstable();
        ids.dedup();
        if ids.len() < 50 {
            bail!("the server's /tokenize gave only {} distinct ids; give --tokenizer MODEL", ids.len());
        }
        Ok(Vocab::Server { ids })
    }

    /// A local model's tokenizer (`None`: the default model's).
    fn local(model: Option<&str>) -> Result<Vocab> {
        let source = glassbox_model::resolve(model)?;
        let tok = glassbox_model::load_tokenizer(&source)?.tokenizer;
        let ids: Vec<u32> = (0..tok.vocab_size() as u32).filter(|&i| !tok.is_special(i)).collect();
        if ids.len() < 100 {
            bail!("the tokenizer of {} has too few ordinary tokens to build prompts", source.path().display());
        }
        Ok(Vocab::Local { ids, tok: Box::new(tok) })
    }

    fn ids(&self) -> &[u32] {
        match self {
            Vocab::Local { ids, .. } | Vocab::Server { ids } => ids,
        }
    }

    fn text(&self, agent: &ureq::Agent, base: &str, ids: &[u32]) -> Result<String> {
        match self {
            Vocab::Local { tok, .. } => Ok(tok.decode(ids, true)?),
            Vocab::Server { .. } => {
                let doc = post(agent, &format!("{base}/detokenize"), &json!({"tokens": ids}))?;
                doc["prompt"].as_str().or(doc["content"].as_str()).map(str::to_string).context("the server's /detokenize gave no text")
            }
        }
    }
}

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> Result<Value> {
    let mut resp = agent.post(url).header("content-type", "application/json").send(body.to_string()).with_context(|| format!("POST {url}"))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    if status != 200 {
        bail!("POST {url} answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// `/tokenize` as glassbox and vLLM take it (`prompt`), else as llama-server does (`content`).
fn tokenize(agent: &ureq::Agent, base: &str, text: &str) -> Result<Vec<u32>> {
    let url = format!("{base}/tokenize");
    let ids = |doc: Value| -> Vec<u32> { doc["tokens"].as_array().map(|t| t.iter().filter_map(|t| t.as_u64().or(t["id"].as_u64())).map(|t| t as u32).collect()).unwrap_or_default() };
    if let Ok(doc) = post(agent, &url, &json!({"prompt": text, "add_special_tokens": false})) {
        let got = ids(doc);
        if !got.is_empty() {
            return Ok(got);
        }
    }
    let got = ids(post(agent, &url, &json!({"content": text}))?);
    if got.is_empty() {
        bail!("{url} gave no tokens");
    }
    Ok(got)
}

fn served_model(agent: &ureq::Agent, base: &str) -> Result<String> {
    let text = agent.get(&format!("{base}/v1/models")).call().with_context(|| format!("is a server listening at {base}?"))?.body_mut().read_to_string()?;
    let doc: Value = serde_json::from_str(&text)?;
    doc["data"][0]["id"].as_str().map(str::to_string).context("the server lists no model at /v1/models; give --model")
}

fn plan(a: &ServeArgs, vocab: &Vocab, agent: &ureq::Agent, base: &str) -> Result<Vec<Planned>> {
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let vary = |len: usize, rng: &mut ChaCha8Rng| super::vary_len(len, a.range_ratio, rng);
    let mix: Vec<Value> = match &a.dataset {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let lines: Vec<Value> = text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>().with_context(|| format!("{}: every line must be JSON", p.display()))?;
            if lines.is_empty() {
                bail!("{} has no entries", p.display());
            }
            lines
        }
        None => vec![],
    };
    let ids = vocab.ids();
    let mut out = Vec::with_capacity(a.num_prompts);
    for i in 0..a.num_prompts {
        let entry = mix.get(i % mix.len().max(1));
        let output_len = entry.and_then(|e| e["output_len"].as_u64()).map_or_else(|| vary(a.output_len, &mut rng), |n| n as usize);
        if let Some(text) = entry.and_then(|e| e["prompt"].as_str()) {
            out.push(Planned { prompt: json!(text), input_len: None, output_len });
            continue;
        }
        let input_len = entry.and_then(|e| e["input_len"].as_u64()).map_or_else(|| vary(a.input_len, &mut rng), |n| n as usize);
        let toks: Vec<u32> = (0..input_len).map(|_| ids[rng.random_range(0..ids.len())]).collect();
        let (prompt, input_len) = match a.backend {
            Api::Openai => (json!(toks), Some(input_len)),
            Api::OpenaiChat => (json!(vocab.text(agent, base, &toks)?), None),
        };
        out.push(Planned { prompt, input_len, output_len });
    }
    Ok(out)
}

/// One streamed request, timed on the client.
fn send(agent: &ureq::Agent, base: &str, model: &str, api: Api, ignore_eos: bool, p: &Planned, t0: Instant) -> Outcome {
    let mut body = json!({
        "model": model, "max_tokens": p.output_len, "temperature": 0.0, "stream": true,
        "stream_options": {"include_usage": true}, "ignore_eos": ignore_eos,
    });
    let path = match api {
        Api::Openai => {
            body["prompt"] = p.prompt.clone();
            "/v1/completions"
        }
        Api::OpenaiChat => {
            body["messages"] = json!([{"role": "user", "content": p.prompt}]);
            "/v1/chat/completions"
        }
    };
    let start = Instant::now();
    let mut o = Outcome { start: (start - t0).as_secs_f64(), input_len: p.input_len.unwrap_or(0), ..Default::default() };
    let fail = |mut o: Outcome, e: String| {
        o.error = Some(e);
        o.e2el = start.elapsed().as_secs_f64();
        o
    };
    let mut resp = match agent.post(&format!("{base}{path}")).header("content-type", "application/json").send(body.to_string()) {
        Ok(r) => r,
        Err(e) => return fail(o, format!("connection: {e}")),
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text).ok().and_then(|d| d["error"]["message"].as_str().map(str::to_string)).unwrap_or(text);
        return fail(o, format!("HTTP {status}: {msg}"));
    }
    let reader = std::io::BufReader::new(resp.body_mut().as_reader());
    let mut last: Option<Instant> = None;
    let mut chunks = 0;
    for line in reader.lines() {
        let Ok(line) = line else { return fail(o, "the stream broke off".into()) };
        let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
        if data == "[DONE]" {
            break;
        }
        let Ok(ev) = serde_json::from_str::<Value>(data) else { continue };
        if let Some(m) = ev["error"]["message"].as_str() {
            return fail(o, m.to_string());
        }
        let choice = &ev["choices"][0];
        if let Some(m) = choice["error"]["message"].as_str() {
            return fail(o, m.to_string());
        }
        let text = choice["text"].as_str().or(choice["delta"]["content"].as_str()).unwrap_or("");
        if !text.is_empty() {
            let now = Instant::now();
            match last {
                None => o.ttft = (now - start).as_secs_f64(),
                Some(prev) => o.itl.push((now - prev).as_secs_f64()),
            }
            last = Some(now);
            chunks += 1;
        }
        if let Some(u) = ev["usage"].as_object() {
            o.output_len = u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0) as usize;
            if let Some(pt) = u.get("prompt_tokens").and_then(Value::as_u64) {
                o.input_len = pt as usize;
            }
        }
    }
    if o.output_len == 0 {
        o.output_len = chunks;
    }
    o.e2el = start.elapsed().as_secs_f64();
    if last.is_none() {
        return fail(o, "the server streamed no text".into());
    }
    o
}
