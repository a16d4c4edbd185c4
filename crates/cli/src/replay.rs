//! `glassbox replay DUMP`: rerun the requests of a crash dump in-process, first together as
//! they were batched, then each alone, and say whether the failure comes back and for which
//! request. Seeded sampling and batch invariance make a replay exact, so tokens that differ
//! from the recorded ones are reported as a divergence.

use crate::commands::load_model;
use anyhow::{Context, Result};
use clap::Args;
use glassbox_engine::crash::{self, CrashDump};
use glassbox_engine::{EngineCore, LLM};
use glassbox_protocol::{EngineOutput, EngineRequest, FinishReason, RequestId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct ReplayArgs {
    /// A `crash-*.json` or `state-*.json` file written by the engine.
    pub dump: PathBuf,
    /// Load this model instead of the one the dump names.
    #[arg(long)]
    pub model: Option<String>,
}

/// How one request ended in a replay: its tokens per completion and the error, if any.
#[derive(Default)]
struct Outcome {
    tokens: BTreeMap<usize, Vec<u32>>,
    error: Option<String>,
}

pub fn replay(a: ReplayArgs) -> Result<()> {
    let dump = crash::read(&a.dump).map_err(anyhow::Error::msg)?;
    let model_path = a.model.clone().unwrap_or_else(|| dump.model.path.display().to_string());
    let model = Arc::new(load_model(Some(&model_path), dump.model.dequantize, dump.model.batch_invariant)?);
    println!("replaying {} ({} requests in flight)", a.dump.display(), dump.requests.len());
    println!("recorded failure: {}", dump.reason);
    let recorded_failed: Vec<RequestId> = dump.failed.iter().map(|f| f.request).collect();
    if let Some(f) = &dump.fault {
        println!("note: the dump was written under test fault injection {f:?}");
    }
    let mut cfg = dump.config.clone();
    cfg.crash_dump_dir = None;
    let requests: Vec<EngineRequest> = dump.requests.iter().map(|r| r.request.clone()).collect();

    println!("\n1. the {} requests together, as batched:", requests.len());
    let together = run(&model, &cfg, &requests)?;
    let failed_together = report(&dump, &together);

    println!("\n2. each request alone:");
    let mut failed_alone = vec![];
    for r in &requests {
        let alone = run(&model, &cfg, std::slice::from_ref(r))?;
        failed_alone.extend(report(&dump, &alone));
    }

    println!();
    let named = |ids: &[RequestId]| ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    if failed_together.is_empty() && failed_alone.is_empty() {
        println!("verdict: the failure does not reproduce (recorded for request(s) {}).", named(&recorded_failed));
    } else if !failed_alone.is_empty() {
        println!("verdict: the failure reproduces for request(s) {} alone (recorded: {}).", named(&failed_alone), named(&recorded_failed));
    } else {
        println!(
            "verdict: the failure reproduces only in the batch, for request(s) {} (recorded: {}): it depends on the batch composition.",
            named(&failed_together),
            named(&recorded_failed)
        );
    }
    Ok(())
}

/// Run these requests to the end on a fresh engine.
fn run(model: &Arc<glassbox_model::LoadedModel>, cfg: &glassbox_engine::EngineConfig, requests: &[EngineRequest]) -> Result<BTreeMap<RequestId, Outcome>> {
    let mut llm = LLM::from_model(model.clone(), cfg.clone()).context("building the engine from the dump's configuration")?;
    let core: &mut EngineCore = llm.core_mut();
    for r in requests {
        core.add_request(r.clone());
    }
    let mut outcomes: BTreeMap<RequestId, Outcome> = requests.iter().map(|r| (r.id, Outcome::default())).collect();
    llm.stream(|o: EngineOutput| {
        let entry = outcomes.entry(o.id).or_default();
        entry.tokens.entry(o.index).or_default().extend(&o.new_tokens);
        if let Some(FinishReason::Error(m)) = &o.finish {
            entry.error = Some(m.clone());
        }
    });
    Ok(outcomes)
}

/// Print each request's outcome against the recording; returns the requests that failed.
fn report(dump: &CrashDump, outcomes: &BTreeMap<RequestId, Outcome>) -> Vec<RequestId> {
    let mut failed = vec![];
    for (id, out) in outcomes {
        let recorded = dump.requests.iter().find(|r| r.request.id == *id);
        let mut line = format!("   request {id}: ");
        match &out.error {
            Some(e) => {
                failed.push(*id);
                line += &format!("FAILED: {e}");
            }
            None => line += &format!("finished, {} token(s)", out.tokens.values().map(Vec::len).sum::<usize>()),
        }
        for seq in recorded.map(|r| r.sequences.as_slice()).unwrap_or_default() {
            let got = out.tokens.get(&seq.index).map(Vec::as_slice).unwrap_or_default();
            let n = seq.generated.len().min(got.len());
            match (0..n).find(|&i| seq.generated[i] != got[i]) {
                Some(i) => line += &format!(
                    "; completion {} DIVERGES from the recording at token {i} (seeded sampling and batch invariance should make replays exact: a different model file, --batch-invariant false, or nondeterminism)",
                    seq.index
                ),
                None if n > 0 => line += &format!("; completion {} matches the {n} recorded token(s)", seq.index),
                None => {}
            }
        }
        println!("{line}");
    }
    failed
}
