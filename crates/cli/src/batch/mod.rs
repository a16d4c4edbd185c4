//! `glassbox batch`: a JSONL file through a multi-stage pipeline with in-flight batching.
//!
//! Each item walks the stages in order; a stage's request enters the queue as soon as the
//! item's previous stage finished (later stages first, so items finish early and stage 2 of
//! item 1 overlaps stage 1 of item 10). Every input id gets exactly one output record: its
//! stages' outputs, or an error naming the stage. Records are flushed as items finish, and a
//! rerun with the same output file skips the ids already there.

mod backend;
mod family;
mod spec;

use anyhow::{bail, Context, Result};
use backend::{Backend, Call, Reply};
use clap::Args;
use serde_json::{json, Map, Value};
use spec::Spec;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct BatchArgs {
    /// Run on the engine in this process: a .gguf file, a model directory, or a hub id.
    #[arg(long, conflicts_with = "url")]
    pub model: Option<String>,
    /// Run against OpenAI-compatible servers instead (repeat for replicas; requests go to the
    /// one with the fewest outstanding requests).
    #[arg(long)]
    pub url: Vec<String>,
    /// The model name sent to the servers (default: what the first one lists).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// JSONL: one object per line, each with an `id`.
    #[arg(long)]
    pub input: PathBuf,
    /// The pipeline: .json, .toml or .yaml with `stages`.
    #[arg(long)]
    pub spec: PathBuf,
    /// JSONL, one record per input id; an existing file is resumed.
    #[arg(long)]
    pub output: PathBuf,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 16)]
    pub max_inflight: usize,
    /// Also store each stage's rendered prompt in the record (`prompts`).
    #[arg(long)]
    pub record_prompts: bool,
}

/// One input item on its way through the stages.
struct Item {
    id: Value,
    /// The item's fields, then each finished stage's output under the stage's name.
    ctx: Map<String, Value>,
    stage: usize,
    stats: Map<String, Value>,
    prompts: Map<String, Value>,
    captures: Map<String, Value>,
    sent_at: Option<Instant>,
}

pub fn run(a: BatchArgs) -> Result<()> {
    if a.max_inflight == 0 {
        bail!("--max-inflight must be at least 1");
    }
    let spec = Spec::load(&a.spec)?;
    let items = read_input(&a.input)?;
    let done = resume(&a.output)?;
    let todo: Vec<Item> = items.into_iter().filter(|it| !done.contains(&it.id.to_string())).collect();
    let capture_dir = a.output.with_extension("captures");
    let (mut backend, family): (Box<dyn Backend>, Box<dyn family::Family>) = if a.url.is_empty() {
        let model = Arc::new(crate::commands::load_model(a.model.as_deref(), false, true)?);
        let family = family::choose(spec.family.as_deref(), &model.name, model.chat_template().is_ok())?;
        (Box::new(backend::Local::new(model, a.max_inflight)?), family)
    } else {
        let (listed, has_template) = backend::served_model(&a.url[0])?;
        let name = a.served_model_name.clone().unwrap_or(listed);
        let family = family::choose(spec.family.as_deref(), &name, has_template)?;
        (Box::new(backend::Http::new(a.url.clone(), Some(name), a.max_inflight)), family)
    };
    eprintln!(
        "{} items ({} already in {}), {} stages, model family `{}`, up to {} requests in flight",
        todo.len() + done.len(),
        done.len(),
        a.output.display(),
        spec.stages.len(),
        family.name(),
        a.max_inflight
    );
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&a.output).with_context(|| format!("opening {}", a.output.display()))?;
    let mut run = Run { spec: &spec, env: spec::environment(), family: family.as_ref(), out: std::io::BufWriter::new(out), started: Instant::now(), record_prompts: a.record_prompts, capture_dir, summary: Summary::default(), bars: Bars::new(&spec, todo.len()) };
    run.drive(todo, backend.as_mut(), a.max_inflight)?;
    run.bars.finish();
    run.summary.print(&spec, run.started.elapsed().as_secs_f64());
    Ok(())
}

