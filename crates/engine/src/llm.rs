//! The offline library API, as simple as vLLM's `LLM(model=...).generate(...)`:
//!
//! ```no_run
//! use glassbox_engine::{EngineConfig, LLM};
//! use glassbox_protocol::SamplingParams;
//! let mut llm = LLM::new(None, EngineConfig::default()).unwrap(); // the default model
//! let params = SamplingParams { max_tokens: 10, ..Default::default() };
//! for out in llm.generate(&["Hello"], &params).unwrap() {
//!     println!("{}", out.outputs[0].text);
//! }
//! ```

use crate::core::{EngineConfig, EngineCore};
use glassbox_model::{LoadOptions, LoadedModel, ModelError};
use glassbox_protocol::{Capture, CaptureSpec, LensEntry, EngineOutput, EngineRequest, FinishReason, RequestId, SamplingParams, TokenLogprob};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] crate::core::EngineError),
}

/// One completion of a prompt (`n` > 1 gives several).
#[derive(Clone, Debug, Default)]
pub struct CompletionOutput {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    pub captures: Vec<Capture>,
    pub logit_lens: Vec<LensEntry>,
}

#[derive(Clone, Debug)]
pub struct RequestOutput {
    pub id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    pub outputs: Vec<CompletionOutput>,
    pub cached_tokens: usize,
}

pub struct LLM {
    core: EngineCore,
    next_id: RequestId,
}

impl LLM {
    /// Load a model (path, hub id, or `None` for the default) and build an engine.
    pub fn new(model: Option<&str>, cfg: EngineConfig) -> Result<Self, LlmError> {
        let source = glassbox_model::resolve(model)?;
        let loaded = glassbox_model::load(&source, LoadOptions::default())?;
        Self::from_model(Arc::new(loaded), cfg)
    }

    pub fn from_model(model: Arc<LoadedModel>, cfg: EngineConfig) -> Result<Self, LlmError> {
        Ok(LLM { core: EngineCore::new(model, cfg)?, next_id: 0 })
    }

    pub fn core(&self) -> &EngineCore {
        &self.core
    }

    pub fn core_mut(&mut self) -> &mut EngineCore {
        &mut self.core
    }

    /// Generate for every prompt, batched; results in prompt order.
    pub fn generate(&mut self, prompts: &[&str], params: &SamplingParams) -> Result<Vec<RequestOutput>, LlmError> {
        let tokenized = prompts
            .iter()
            .map(|p| self.core.model().tokenizer.encode(p, true))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.generate_tokens(tokenized.into_iter().map(|t| (t, params.clone(), None)).collect()))
    }

    /// Generate from token ids, each with its own parameters and optional capture.
    pub fn generate_tokens(&mut self, requests: Vec<(Vec<u32>, SamplingParams, Option<CaptureSpec>)>) -> Vec<RequestOutput> {
        let requests = requests.into_iter().map(|(prompt, sampling, capture)| EngineRequest { prompt, sampling, capture, ..Default::default() }).collect();
        self.generate_requests(requests)
    }

    /// Generate for whole requests (captures, steering); their ids are assigned here.
    pub fn generate_requests(&mut self, requests: Vec<EngineRequest>) -> Vec<RequestOutput> {
        let mut results: Vec<RequestOutput> = Vec::with_capacity(requests.len());
        let mut slot: HashMap<RequestId, usize> = HashMap::new();
        for mut req in requests {
            let id = self.next_id;
            self.next_id += 1;
            slot.insert(id, results.len());
            let n = req.sampling.n.max(1);
            results.push(RequestOutput {
                id,
                prompt_token_ids: req.prompt.clone(),
                outputs: (0..n).map(|index| CompletionOutput { index, ..Default::default() }).collect(),
                cached_tokens: 0,
            });
            req.id = id;
            self.core.add_request(req);
        }
        self.stream(|out| {
            let r = &mut results[slot[&out.id]];
            r.cached_tokens = r.cached_tokens.max(out.cached_tokens);
            if let Some(c) = r.outputs.get_mut(out.index) {
                absorb(c, out);
            }
        });
        results
    }

    /// Step until every queued request has finished, handing each output to `f` as it comes.
    pub fn stream(&mut self, mut f: impl FnMut(EngineOutput)) {
        while self.core.has_work() {
            let outputs = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.core.step())) {
                Ok(o) => o,
                Err(panic) => self.core.recover(&crate::core::panic_message(panic.as_ref())),
            };
            for out in outputs {
                f(out);
            }
            if self.core.stalled() {
                // Nothing can arrive to unblock it here (no other caller): answer what is left.
                for out in self.core.recover("the engine cannot schedule the remaining requests") {
                    f(out);
                }
            }
        }
    }
}

fn absorb(c: &mut CompletionOutput, out: EngineOutput) {
    c.text.push_str(&out.text);
    c.token_ids.extend(out.new_tokens);
    c.logprobs.extend(out.logprobs);
    if out.finish.is_some() {
        c.finish_reason = out.finish;
        c.captures = out.capture.map(|p| p.assemble()).unwrap_or_default();
        c.logit_lens = out.logit_lens;
    }
}
