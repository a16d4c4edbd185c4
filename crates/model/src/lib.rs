//! Models, layers, loading, tokenizers and chat templates. Everything tensor-shaped lives
//! here; the engine sees a model through [`DecoderModel::forward`] and the hook traits.

pub mod alloc;
pub mod attention;
pub mod batch;
pub mod capture_file;
pub mod chat;
pub mod config;
pub mod decoder;
pub mod error;
pub mod fetch;
pub mod forward;
pub mod heads;
pub mod hooks;
pub mod kernels;
pub mod kquants;
pub mod ktiles;
pub mod layers;
pub mod loader;
pub mod moe;
pub mod pool;
pub mod qkernels;
pub mod tiles;
pub mod tokenizer;
pub mod weights;

pub use batch::{BatchLayout, ContiguousKvCache, KvCache, LogitRows, SeqSpan};
pub use chat::{ChatContext, ChatTemplate};
pub use config::{Arch, ModelConfig};
pub use decoder::DecoderModel;
pub use error::{ModelError, Result};
pub use forward::{ForwardCtx, OpSpan};
pub use hooks::{CaptureCollector, HookHandler, HookRows, HookSet};
pub use loader::{load, load_tokenizer, resolve, LoadedModel, ModelSource};
pub use tokenizer::Tokenizer;
pub use weights::LoadOptions;