fn read_input(path: &Path) -> Result<Vec<Item>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut items = vec![];
    let mut seen = HashSet::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Value::Object(mut ctx) = serde_json::from_str(&line).with_context(|| format!("{} line {}: not JSON", path.display(), n + 1))? else {
            bail!("{} line {}: each line must be a JSON object", path.display(), n + 1);
        };
        let id = ctx.remove("id").with_context(|| format!("{} line {}: no `id`", path.display(), n + 1))?;
        if !seen.insert(id.to_string()) {
            bail!("{} line {}: the id {id} appears twice; ids must be unique", path.display(), n + 1);
        }
        items.push(Item { id, ctx, stage: 0, stats: Map::new(), prompts: Map::new(), captures: Map::new(), sent_at: None });
    }
    Ok(items)
}

/// The ids already answered in `path` (success or error). A last line cut short by a crash is
/// removed, so appending goes on from a clean record boundary.
fn resume(path: &Path) -> Result<HashSet<String>> {
    let mut done = HashSet::new();
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(done) };
    let mut good = 0;
    for line in text.split_inclusive('\n') {
        match serde_json::from_str::<Value>(line.trim()) {
            Ok(v) if line.ends_with('\n') && v.get("id").is_some() => {
                done.insert(v["id"].to_string());
                good += line.len();
            }
            _ if line.trim().is_empty() => good += line.len(),
            _ => break,
        }
    }
    if good < text.len() {
        eprintln!("{}: dropping a record cut short at byte {good}", path.display());
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(good as u64)?;
    }
    Ok(done)
}

struct Run<'a> {
    spec: &'a Spec,
    env: minijinja::Environment<'static>,
    family: &'a dyn family::Family,
    out: std::io::BufWriter<std::fs::File>,
    started: Instant,
    record_prompts: bool,
    capture_dir: PathBuf,
    summary: Summary,
    bars: Bars,
}

