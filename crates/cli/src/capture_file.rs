//! Captures to a safetensors file (the layout `glassbox_model::capture_file` writes); metadata
//! adds the prompt's token ids and the model.

use anyhow::{Context, Result};
use glassbox_protocol::Capture;
use std::collections::HashMap;
use std::path::Path;

pub fn write(path: &Path, captures: &[Capture], prompt: &[u32], model: &str) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("prompt_token_ids".into(), serde_json::to_string(prompt)?);
    meta.insert("model".into(), model.to_string());
    let bytes = glassbox_model::capture_file::to_safetensors(captures, meta)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
