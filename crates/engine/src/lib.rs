//! The engine: `EngineCore` (scheduler, paged KV cache, model runner, sampler) on one thread,
//! a handle that runs it on its own thread, and the offline `LLM` API.

pub mod block;
pub mod core;
pub mod crash;
pub mod detok;
pub mod dump;
pub mod fault;
pub mod handle;
pub mod kv_store;
pub mod lens;
pub mod llm;
pub mod profile;
pub mod sampler;
pub mod scheduler;
pub mod stats;
pub mod steer;

pub use crate::core::{EngineConfig, EngineCore, EngineError, KvMemory, Inspect, Limits, ProfileError};
pub use crash::CrashDump;
pub use kv_store::KvDtype;
pub use stats::{EngineStats, Histogram};
pub use handle::{EngineCommand, EngineHandle, SubmitError};
pub use llm::{CompletionOutput, RequestOutput, LLM};
