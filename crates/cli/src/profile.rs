//! `--profile out.json` for the offline commands: the same profiler as `/start_profile`, on
//! the same engine, written where the user says.

use anyhow::Result;
use clap::Args;
use glassbox_engine::profile::ProfileOptions;
use glassbox_engine::LLM;
use std::path::PathBuf;

#[derive(Args, Clone, Debug, Default)]
pub struct ProfileArgs {
    /// Profile the engine and write a Chrome trace (Perfetto opens it) here, with a text
    /// summary beside it (`out.json` -> `out.summary.txt`).
    #[arg(long, value_name = "OUT.json")]
    pub profile: Option<PathBuf>,
    /// With --profile: also time every layer and op of each forward pass.
    #[arg(long, requires = "profile")]
    pub profile_layers: bool,
}

impl ProfileArgs {
    pub fn start(&self, llm: &mut LLM) -> Result<()> {
        if self.profile.is_some() {
            llm.core_mut().start_profile(&ProfileOptions { with_layers: self.profile_layers, ..Default::default() })?;
        }
        Ok(())
    }

    pub fn finish(&self, llm: &mut LLM) -> Result<()> {
        if let Some(path) = &self.profile {
            let files = llm.core_mut().stop_profile_to(path)?;
            eprintln!("profile of {} steps: {} (open in https://ui.perfetto.dev), summary {}", files.steps, files.trace.display(), files.summary.display());
        }
        Ok(())
    }
}