impl Run<'_> {
    fn drive(&mut self, items: Vec<Item>, backend: &mut dyn Backend, max_inflight: usize) -> Result<()> {
        let mut items: HashMap<u64, Item> = items.into_iter().enumerate().map(|(i, it)| (i as u64, it)).collect();
        // Items ready for their next stage; later stages go first.
        let mut ready: VecDeque<u64> = (0..items.len() as u64).collect();
        let mut inflight = 0;
        loop {
            while inflight < max_inflight {
                let Some(k) = ready.pop_front() else { break };
                let Some(item) = items.get_mut(&k) else { continue };
                match self.next_call(k, item) {
                    Ok(Some(call)) => {
                        item.sent_at = Some(Instant::now());
                        backend.submit(call);
                        inflight += 1;
                    }
                    Ok(None) => {
                        if let Some(item) = items.remove(&k) {
                            self.write_success(item)?;
                        }
                    }
                    Err(msg) => {
                        if let Some(item) = items.remove(&k) {
                            self.write_error(item, &msg)?;
                        }
                    }
                }
            }
            if inflight == 0 {
                break;
            }
            let replies = backend.wait();
            if replies.is_empty() {
                // The backend is gone: what is in flight fails, nothing is lost.
                for (_, item) in items.drain() {
                    self.write_error(item, "the backend stopped")?;
                }
                break;
            }
            for Reply { key, result } in replies {
                inflight -= 1;
                let k = key >> 8;
                let Some(item) = items.get_mut(&k) else { continue };
                match self.absorb(item, result) {
                    Ok(()) => ready.push_front(k),
                    Err(msg) => {
                        if let Some(item) = items.remove(&k) {
                            self.write_error(item, &msg)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The call for the item's next stage that runs (skipped stages get `null`), or `None`
    /// when every stage is done.
    fn next_call(&mut self, key: u64, item: &mut Item) -> Result<Option<Call>, String> {
        while let Some(stage) = self.spec.stages.get(item.stage) {
            if !spec::runs(&self.env, stage, &item.ctx)? {
                item.ctx.insert(stage.name.clone(), Value::Null);
                self.bars.done(item.stage);
                item.stage += 1;
                continue;
            }
            let prompt = spec::render(&self.env, stage, &item.ctx)?;
            if self.record_prompts {
                item.prompts.insert(stage.name.clone(), json!(prompt));
            }
            let input = family::input(self.family, stage.chat, stage.system.as_deref(), prompt);
            let capture = stage.capture.as_ref().map(|c| (c.hooks.clone(), c.positions.clone()));
            return Ok(Some(Call { key: key << 8 | item.stage as u64, input, max_tokens: stage.max_tokens, temperature: stage.temperature, capture }));
        }
        Ok(None)
    }

    /// Take in a finished request of the item's current stage.
    fn absorb(&mut self, item: &mut Item, result: Result<backend::Answer, String>) -> Result<(), String> {
        let answer = result?;
        let stage = &self.spec.stages[item.stage];
        let now = Instant::now();
        let sent = item.sent_at.take().unwrap_or(now);
        let ms = |t: Instant| (t.duration_since(self.started).as_secs_f64() * 1e4).round() / 10.0;
        item.stats.insert(
            stage.name.clone(),
            json!({"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens, "started_ms": ms(sent), "finished_ms": ms(now), "ms": ((now - sent).as_secs_f64() * 1e4).round() / 10.0}),
        );
        if let Some(bytes) = answer.capture {
            std::fs::create_dir_all(&self.capture_dir).map_err(|e| format!("{}: {e}", self.capture_dir.display()))?;
            let name: String = item.id.to_string().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
            let path = self.capture_dir.join(format!("{name}.{}.safetensors", stage.name));
            std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
            item.captures.insert(stage.name.clone(), json!(path.display().to_string()));
        }
        self.summary.tokens += answer.completion_tokens;
        item.ctx.insert(stage.name.clone(), json!(self.family.clean(&answer.text)));
        self.bars.done(item.stage);
        item.stage += 1;
        Ok(())
    }

    fn write_success(&mut self, item: Item) -> Result<()> {
        let mut rec = Map::new();
        rec.insert("id".into(), item.id);
        for s in &self.spec.stages {
            rec.insert(s.name.clone(), item.ctx.get(&s.name).cloned().unwrap_or(Value::Null));
        }
        rec.insert("stats".into(), Value::Object(item.stats));
        if !item.captures.is_empty() {
            rec.insert("captures".into(), Value::Object(item.captures));
        }
        if self.record_prompts {
            rec.insert("prompts".into(), Value::Object(item.prompts));
        }
        self.summary.ok += 1;
        self.write(Value::Object(rec))
    }

    fn write_error(&mut self, item: Item, message: &str) -> Result<()> {
        let stage = self.spec.stages.get(item.stage).map_or("", |s| s.name.as_str()).to_string();
        for s in item.stage..self.spec.stages.len() {
            self.bars.done(s);
        }
        *self.summary.errors.entry(stage.clone()).or_default() += 1;
        self.write(json!({"id": item.id, "error": {"stage": stage, "message": message}, "stats": item.stats}))
    }

    fn write(&mut self, rec: Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, &rec)?;
        self.out.write_all(b"\n")?;
        // A crash loses nothing that finished.
        self.out.flush()?;
        Ok(())
    }
}

#[derive(Default)]
struct Summary {
    ok: usize,
    errors: HashMap<String, usize>,
    tokens: usize,
}

impl Summary {
    fn print(&self, spec: &Spec, secs: f64) {
        let failed: usize = self.errors.values().sum();
        eprintln!("{} items: {} done, {failed} failed; {} tokens generated in {secs:.1} s ({:.1} tokens/s)", self.ok + failed, self.ok, self.tokens, self.tokens as f64 / secs.max(1e-9));
        for s in &spec.stages {
            if let Some(n) = self.errors.get(&s.name) {
                eprintln!("  errors in stage `{}`: {n}", s.name);
            }
        }
    }
}

/// One progress bar per stage.
struct Bars {
    multi: indicatif::MultiProgress,
    bars: Vec<indicatif::ProgressBar>,
}

impl Bars {
    fn new(spec: &Spec, items: usize) -> Bars {
        let multi = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template("{prefix:>12} {bar:30} {pos}/{len} {elapsed_precise}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let bars = spec
            .stages
            .iter()
            .map(|s| {
                let b = multi.add(indicatif::ProgressBar::new(items as u64));
                b.set_style(style.clone());
                b.set_prefix(s.name.clone());
                b
            })
            .collect();
        Bars { multi, bars }
    }

    fn done(&self, stage: usize) {
        if let Some(b) = self.bars.get(stage) {
            b.inc(1);
        }
    }

    fn finish(&self) {
        for b in &self.bars {
            b.finish();
        }
        let _ = self.multi.clear();
    }
}
