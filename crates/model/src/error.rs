use std::path::PathBuf;

/// Everything that can go wrong loading or running a model, said so a user knows what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("model not found: `{0}` is neither a local file or directory nor a model in the Hugging Face hub cache (set HF_HOME or pass a path)")]
    NotFound(String),
    #[error("unsupported architecture `{0}` (glassbox runs {names})", names = crate::config::ARCH_NAMES)]
    UnknownArchitecture(String),
    #[error("config is missing `{0}`")]
    MissingConfig(String),
    #[error("invalid config: {0}")]
    BadConfig(String),
    #[error("weight `{0}` is missing from the model files")]
    MissingWeight(String),
    #[error("weight `{name}` has shape {got:?}, expected {expected:?}")]
    WeightShape { name: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("download failed: {0}")]
    Download(String),
    #[error(transparent)]
    Hook(#[from] glassbox_protocol::HookError),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub fn file(path: impl Into<PathBuf>, why: impl std::fmt::Display) -> Self {
        ModelError::File { path: path.into(), why: why.to_string() }
    }
}
