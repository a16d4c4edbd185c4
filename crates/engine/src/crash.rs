//! Crash dumps: when a step fails (or on demand), everything needed to rerun the requests in
//! flight, as one JSON file. `glassbox replay` reads it back.
//!
//! A dump is plain data (serde); `EngineCore::crash_dump` fills it, [`write`] puts it on disk
//! and keeps the directory bounded.

use crate::core::EngineConfig;
use crate::fault::FaultPlan;
use glassbox_protocol::{EngineRequest, RequestId};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Dumps kept per directory; older ones are deleted.
pub const MAX_DUMPS: usize = 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CrashDump {
    /// Why it was written: the panic or error, or "on demand".
    pub reason: String,
    /// UTC, RFC 3339.
    pub time: String,
    pub build: BuildInfo,
    pub model: ModelInfo,
    pub config: EngineConfig,
    /// The failing step, if a step failed.
    pub step: Option<StepRecord>,
    /// Requests the failure was attributed to, with their messages.
    pub failed: Vec<FailedRequest>,
    /// Every unfinished request, in arrival order.
    pub requests: Vec<DumpedRequest>,
    /// Test builds: the fault plan that was active.
    pub fault: Option<FaultPlan>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BuildInfo {
    pub version: String,
    pub target: String,
    pub debug_assertions: bool,
    pub cpu_features: Vec<String>,
}

impl BuildInfo {
    pub fn current() -> BuildInfo {
        let mut cpu_features = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            let detected = [
                ("avx2", is_x86_feature_detected!("avx2")),
                ("fma", is_x86_feature_detected!("fma")),
                ("avx512f", is_x86_feature_detected!("avx512f")),
                ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
            ];
            cpu_features = detected.iter().filter(|(_, on)| *on).map(|(n, _)| n.to_string()).collect();
        }
        BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            debug_assertions: cfg!(debug_assertions),
            cpu_features,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    pub dequantize: bool,
    pub batch_invariant: bool,
}

/// One engine step as scheduled: which rows of the flat batch belong to which sequence.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub number: u64,
    pub rows: Vec<StepRows>,
    pub preempted: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRows {
    /// The engine's sequence id.
    #[serde(default)]
    pub seq: u64,
    pub request: RequestId,
    /// The completion (`n` > 1) this sequence is.
    pub index: usize,
    /// Rows `row..row + len` of the flat batch hold positions `start..start + len`.
    pub row: usize,
    /// The request's prompt length (positions below it are prefill).
    #[serde(default)]
    pub prompt_len: usize,
    pub start: usize,
    pub len: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedRequest {
    pub request: RequestId,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DumpedRequest {
    /// As submitted, with the seed the engine actually used filled in.
    pub request: EngineRequest,
    pub sequences: Vec<DumpedSequence>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DumpedSequence {
    pub index: usize,
    /// Tokens generated so far.
    pub generated: Vec<u32>,
    /// Tokens whose KV is computed.
    pub num_computed: usize,
    pub running: bool,
}

/// Write `dump` as `PREFIX-<time>.json` under `dir` and delete the oldest dumps beyond
/// [`MAX_DUMPS`]. Returns the file's path.
pub fn write(dir: &Path, prefix: &str, dump: &CrashDump) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let mut path = dir.join(format!("{prefix}-{stamp}.json"));
    let mut k = 1;
    while path.exists() {
        path = dir.join(format!("{prefix}-{stamp}-{k}.json"));
        k += 1;
    }
    let json = serde_json::to_vec_pretty(dump).map_err(std::io::Error::other)?;
    std::fs::write(&path, json)?;
    prune(dir);
    Ok(path)
}

fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut dumps: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (name.starts_with("crash-") || name.starts_with("state-")) && name.ends_with(".json")
        })
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    if dumps.len() <= MAX_DUMPS {
        return;
    }
    dumps.sort();
    for (_, p) in &dumps[..dumps.len() - MAX_DUMPS] {
        let _ = std::fs::remove_file(p);
    }
}

/// Read a dump written by [`write`].
pub fn read(path: &Path) -> Result<CrashDump, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a glassbox crash dump: {e}", path.display()))
}
