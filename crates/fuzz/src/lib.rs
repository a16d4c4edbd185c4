//! Fuzz targets for everything glassbox parses from files it did not write: GGUF models and
//! vocabularies (header, metadata, tensor table, the tokenizer built from the metadata),
//! safetensors headers and chat templates. Each target takes arbitrary bytes and must return
//! (an error is fine) without panicking, overflowing or allocating without bound.
//!
//! cargo-fuzz needs a nightly compiler; this is the stable equivalent: a mutation fuzzer
//! over a small corpus (`corpus/<target>/`), run by `glassbox-fuzz` (see README) and, briefly,
//! by `cargo test`.

use glassbox_model::{ChatContext, ChatTemplate, LoadOptions, ModelSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A whole model load from a GGUF file.
    Gguf,
    /// The tokenizer glassbox builds from a GGUF vocabulary.
    Tokenizer,
    /// A model load from a Hugging Face directory whose `model.safetensors` is the input.
    Safetensors,
    /// Parsing and rendering a chat template.
    Template,
}

pub const TARGETS: [Target; 4] = [Target::Gguf, Target::Tokenizer, Target::Safetensors, Target::Template];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Gguf => "gguf",
            Target::Tokenizer => "tokenizer",
            Target::Safetensors => "safetensors",
            Target::Template => "template",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        TARGETS.into_iter().find(|t| t.name() == s)
    }

    pub fn corpus_dir(self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(self.name())
    }
}

/// A scratch directory per target: inputs that must be files are written here.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(target: Target) -> std::io::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("glassbox-fuzz-{}-{}", std::process::id(), target.name()));
        std::fs::create_dir_all(&dir)?;
        if target == Target::Safetensors {
            // A valid tiny config and tokenizer: the weights file is what varies.
            std::fs::write(dir.join("config.json"), TINY_CONFIG)?;
            std::fs::write(dir.join("tokenizer.json"), TINY_TOKENIZER)?;
        }
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Run one input through a target. Errors are expected; only a panic (or an abort) is a bug.
pub fn run(target: Target, input: &[u8], scratch: &Scratch) {
    match target {
        Target::Gguf | Target::Tokenizer => {
            let path = scratch.dir.join("input.gguf");
            if std::fs::write(&path, input).is_err() {
                return;
            }
            let source = ModelSource::Gguf(path);
            if target == Target::Gguf {
                let _ = glassbox_model::load(&source, LoadOptions::default());
            } else if let Ok(bundle) = glassbox_model::load_tokenizer(&source) {
                let _ = bundle.tokenizer.encode("Hello world, 12345 héllo 你好 <s>", true);
                let _ = bundle.tokenizer.decode(&[0, 1, 2, 3, 100], false);
            }
        }
        Target::Safetensors => {
            if std::fs::write(scratch.dir.join("model.safetensors"), input).is_err() {
                return;
            }
            let _ = glassbox_model::load(&ModelSource::HfDir(scratch.dir.clone()), LoadOptions::default());
        }
        Target::Template => {
            let Ok(src) = std::str::from_utf8(input) else { return };
            if let Ok(t) = ChatTemplate::new(src) {
                let messages = serde_json::json!([
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": [{"type": "text", "text": "parts"}]},
                ]);
                let ctx = ChatContext { add_generation_prompt: true, bos_token: "<s>".into(), eos_token: "</s>".into(), vars: Default::default() };
                let _ = t.render(&messages, &ctx);
            }
        }
    }
}

/// Integers that break size arithmetic.
const INTERESTING: [u64; 10] = [0, 1, 0x7f, 0xff, 0x7fff_ffff, 0xffff_ffff, 0x1_0000_0000, 1 << 40, i64::MAX as u64, u64::MAX];

/// A mutated copy of `seed` (1 to 4 edits; `other` may be spliced in).
pub fn mutate(rng: &mut StdRng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..64)).min(len);
                v.drain(a..b);
            }
            4 if len > 0 => v.truncate(rng.random_range(0..len)),
            5 if len >= 8 => {
                // Overwrite a 4- or 8-byte little-endian field with an interesting value.
                let x = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let w = if rng.random() { 4 } else { 8 };
                let i = rng.random_range(0..=len - w);
                v[i..i + w].copy_from_slice(&x.to_le_bytes()[..w]);
            }
            6 if !other.is_empty() && len > 0 => {
                let a = rng.random_range(0..other.len());
                let b = (a + rng.random_range(1..256)).min(other.len());
                let at = rng.random_range(0..len);
                v.splice(at..at, other[a..b].iter().copied());
            }
            _ if len > 2 => {
                let a = rng.random_range(0..len - 1);
                let b = rng.random_range(a + 1..len);
                v.swap(a, b);
            }
            _ => v.push(rng.random()),
        }
    }
    v
}

/// The corpus of a target: every file in its directory.
pub fn corpus(target: Target) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(target.corpus_dir()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Fuzz `target` for `iterations` inputs (or until `deadline`). Returns the number of
/// executions, or the first input that panicked with its message.
pub fn fuzz(target: Target, seed: u64, iterations: u64, deadline: Option<std::time::Instant>) -> Result<u64, (Vec<u8>, String)> {
    let corpus = corpus(target);
    assert!(!corpus.is_empty(), "no corpus for {}: run `glassbox-fuzz seed`", target.name());
    let scratch = Scratch::new(target).expect("a scratch directory");
    let mut rng = StdRng::seed_from_u64(seed);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut done = 0;
    let result = loop {
        if done >= iterations || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            break Ok(done);
        }
        let a = &corpus[rng.random_range(0..corpus.len())];
        let b = &corpus[rng.random_range(0..corpus.len())];
        // Each seed also runs unmutated once in a while.
        let input = if rng.random_range(0..50) == 0 { a.clone() } else { mutate(&mut rng, a, b) };
        done += 1;
        if let Err(p) = std::panic::catch_unwind(|| run(target, &input, &scratch)) {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            break Err((input, msg));
        }
    };
    std::panic::set_hook(hook);
    result
}

/// A Llama config whose weights (absent here) would be tiny.
const TINY_CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
 "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
 "tie_word_embeddings": true}"#;

/// A 16-token byte-level BPE tokenizer.
const TINY_TOKENIZER: &str = r#"{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
 "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
 "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
 "vocab": {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "ab": 5, "cd": 6, "Ġ": 7, "h": 8, "i": 9, "hi": 10, "o": 11, "l": 12, "ll": 13, "he": 14, "lo": 15},
 "merges": ["a b", "c d", "h i", "l l", "h e", "l o"]}}"#;
