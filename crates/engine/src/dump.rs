//! Tensor dumps: every chosen hook's flat batch tensor, per engine step, attributed to
//! requests (vLLM's `VLLM_DEBUG_TENSOR_DUMP_*`, without monkey-patching). Each dumped step
//! is `stepNNNNNN.safetensors` (the step's rows, f32) plus `stepNNNNNN.json` (which rows and
//! positions belong to which request), written by a writer thread behind a bounded queue:
//! the engine thread only copies the tensors out. [`slice`] turns a dump back into one
//! request's capture file. Attention patterns are per sequence, not batch tensors: capture them.

use glassbox_model::{BatchLayout, HookRows, HookSet, Result};
use glassbox_protocol::{Capture, DType, HookName, RequestId, Site};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};

/// What to dump (plain data: part of the engine config and of crash dumps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DumpConfig {
    pub dir: PathBuf,
    /// Resolved hook names (patterns excluded).
    pub hooks: Vec<HookName>,
    /// Engine steps to let pass before dumping.
    pub skip_steps: u64,
    /// Steps to dump at most (`None`: no limit).
    pub max_steps: Option<u64>,
}

/// One request's share of a dumped step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestRows {
    pub request: RequestId,
    pub index: usize,
    /// Rows `rows[0]..rows[1]` of every tensor but `logits` hold positions `positions[0]..`.
    pub rows: [usize; 2],
    pub positions: [usize; 2],
    /// Rows of the `logits` tensor, and their first position.
    pub logit_rows: [usize; 2],
    pub logit_position: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub step: u64,
    pub requests: Vec<ManifestRows>,
    pub tensors: BTreeMap<String, Vec<usize>>,
}

/// A step's tensors, copied out of the forward pass.
#[derive(Default)]
pub struct StepDump {
    pub tensors: Vec<(HookName, Vec<usize>, Vec<f32>)>,
}

impl StepDump {
    pub fn observe(&mut self, set: &HookSet, name: HookName, x: &Tensor, rows: &HookRows) -> Result<()> {
        if set.contains(name) && matches!(rows, HookRows::Batch) {
            self.tensors.push((name, x.dims().to_vec(), x.flatten_all()?.to_vec1::<f32>()?));
        }
        Ok(())
    }
}

/// The engine's side of dumping: which steps, and the queue to the writer thread.
pub struct Dumper {
    pub cfg: DumpConfig,
    pub set: HookSet,
    tx: Option<SyncSender<(Manifest, StepDump)>>,
    writer: Option<std::thread::JoinHandle<()>>,
    written: u64,
}

/// Stopping dumps (or the engine) waits until every queued step is on disk.
impl Drop for Dumper {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Dumper {
    pub fn start(cfg: DumpConfig) -> std::io::Result<Dumper> {
        std::fs::create_dir_all(&cfg.dir)?;
        // A few steps in flight; beyond that the engine waits for the disk (never drops).
        let (tx, rx) = sync_channel::<(Manifest, StepDump)>(4);
        let dir = cfg.dir.clone();
        let writer = std::thread::Builder::new().name("glassbox-dump".into()).spawn(move || {
            for (manifest, dump) in rx {
                if let Err(e) = write_step(&dir, &manifest, dump) {
                    tracing::error!("tensor dump of step {} failed: {e}", manifest.step);
                }
            }
        })?;
        let set = cfg.hooks.iter().copied().filter(|h| h.site != Site::Pattern).collect();
        Ok(Dumper { cfg, set, tx: Some(tx), writer: Some(writer), written: 0 })
    }

    /// Does engine step `step` (counted from 1) get dumped?
    pub fn wants(&self, step: u64) -> bool {
        step > self.cfg.skip_steps && self.cfg.max_steps.is_none_or(|m| self.written < m)
    }

