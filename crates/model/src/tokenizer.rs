//! Tokenizers via the `tokenizers` crate. A GGUF vocabulary is converted into the same kind of
//! tokenizer (a `tokenizer.json` document), following llama.cpp's pre-tokenizer rules.

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::Value as GValue;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Cached: `tokenizers` builds (clones) the whole vocabulary map to count it, which cost
    /// 8 ms per generated token on SmolLM2 when the detokenizer asked every token.
    vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::file(path, e))?;
        Ok(Self::wrap(inner, None, None))
    }

    pub fn from_json(json: &Value) -> Result<Self> {
        let inner: tokenizers::Tokenizer = serde_json::from_value(json.clone()).map_err(tok_err)?;
        Ok(Self::wrap(inner, None, None))
    }

    fn wrap(inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Option<u32>) -> Self {
        let vocab_size = inner.get_vocab_size(true);
        Tokenizer { inner, vocab_size, bos_token_id: bos, eos_token_id: eos }
    }

    /// Set BOS/EOS ids from the tokenizer config (`bos_token` / `eos_token` strings).
    pub fn set_special(&mut self, bos: Option<&str>, eos: Option<&str>) {
        if let Some(b) = bos.and_then(|t| self.inner.token_to_id(t)) {
            self.bos_token_id = Some(b);
        }
        if let Some(e) = eos.and_then(|t| self.inner.token_to_id(t)) {
            self.eos_token_id = Some(e);
        }
    }

    /// Build from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(meta: &HashMap<String, GValue>) -> Result<Self> {
        let json = gguf_tokenizer_json(meta)?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(json).map_err(tok_err)?;
        let id = |k: &str| meta.get(k).and_then(|v| v.to_u32().ok());
        let n = inner.get_vocab_size(true) as u32;
        let valid = |v: Option<u32>| v.filter(|&i| i < n);
        Ok(Self::wrap(inner, valid(id("tokenizer.ggml.bos_token_id")), valid(id("tokenizer.ggml.eos_token_id"))))
    }

    /// Token ids of `text`. Special-token text (`<|im_start|>`) becomes the special token;
    /// `add_special` adds BOS/EOS as the model's rules say.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Is this id a special (control) token?
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_vocabulary().get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

// GGUF token types (llama.cpp's llama_token_type).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

fn strings(meta: &HashMap<String, GValue>, key: &str) -> Result<Vec<String>> {
    let arr = meta
        .get(key)
        .ok_or_else(|| ModelError::Tokenizer(format!("GGUF has no `{key}`")))?
        .to_vec()
        .map_err(tok_err)?;
    arr.iter().map(|v| v.to_string().cloned().map_err(tok_err)).collect()
}

fn numbers<T>(meta: &HashMap<String, GValue>, key: &str, f: impl Fn(&GValue) -> Option<T>) -> Option<Vec<T>> {
    let arr = meta.get(key)?.to_vec().ok()?;
    arr.iter().map(f).collect()
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 3.5: letters include combining marks.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const CJK: &str = r"[一-龥ࠀ-一가-퟿]+";

/// A BPE pre-tokenizer as llama.cpp runs it for a `tokenizer.ggml.pre` value: the regexes
/// that split the text in turn, and whether a pre-token found whole in the vocabulary is
/// taken as is (`ignore_merges`, Llama 3's family).
struct PreTokenizer {
    names: &'static [&'static str],
    regexes: &'static [&'static str],
    ignore_merges: bool,
}

