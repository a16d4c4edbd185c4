//! Finding and loading a model: a GGUF file, a Hugging Face directory, a hub id in the local
//! hub cache, or (with nothing given) the default model.

use crate::chat::ChatTemplate;
use crate::config::{ModelConfig, RopeScaling};
use crate::decoder::DecoderModel;
use crate::error::{ModelError, Result};
use crate::fetch;
use crate::tokenizer::Tokenizer;
use crate::weights::{LoadOptions, WeightFiles};
use candle_core::quantized::gguf_file;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory with `config.json`, safetensors and `tokenizer.json`.
    HfDir(PathBuf),
    Gguf(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p,
        }
    }
}

/// Resolve what the user named. `None` is the default model (downloaded once, then cached).
pub fn resolve(spec: Option<&str>) -> Result<ModelSource> {
    let Some(spec) = spec else {
        return Ok(ModelSource::Gguf(fetch::DEFAULT_MODEL.ensure()?));
    };
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(ModelSource::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        return source_in_dir(path).ok_or_else(|| {
            ModelError::file(path, "no config.json or .gguf file in this directory")
        });
    }
    if let Some(snapshot) = hub_snapshot(spec) {
        return source_in_dir(&snapshot)
            .ok_or_else(|| ModelError::file(&snapshot, "hub snapshot has no config.json or .gguf file"));
    }
    Err(ModelError::NotFound(spec.to_string()))
}

fn source_in_dir(dir: &Path) -> Option<ModelSource> {
    // A tokenizer-only directory is enough for tokenize/render-chat; loading weights from it
    // fails later with a message naming what is missing.
    if dir.join("config.json").is_file() || dir.join("tokenizer.json").is_file() {
        return Some(ModelSource::HfDir(dir.to_path_buf()));
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    ggufs.sort();
    ggufs.into_iter().next().map(ModelSource::Gguf)
}

/// The hub cache folder: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    dirs::home_dir().map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// `org/name[@revision]` in the hub cache layout: `models--org--name/snapshots/<commit>`,
/// with `refs/<revision>` (default `main`) naming the commit.
pub fn hub_snapshot(spec: &str) -> Option<PathBuf> {
    hub_snapshot_in(&hub_cache_dir()?, spec)
}

pub fn hub_snapshot_in(cache: &Path, spec: &str) -> Option<PathBuf> {
    let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    let (org, name) = id.split_once('/')?;
    if org.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    let repo = cache.join(format!("models--{org}--{name}"));
    let commit = std::fs::read_to_string(repo.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snap = repo.join("snapshots").join(commit);
    if snap.is_dir() {
        return Some(snap);
    }
    // No ref: use the only snapshot there is.
    let mut snaps = std::fs::read_dir(repo.join("snapshots")).ok()?.filter_map(|e| e.ok().map(|e| e.path()));
    let first = snaps.next()?;
    snaps.next().is_none().then_some(first)
}

/// A loaded model with everything a request needs around it.
pub struct LoadedModel {
    pub model: DecoderModel,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    /// Every id that ends generation.
    pub eos_token_ids: Vec<u32>,
    pub source: ModelSource,
    pub name: String,
    /// How it was loaded (a crash dump records it so a replay loads it the same way).
    pub options: LoadOptions,
}

impl LoadedModel {
    /// The template variables this model supplies (its BOS/EOS tokens).
    pub fn chat_context(&self, add_generation_prompt: bool) -> crate::chat::ChatContext {
        crate::chat::ChatContext {
            add_generation_prompt,
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
            vars: Default::default(),
        }
    }

    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let src = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::ChatTemplate("this model has no chat template; pass one with --chat-template".into())
        })?;
        ChatTemplate::new(src)
    }
}

/// Tokenizer and chat template only (works on vocab-only GGUF files).
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
}

struct GgufFile {
    mmap: memmap2::Mmap,
    content: gguf_file::Content,
}

fn open_gguf(path: &Path) -> Result<GgufFile> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::file(path, e))?;
    // SAFETY: model files are not modified while mapped.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::file(path, e))?;
    // candle's parser bounds lengths and counts but divides by `general.alignment`
    // unchecked (0 panics): a hostile header must be an error, never a crash.
    let parsed = std::panic::catch_unwind(|| gguf_file::Content::read(&mut std::io::Cursor::new(&mmap[..])));
    let content = match parsed {
        Ok(r) => r.map_err(|e| ModelError::file(path, format!("not a readable GGUF file: {e}")))?,
        Err(_) => return Err(ModelError::file(path, "corrupt GGUF header (bad alignment or sizes)")),
    };
    check_gguf_tensors(path, &content, mmap.len() as u64)?;
    Ok(GgufFile { mmap, content })
}

/// Every tensor's size, computed with checked arithmetic, must be whole blocks and lie inside
/// the file: a truncated download or a hostile header fails here, not mid-load.
pub fn check_gguf_tensors(path: &Path, content: &gguf_file::Content, file_len: u64) -> Result<()> {
    for (name, info) in &content.tensor_infos {
        let bad = |why: String| ModelError::file(path, format!("tensor {name}: {why}"));
        let dims = info.shape.dims();
        let elems = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).ok_or_else(|| bad(format!("shape {dims:?} overflows")))?;
        let (bs, ts) = (info.ggml_dtype.block_size() as u64, info.ggml_dtype.type_size() as u64);
        // No real weight is empty, and candle reinterprets an empty buffer's dangling pointer
        // as blocks (undefined behaviour): refuse it here.
        if elems == 0 {
            return Err(bad(format!("shape {dims:?} has no elements")));
        }
        if elems % bs != 0 {
            return Err(bad(format!("{elems} elements are not whole blocks of {bs}")));
        }
        let bytes = (elems / bs).checked_mul(ts).ok_or_else(|| bad("size overflows".into()))?;
        let end = content.tensor_data_offset.checked_add(info.offset).and_then(|o| o.checked_add(bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(ModelError::file(
                    path,
                    format!("truncated GGUF file: tensor {name} needs {bytes} bytes at offset {}, the file has {file_len} (download it again)", info.offset),
                ))
            }
        }
    }
    Ok(())
}