    pub fn send(&mut self, step: u64, layout: &BatchLayout, owners: &[(RequestId, usize)], dump: StepDump) {
        let requests = layout
            .seqs
            .iter()
            .enumerate()
            .zip(owners)
            .map(|((i, s), &(request, index))| {
                let (first, range) = layout.logit_range(i);
                let logit_position = if range.is_empty() { 0 } else { s.pos + (range.start - s.start) };
                ManifestRows { request, index, rows: [s.start, s.start + s.len], positions: [s.pos, s.pos + s.len], logit_rows: [first, first + range.len()], logit_position }
            })
            .collect();
        let tensors = dump.tensors.iter().map(|(h, shape, _)| (h.to_string(), shape.clone())).collect();
        self.written += 1;
        if self.tx.as_ref().is_none_or(|tx| tx.send((Manifest { step, requests, tensors }, dump)).is_err()) {
            tracing::error!("the tensor dump writer has stopped; step {step} is not dumped");
        }
    }
}

fn write_step(dir: &Path, manifest: &Manifest, dump: StepDump) -> std::result::Result<(), String> {
    let captures: Vec<Capture> = dump
        .tensors
        .into_iter()
        .map(|(hook, shape, data)| Capture { hook, shape, dtype: DType::F32, data: DType::F32.encode(&data), positions: vec![] })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("manifest".to_string(), serde_json::to_string(manifest).map_err(|e| e.to_string())?);
    let bytes = glassbox_model::capture_file::to_safetensors(&captures, meta).map_err(|e| e.to_string())?;
    let stem = dir.join(format!("step{:06}", manifest.step));
    std::fs::write(stem.with_extension("safetensors"), bytes).map_err(|e| e.to_string())?;
    std::fs::write(stem.with_extension("json"), serde_json::to_vec_pretty(manifest).map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

/// hook -> (a row's inner shape, position -> the row's values)
type RowsByHook = BTreeMap<HookName, (Vec<usize>, BTreeMap<usize, Vec<f32>>)>;

/// One request's rows from every dumped step, as captures (positions in order; a position
/// recomputed after a preemption appears once).
pub fn slice(dir: &Path, request: RequestId, index: usize) -> std::result::Result<Vec<Capture>, String> {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step")))
        .collect();
    manifests.sort();
    let mut rows: RowsByHook = BTreeMap::new();
    for m in &manifests {
        let manifest: Manifest = serde_json::from_slice(&std::fs::read(m).map_err(|e| e.to_string())?).map_err(|e| format!("{}: {e}", m.display()))?;
        let Some(mine) = manifest.requests.iter().find(|r| r.request == request && r.index == index) else { continue };
        let bytes = std::fs::read(m.with_extension("safetensors")).map_err(|e| e.to_string())?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
        for (name, view) in st.tensors() {
            let hook: HookName = name.parse().map_err(|e| format!("{name}: {e}"))?;
            let shape = view.shape().to_vec();
            let width: usize = shape[1..].iter().product();
            let data = DType::F32.decode(view.data());
            let (range, first_pos) = if hook.site == Site::Logits { (mine.logit_rows, mine.logit_position) } else { (mine.rows, mine.positions[0]) };
            let entry = rows.entry(hook).or_insert_with(|| (shape[1..].to_vec(), BTreeMap::new()));
            for (k, r) in (range[0]..range[1]).enumerate() {
                entry.1.entry(first_pos + k).or_insert_with(|| data[r * width..(r + 1) * width].to_vec());
            }
        }
    }
    if rows.is_empty() {
        return Err(format!("request {request} (completion {index}) is in no dumped step under {}", dir.display()));
    }
    Ok(rows
        .into_iter()
        .map(|(hook, (inner, by_pos))| {
            let mut shape = vec![by_pos.len()];
            shape.extend(inner);
            let positions = by_pos.keys().copied().collect();
            let data = DType::F32.encode(&by_pos.into_values().flatten().collect::<Vec<f32>>());
            Capture { hook, shape, dtype: DType::F32, data, positions }
        })
        .collect())
}