/// Every BPE pre-tokenizer glassbox knows; each row is checked against llama.cpp's own
/// vocabulary tests where llama.cpp ships one (tests/conformance.rs). Three that llama.cpp
/// runs through hand-written splitters are written here as the regexes those splitters
/// implement: `kimi-k2` (its tokenizer's own regex, whose class intersections Oniguruma
/// supports), and `afmoe` / `superbpe` (digit runs split into groups of three from the right).
const PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        names: &[
            "gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "jina-v1-en",
            "jina-v2-code", "roberta-bpe", "a.x-4.0", "mellum", "modern-bert", "exaone4",
        ],
        regexes: &[GPT2],
        ignore_merges: false,
    },
    PreTokenizer {
        names: &["llama3", "llama-bpe", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"],
        regexes: &[LLAMA3],
        ignore_merges: true,
    },
    PreTokenizer { names: &["dbrx", "smaug-bpe"], regexes: &[LLAMA3], ignore_merges: false },
    PreTokenizer { names: &["qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "kormo", "f2llmv2", "megrez"], regexes: &[QWEN2], ignore_merges: false },
    PreTokenizer { names: &["qwen35"], regexes: &[QWEN35], ignore_merges: false },
    PreTokenizer { names: &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], regexes: &[r"\p{N}", GPT2], ignore_merges: false },
    PreTokenizer { names: &["falcon"], regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"], ignore_merges: false },
    PreTokenizer { names: &["deepseek-coder"], regexes: &[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, r"\p{N}"], ignore_merges: false },
    // The published second regex enumerates the cased letters (Latin, Greek, Cyrillic,
    // Armenian, Georgian, Cherokee, ...) range by range; `Lu|Ll|Lt` names the same set.
    PreTokenizer {
        names: &["deepseek-llm"],
        regexes: &[r"[\r\n]", r"\s?[\p{Lu}\p{Ll}\p{Lt}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", CJK, r"\p{N}+"],
        ignore_merges: false,
    },
    // Ported from llama.cpp's `llm_tokenizer_bpe` (src/llama-vocab.cpp) for the types its
    // vocabulary tests do not cover; the regexes are llama.cpp's, split in the same order.
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM
    PreTokenizer { names: &["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"], regexes: &[r#"\p{N}{1,3}"#, r#"[一-龥぀-ゟ゠-ヿ]+"#, r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_SPARK2_5
    PreTokenizer { names: &["spark2_5"], regexes: &[r#"\p{N}{1,3}"#, r#"[一-龥぀-ゟ゠-ヿ]+"#, r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##, r#"\p{N}"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_YOUTU
    PreTokenizer { names: &["youtu"], regexes: &[r#"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+"#, r#"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: true },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_JAIS2
    PreTokenizer { names: &["jais-2"], regexes: &[r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_PORO
    PreTokenizer { names: &["poro-chat", "bloom", "gpt3-finnish"], regexes: &[r#" ?[^(\s|.,!?…。，、।۔،)]+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_CHATGLM4
    PreTokenizer { names: &["chatglm-bpe"], regexes: &[r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_CHATGLM4
    PreTokenizer { names: &["glm4", "glm5"], regexes: &[r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: true },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_VIKING
    PreTokenizer { names: &["viking"], regexes: &[r#" ?[^(\s|.,!?…。，、।۔،)]+"#, r#"\p{N}"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_TEKKEN
    PreTokenizer { names: &["tekken"], regexes: &[r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: true },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_CHAMELEON
    PreTokenizer { names: &["chameleon"], regexes: &[r#"<sentinel:[0-9]+>"#, r#"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"#, r#"([\t\n]|    |  )"#, r#"\p{N}"#, r#"[\p{P}!-/:-@\[-`{-~]"#, r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_GPT4O
    PreTokenizer { names: &["gpt-4o", "llama4", "kanana2", "talkie"], regexes: &[r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_GRANITE_EMB_MULTI
    PreTokenizer { names: &["granite-embed-multi-97m"], regexes: &[r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: true },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_TINY_AYA
    PreTokenizer { names: &["tiny_aya", "cohere2moe"], regexes: &[r#"\d{1,3}(?=(?:\d{3})*\b)"#, r#"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_TRILLION
    PreTokenizer { names: &["trillion", "granite-docling"], regexes: &[r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_BAILINGMOE
    PreTokenizer { names: &["bailingmoe", "bailingmoe2", "llada-moe"], regexes: &[r#"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_SEED_CODER
    PreTokenizer { names: &["seed-coder"], regexes: &[r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_UFAKZEKA
    PreTokenizer { names: &["ufakzeka"], regexes: &[r#"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_GROK_2
    PreTokenizer { names: &["grok-2"], regexes: &[r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_LAGUNA
    PreTokenizer { names: &["laguna"], regexes: &[r#"[^\n]+|[\n]+"#, r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_MINIMAX_M2
    PreTokenizer { names: &["minimax-m2"], regexes: &[r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_SOLAR_OPEN
    PreTokenizer { names: &["solar-open"], regexes: &[r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_MELLUM2
    PreTokenizer { names: &["mellum2"], regexes: &[r#"\p{N}"#, r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_EXAONE_MOE
    PreTokenizer { names: &["exaone-moe"], regexes: &[r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_MINICPM5
    PreTokenizer { names: &["minicpm5"], regexes: &[r#"\p{N}{1,3}"#, r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#], ignore_merges: true },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_WHITESPACE
    PreTokenizer { names: &["whitespace"], regexes: &[r#"\S+"#], ignore_merges: false },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_KIMI_K2: tokenization_kimi.py's pattern (llama.cpp's
    // unicode_regex_split_custom_kimi_k2 hand-codes it).
    PreTokenizer {
        names: &["kimi-k2"],
        regexes: &[r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
        ignore_merges: false,
    },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_AFMOE: its digit splitter (a run's leading 1-2 digits,
    // then threes) as a regex, then the CJK/Thai/... runs and the main pattern.
    PreTokenizer {
        names: &["afmoe"],
        regexes: &[
            r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))",
            r"[一-鿿㐀-䶿豈-﫿぀-ゟ゠-ヿ･-ﾟ⼀-⿟เ-๿຀-໿ក-៿က-႟ꩠ-ꩿꧠ-꧿가-힯ᄀ-ᇿ]+",
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
        ],
        ignore_merges: false,
    },
    // llama.cpp LLAMA_VOCAB_PRE_TYPE_SUPERBPE: number runs, then digit runs split into threes
    // from the right (llama.cpp's zero-width lookahead); spaces stay inside pre-tokens.
    PreTokenizer { names: &["superbpe"], regexes: &[r"\p{N}+", r"\d{1,3}(?=(?:\d{3})*(?!\d))"], ignore_merges: false },
    PreTokenizer { names: &["default"], regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], ignore_merges: false },
];

fn pre_tokenizer(pre: &str) -> Result<&'static PreTokenizer> {
    PRE_TOKENIZERS.iter().find(|p| p.names.contains(&pre)).ok_or_else(|| {
        let known: Vec<&str> = PRE_TOKENIZERS.iter().flat_map(|p| p.names.iter().copied()).collect();
        ModelError::Tokenizer(format!("unsupported BPE pre-tokenizer `{pre}` (known: {})", known.join(", ")))
    })
}

/// Convert GGUF tokenizer metadata into a `tokenizer.json` document.
pub fn gguf_tokenizer_json(meta: &HashMap<String, GValue>) -> Result<Value> {
    let model = meta.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let tokens = strings(meta, "tokenizer.ggml.tokens")?;
    let types: Vec<i32> = numbers(meta, "tokenizer.ggml.token_type", |v| v.to_i32().ok())
        .unwrap_or_else(|| vec![NORMAL; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(ModelError::Tokenizer("token_type and tokens differ in length".into()));
    }
    let flag = |k: &str| meta.get(k).and_then(|v| v.to_bool().ok());
    let id = |k: &str| meta.get(k).and_then(|v| v.to_u32().ok()).filter(|&i| (i as usize) < tokens.len());

    let added: Vec<Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t == CONTROL || t == USER_DEFINED || t == UNKNOWN)
        .map(|(i, (content, &t))| {
            json!({"id": i, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": t != USER_DEFINED})
        })
        .collect();

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(json!(i));
    }

    let pre = meta.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_else(|| "default".into());
    // BPE vocabularies that escape spaces as `▁` instead of byte-level encoding run like Gemma 4's.
    let model = match (model.as_str(), pre.as_str()) {
        ("gpt2", "gemma4" | "sarvam-moe" | "granite-embed-multi-311m") => "gemma4".to_string(),
        _ => model,
    };
    let (normalizer, pre_tokenizer, decoder, bpe_model, add_bos_default) = match model.as_str() {
        "llama" => {
            let scores: Vec<f32> = numbers(meta, "tokenizer.ggml.scores", |v| v.to_f32().ok())
                .ok_or_else(|| ModelError::Tokenizer("SentencePiece vocabulary without scores".into()))?;
            let merges = spm_merges(&tokens, &types, &scores);
            let space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let mut norm = vec![];
            if space_prefix {
                norm.push(json!({"type": "Prepend", "prepend": "▁"}));
            }
            norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
            let mut dec = vec![
                json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if space_prefix {
                dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let unk = id("tokenizer.ggml.unknown_token_id").map(|i| tokens[i as usize].clone());
            let model = json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges});
            (json!({"type": "Sequence", "normalizers": norm}), Value::Null, json!({"type": "Sequence", "decoders": dec}), model, true)
        }
        "gpt2" => {
            let pt = pre_tokenizer(&pre)?;
            let mut pretok: Vec<Value> = pt
                .regexes
                .iter()
                .map(|re| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}))
                .collect();
            pretok.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
            let merges = bpe_merges(meta)?;
            let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": pt.ignore_merges, "vocab": vocab, "merges": merges});
            let dec = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
            // llama.cpp adds BOS by default for the Llama 3 family only.
            (Value::Null, json!({"type": "Sequence", "pretokenizers": pretok}), dec, model, pt.ignore_merges)
        }
        "gemma4" => {
            // SentencePiece-style BPE: spaces become `▁` (no prefix), the text is split only
            // into runs of newlines and runs of everything else, merges apply to raw UTF-8 with
            // byte fallback, and a piece found whole in the vocabulary (a newline run) is kept.
            let merges = bpe_merges(meta)?;
            let unk = id("tokenizer.ggml.unknown_token_id").map(|i| tokens[i as usize].clone());
            let model = json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": true,
                "vocab": vocab, "merges": merges});
            let norm = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
            let pre = json!({"type": "Split", "pattern": {"Regex": "[^\\n]+|[\\n]+"}, "behavior": "Isolated", "invert": false});
            let dec = json!({"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]});
            (norm, pre, dec, model, true)
        }
        "bert" => {
            // llama.cpp's converter stores WordPiece vocabularies with a phantom space: a
            // word-initial piece as `▁piece`, a continuation as the bare piece. Back to `##`.
            let mut wp = serde_json::Map::with_capacity(tokens.len());
            for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
                let piece = match t.strip_prefix('▁') {
                    Some(word) => word.to_string(),
                    None if ty == CONTROL || ty == UNKNOWN || (t.starts_with('[') && t.ends_with(']')) => t.clone(),
                    None => format!("##{t}"),
                };
                wp.entry(piece).or_insert(json!(i));
            }
            let unk = id("tokenizer.ggml.unknown_token_id").map_or_else(|| "[UNK]".to_string(), |i| tokens[i as usize].clone());
            let model = json!({"type": "WordPiece", "unk_token": unk, "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": wp});
            let norm = json!({"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true});
            let dec = json!({"type": "WordPiece", "prefix": "##", "cleanup": true});
            (norm, json!({"type": "BertPreTokenizer"}), dec, model, false)
        }
        other => {
            return Err(ModelError::Tokenizer(format!(
                "unsupported GGUF tokenizer model `{other}` (supported: llama (SentencePiece), gpt2 (BPE), gemma4 (SentencePiece-style BPE), bert (WordPiece))"
            )))
        }
    };

    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default);
    let add_eos = flag("tokenizer.ggml.add_eos_token").unwrap_or(false);
    let mut single = vec![];
    let mut special_tokens = serde_json::Map::new();
    let mut special = |key: &str, on: bool, single: &mut Vec<Value>, at_end: bool| {
        if let (true, Some(i)) = (on, id(key)) {
            let t = tokens[i as usize].clone();
            let entry = json!({"SpecialToken": {"id": t, "type_id": 0}});
            if at_end {
                single.push(entry)
            } else {
                single.insert(0, entry)
            }
            special_tokens.insert(t.clone(), json!({"id": t, "ids": [i], "tokens": [t]}));
        }
    };
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    special("tokenizer.ggml.bos_token_id", add_bos, &mut single, false);
    special("tokenizer.ggml.eos_token_id", add_eos, &mut single, true);
    let post = json!({"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": special_tokens});

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": bpe_model,
    }))
}

/// `tokenizer.ggml.merges` (`"a b"` strings) as `tokenizers`' `[a, b]` pairs.
fn bpe_merges(meta: &HashMap<String, GValue>) -> Result<Vec<Value>> {
    Ok(strings(meta, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
            json!([a, b])
        })
        .collect())
}

/// SentencePiece BPE merges from the scores: a piece that splits into two vocabulary pieces
/// is a merge, and higher-scoring results merge first (what transformers' converter does).
fn spm_merges(tokens: &[String], types: &[i32], scores: &[f32]) -> Vec<Value> {
    let mergeable = |i: usize| types[i] == NORMAL || types[i] == USER_DEFINED;
    let ids: HashMap<&str, usize> =
        tokens.iter().enumerate().filter(|(i, _)| mergeable(*i)).map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if !mergeable(i) || types[i] == BYTE {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&a), Some(&b)) = (ids.get(l), ids.get(r)) {
                merges.push((scores.get(i).copied().unwrap_or(0.0), i, a, b));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    merges.into_iter().map(|(_, _, a, b)| json!([tokens[a], tokens[b]])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{PreTokenizedString, PreTokenizer as _, SplitDelimiterBehavior};

    /// Every row's regexes compile in the `tokenizers` regex engine, and splitting in turn
    /// loses and invents nothing.
    #[test]
    fn every_pre_tokenizer_compiles_and_keeps_the_text() {
        let text = "Hello World! It's 2026-11-22, 12345678 tokens\n\n  in 東京 and Привет мир.\tDone?? <sentinel:3> ok";
        for pt in PRE_TOKENIZERS {
            let pieces = split(pt.names[0], text);
            assert_eq!(pieces.concat(), text, "{:?}", pt.names);
            assert!(pieces.len() > 5, "{:?}: {pieces:?}", pt.names);
        }
    }

    /// The pieces `pre` splits `text` into, its regexes in turn.
    fn split(pre: &str, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        for re in pre_tokenizer(pre).unwrap().regexes {
            Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .unwrap_or_else(|e| panic!("{pre}: regex {re} does not compile: {e}"))
                .pre_tokenize(&mut s)
                .unwrap();
        }
        s.get_splits(tokenizers::OffsetReferential::Original, tokenizers::OffsetType::Byte).iter().map(|(p, ..)| p.to_string()).collect()
    }

    /// The hand-written splitters of llama.cpp, as regexes: what they do on examples worked
    /// through its code (unicode.cpp).
    #[test]
    fn hand_written_splitters_as_regexes() {
        assert_eq!(split("afmoe", "x1234567"), ["x", "1", "234", "567"]);
        assert_eq!(split("superbpe", "in 12345 days"), ["in ", "12", "345", " days"]);
        assert_eq!(split("kimi-k2", "你好world's 1234"), ["你好", "world's", " ", "123", "4"]);
    }

    #[test]
    fn unknown_pre_tokenizers_are_refused_by_name() {
        let err = pre_tokenizer("no-such-pre").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("unsupported BPE pre-tokenizer `no-such-pre`"), "{err}");
        for name in ["kimi-k2", "afmoe", "superbpe", "deepseek-v3", "tekken", "gpt-4o", "llama4", "chatglm-bpe", "viking", "bloom", "chameleon", "bailingmoe", "seed-coder", "exaone-moe", "trillion", "minimax-m2"] {
            assert!(pre_tokenizer(name).is_ok(), "{name}");
        }
    }
}