fn gguf_str(content: &gguf_file::Content, key: &str) -> Option<String> {
    content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}

pub fn load_tokenizer(source: &ModelSource) -> Result<TokenizerBundle> {
    match source {
        ModelSource::Gguf(path) => {
            let g = open_gguf(path)?;
            gguf_tokenizer_bundle(&g.content)
        }
        ModelSource::HfDir(dir) => hf_tokenizer_bundle(dir),
    }
}

fn gguf_tokenizer_bundle(content: &gguf_file::Content) -> Result<TokenizerBundle> {
    let tokenizer = Tokenizer::from_gguf(&content.metadata)?;
    let name_of = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
    Ok(TokenizerBundle {
        bos_token: name_of(tokenizer.bos_token_id),
        eos_token: name_of(tokenizer.eos_token_id),
        chat_template: gguf_str(content, "tokenizer.chat_template"),
        tokenizer,
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::file(path, format!("invalid JSON: {e}")))
}

/// `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        o => o.get("content")?.as_str().map(str::to_string),
    }
}

fn hf_tokenizer_bundle(dir: &Path) -> Result<TokenizerBundle> {
    let mut tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() { read_json(&tc_path)? } else { serde_json::Value::Null };
    let bos = token_text(tc.get("bos_token"));
    let eos = token_text(tc.get("eos_token"));
    tokenizer.set_special(bos.as_deref(), eos.as_deref());
    let jinja = dir.join("chat_template.jinja");
    let chat_template = if jinja.is_file() {
        Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::file(&jinja, e))?)
    } else {
        match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        }
    };
    Ok(TokenizerBundle { tokenizer, chat_template, bos_token: bos.unwrap_or_default(), eos_token: eos.unwrap_or_default() })
}

pub fn load(source: &ModelSource, opts: LoadOptions) -> Result<LoadedModel> {
    let (model, bundle, extra_eos) = match source {
        ModelSource::Gguf(path) => {
            let g = open_gguf(path)?;
            if g.content.tensor_infos.is_empty() {
                return Err(ModelError::file(path, "this GGUF file has a vocabulary but no weights (vocab-only)"));
            }
            let mut cfg = ModelConfig::from_gguf(&g.content.metadata)?;
            cfg.tie_word_embeddings = !g.content.tensor_infos.contains_key("output.weight");
            if g.content.tensor_infos.contains_key("rope_factors_long.weight") {
                // Phi-3 128k / Phi-3.5: two factor sets switched by context length.
                return Err(ModelError::file(path, "LongRoPE (rope_factors_long/short, Phi-3 128k and Phi-3.5) is not supported yet; the 4k-context Phi-3 files run"));
            }
            if let Some(info) = g.content.tensor_infos.get("rope_freqs.weight") {
                let q = info.read(&mut std::io::Cursor::new(&g.mmap[..]), g.content.tensor_data_offset, &candle_core::Device::Cpu)?;
                let f: Vec<f32> = q.dequantize(&candle_core::Device::Cpu)?.to_vec1()?;
                cfg.rope_scaling = RopeScaling::FreqFactors(f);
            }
            let bundle = gguf_tokenizer_bundle(&g.content)?;
            let arch = cfg.arch;
            let files = WeightFiles::gguf(path, g.mmap, g.content, arch);
            let model = DecoderModel::load(&files.root(opts), cfg, true)?;
            (model, bundle, vec![])
        }
        ModelSource::HfDir(dir) => {
            let cfg = ModelConfig::from_hf_json(&read_json(&dir.join("config.json"))?)?;
            let files = WeightFiles::safetensors(safetensors_files(dir)?, cfg.arch)?;
            let model = DecoderModel::load(&files.root(opts), cfg, false)?;
            let bundle = hf_tokenizer_bundle(dir)?;
            let gen = dir.join("generation_config.json");
            let extra = if gen.is_file() {
                match read_json(&gen)?.get("eos_token_id") {
                    Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
                    Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
                    None => vec![],
                }
            } else {
                vec![]
            };
            (model, bundle, extra)
        }
    };
    let mut eos_token_ids: Vec<u32> = model.cfg.eos_token_ids.clone();
    eos_token_ids.extend(extra_eos);
    eos_token_ids.extend(bundle.tokenizer.eos_token_id);
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let name = match source {
        ModelSource::Gguf(p) => p.file_stem(),
        ModelSource::HfDir(p) => p.file_name(),
    }
    .map(|s| s.to_string_lossy().into_owned())
    .unwrap_or_else(|| "model".into());
    Ok(LoadedModel {
        model,
        tokenizer: bundle.tokenizer,
        chat_template: bundle.chat_template,
        bos_token: bundle.bos_token,
        eos_token: bundle.eos_token,
        eos_token_ids,
        source: source.clone(),
        name,
        options: opts,
    })
}

/// `model.safetensors`, or the shards named by `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json["weight_map"].as_object().ok_or_else(|| ModelError::file(&index, "no weight_map"))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(ModelError::file(missing, "shard named in model.safetensors.index.json is missing"));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::file(dir, "no model.safetensors or model.safetensors.index.json"))
}
