//! Named steering vectors: loaded at startup from safetensors files (`--steering-vectors DIR`,
//! every 1-D tensor of every `*.safetensors` file, named by the tensor) and added at run time
//! with `POST /v1/steering_vectors`. Requests name them in `steer[].vector`; the server turns
//! them into plain vectors before the engine sees the request. API-layer state.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

#[derive(Default)]
pub struct SteeringVectors {
    inner: RwLock<HashMap<String, Vec<f32>>>,
}

impl SteeringVectors {
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let mut map = HashMap::new();
        let mut files: Vec<_> = std::fs::read_dir(dir).with_context(|| format!("--steering-vectors {}", dir.display()))?.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files.iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")) {
            let tensors = candle_core::safetensors::load(f, &candle_core::Device::Cpu).with_context(|| format!("reading {}", f.display()))?;
            for (name, t) in tensors {
                if t.rank() != 1 {
                    bail!("{}: tensor `{name}` has shape {:?}; steering vectors are 1-D", f.display(), t.dims());
                }
                let v: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.to_vec1()?;
                if map.insert(name.clone(), v).is_some() {
                    bail!("{}: a steering vector named `{name}` was already loaded from another file", f.display());
                }
            }
        }
        Ok(SteeringVectors { inner: RwLock::new(map) })
    }

    pub fn get(&self, name: &str) -> Option<Vec<f32>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    pub fn insert(&self, name: String, v: Vec<f32>) {
        self.inner.write().unwrap_or_else(|e| e.into_inner()).insert(name, v);
    }

    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.inner.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        n.sort();
        n
    }
}
