//! Captures as a safetensors file: one tensor per hook name, shaped as in HOOKS.md, in the
//! capture's element type. The header metadata names the hooks, their shapes and the token
//! positions of each tensor's `T` axis (plus whatever the caller adds), so numpy
//! (`safetensors.numpy.load`) and torch read everything from the file alone.

use crate::error::{ModelError, Result};
use glassbox_protocol::{Capture, DType};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;

pub fn to_safetensors(captures: &[Capture], mut metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(captures.len());
    for c in captures {
        let name = c.hook.to_string();
        let dtype = match c.dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        };
        let view = TensorView::new(dtype, c.shape.clone(), &c.data).map_err(|e| ModelError::BadConfig(format!("capture {name}: {e}")))?;
        views.push((name.clone(), view));
        metadata.insert(format!("positions.{name}"), json(&c.positions));
        metadata.insert(format!("shape.{name}"), json(&c.shape));
    }
    let names: Vec<String> = captures.iter().map(|c| c.hook.to_string()).collect();
    metadata.insert("hooks".into(), json(&names));
    safetensors::serialize(views, Some(metadata)).map_err(|e| ModelError::BadConfig(format!("writing captures: {e}")))
}

/// Small vectors as JSON (serializing them cannot fail).
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
