//! Captures to a safetensors file: one tensor per hook name, shaped as in HOOKS.md; metadata
//! records the positions of the `T` axis, the prompt's token ids and the model.

use anyhow::{Context, Result};
use glassbox_protocol::Capture;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

pub fn write(path: &Path, captures: &[Capture], prompt: &[u32], model: &str) -> Result<()> {
    let mut views = Vec::with_capacity(captures.len());
    let mut meta = HashMap::new();
    for c in captures {
        let name = c.hook.to_string();
        views.push((name.clone(), TensorView::new(Dtype::F32, c.shape.clone(), &c.data)?));
        meta.insert(format!("positions.{name}"), serde_json::to_string(&c.positions)?);
    }
    meta.insert("prompt_token_ids".into(), serde_json::to_string(prompt)?);
    meta.insert("model".into(), model.to_string());
    safetensors::serialize_to_file(views, Some(meta), path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
